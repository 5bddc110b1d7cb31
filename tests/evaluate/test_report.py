"""The cluster-hierarchy report: node selection on a planted hierarchy, purity by hand, and the
real page rendered by headless chromium with every image loaded."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cluster.prototypes import Prototypes
from evaluate.cli import main
from evaluate.metrics import purity
from evaluate.report import pick_nodes
from tests.evaluate.test_cli import LOADER

CHROMIUM = Path("/usr/bin/chromium")


def test_purity_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2])
    # clusters {0,0,1} -> 2 right, {1,1,2} -> 2 right
    assert purity(labels, np.array([7, 7, 7, 3, 3, 3])) == pytest.approx(4 / 6)
    assert purity(labels, np.arange(6)) == 1.0


def _planted_hierarchy():
    """12 points: fine clusters {0..3} of sizes 4, 3, 3, 2; parents 0, 0, 1, 1 (coarse sizes 7, 5)."""
    fine = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    parent = torch.tensor([0, 0, 1, 1])
    g = torch.Generator().manual_seed(0)
    cents = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    feats = F.normalize(cents[fine] + 0.2 * torch.randn(12, 8, generator=g), dim=1)
    coarse = F.normalize(torch.stack([cents[:2].mean(0), cents[2:].mean(0)]), dim=1)
    protos = Prototypes([fine, parent[fine]], [cents, coarse], [torch.ones(4), torch.ones(2)], [parent],
                        [cents @ coarse.T])
    return protos, feats


def test_pick_nodes_follows_the_hierarchy():
    protos, feats = _planted_hierarchy()
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    nodes = pick_nodes(protos, feats, labels, ["a", "b", "c"], top_clusters=1, children=5, images=3)
    (top,) = nodes
    assert (top.level, top.cid, top.size) == (2, 0, 7)  # the largest coarse cluster
    assert top.classes == [("b", 4), ("a", 3)]
    assert [(c.level, c.cid, c.size) for c in top.children] == [(1, 0, 4), (1, 1, 3)]  # largest first
    for child in top.children:
        members = set((protos.im2cluster[0] == child.cid).nonzero().squeeze(1).tolist())
        assert {i for i, _ in child.images} <= members and len(child.images) == 3
        sims = [s for _, s in child.images]
        assert sims == sorted(sims, reverse=True)  # nearest to the centroid first
        expected = (feats[sorted(members)] @ protos.centroids[0][child.cid]).topk(3).values
        torch.testing.assert_close(torch.tensor(sims), expected)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed "
                    "(apt-get install chromium; scripts/setup.sh installs it)")
def test_report_page_renders_with_every_image_loaded(fm_shards, official_ckpt, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["report", "--checkpoint", str(official_ckpt), "--shards", str(fm_shards), "--split", "train",
                 "--num-clusters", "12,3", "--top-clusters", "3", "--children", "4", "--images", "5",
                 "--out", str(out), *LOADER])
    assert code == 0
    capsys.readouterr()
    page = (out / "index.html").read_text()
    n_img = len(re.findall(r"<img\b", page))
    assert 3 <= n_img <= 3 * 4 * 5 and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page.count("<svg") >= 2 + 3  # two histograms and one class-mix bar per top cluster
    assert any(name in page for name in ("Trouser", "Sneaker", "Bag", "Ankle boot", "Pullover"))
    montages = sorted(out.glob("cluster_L2_*.png"))
    assert len(montages) == 3 and all(Image.open(m).size[0] > 96 for m in montages)

    proc = _chromium("--virtual-time-budget=10000", "--dump-dom", f"file://{out / 'index.html'}",
                     profile=tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{n_img}"' in body and f'data-loaded="{n_img}"' in body, body
    imgs = re.findall(r"<img\b[^>]*>", dom)
    assert len(imgs) == n_img
    assert all(re.search(r'data-loaded="[1-9]\d*"', tag) and "data-failed" not in tag for tag in imgs)

    shot = tmp_path / "report.png"
    proc = _chromium("--hide-scrollbars", "--window-size=1280,1800", f"--screenshot={shot}",
                     f"file://{out / 'index.html'}", profile=tmp_path / "profile2")
    assert proc.returncode == 0 and shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 20  # a rendered page with images, not a blank canvas
