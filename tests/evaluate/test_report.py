"""`hcsc-eval report`: the page shows the hierarchy training learned (the prototypes stored with the
checkpoint, checked level by level against the stored assignment and against an independent
embedding of the training split), every top-level cluster is reachable, the training curves come from
metrics.jsonl whatever records it holds, the page renders in headless chromium with every image and
SVG drawn, ``--recluster`` still clusters a split afresh, and a checkpoint without prototypes is one
line (exit 2)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cluster.prototypes import Prototypes
from core.logs import read_jsonl as read_records
from evaluate.cli import main
from evaluate.curves import charts
from evaluate.metrics import purity
from evaluate.report import choose_rows, pick_nodes, plan_nodes
from evaluate.stored import prototypes_epoch
from tests.evaluate.test_cli import LOADER

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed "
                                    "(apt-get install chromium; scripts/test.sh installs it)")
SVG_NS = "http://www.w3.org/2000/svg"


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
    assert top.finer == [(0, 4), (1, 3)] and top.num_children == 2
    for child in [top, *top.children]:
        level = child.level - 1
        members = set((protos.im2cluster[level] == child.cid).nonzero().squeeze(1).tolist())
        assert {i for i, _ in child.images} <= members and len(child.images) == 3
        sims = [s for _, s in child.images]
        assert sims == sorted(sims, reverse=True)  # nearest to the centroid first
        expected = (feats[sorted(members)] @ protos.centroids[level][child.cid]).topk(3).values
        torch.testing.assert_close(torch.tensor(sims), expected)
    every = pick_nodes(protos, feats, labels, ["a", "b", "c"], children=5, images=3)
    assert [n.cid for n in every] == [0, 1]  # every top-level cluster by default


def test_pick_nodes_ranks_only_the_embedded_rows():
    protos, feats = _planted_hierarchy()
    rows = np.array([1, 2, 5, 8, 9, 11])  # a subset of the samples, as with --max-images
    nodes = pick_nodes(protos, feats[rows], None, [], children=2, images=5, rows=rows)
    for top in nodes:
        for node in [top, *top.children]:
            members = (protos.im2cluster[node.level - 1] == node.cid).nonzero().squeeze(1).tolist()
            assert node.size == len(members)  # sizes count every member...
            assert [i for i, _ in node.images] == [i for i in sorted(  # ...the images only embedded ones
                set(rows.tolist()) & set(members),
                key=lambda i: -float(feats[i] @ protos.centroids[node.level - 1][node.cid]))]


def test_choose_rows_gives_every_shown_prototype_candidates():
    n = 1000
    fine = torch.cat([torch.zeros(990, dtype=torch.long), torch.arange(1, 11)])  # one huge, ten singletons
    parent = torch.tensor([0] + [1] * 10)
    protos = Prototypes([fine, parent[fine]], [torch.eye(11, 4), torch.eye(2, 4)],
                        [torch.ones(11), torch.ones(2)], [parent], [torch.zeros(11, 2)])
    plan = plan_nodes(protos, top_clusters=None, children=20)
    assert plan == [(0, [0]), (1, list(range(1, 11)))]
    rows = choose_rows(protos, plan, max_images=50, images=4, seed=0)
    assert np.all(np.diff(rows) > 0) and 50 <= rows.size <= 50 + 12 * 4
    assert set(range(990, 1000)) <= set(rows.tolist())  # every singleton prototype has its member
    assert choose_rows(protos, plan, max_images=n, images=4).tolist() == list(range(n))


def test_prototypes_epoch_of_a_checkpoint():
    # the end of epoch E is saved as (E + 1, batch 0), a stop inside epoch E as (E, k); both hold E's
    assert prototypes_epoch(2, 0) == 1
    assert prototypes_epoch(1, 7) == 1


# metrics.jsonl as the trainer writes it (every kind), plus what a killed or older run leaves behind
LEVELS = 3


def _train_record(step: int, epoch: int) -> dict:
    warm = epoch < 1
    record = {"kind": "train", "step": step, "time": 1e9 + step, "epoch": epoch, "batch": step % 2,
              "loss_inst": 5.0 - 0.1 * step, "loss_proto": 0.0 if warm else 2.9, "loss_local_inst": 0,
              "loss_local_proto": 0, "acc_inst": 50.0, "lr": 0.03, "images_per_s": 100.0, "data_wait": 0.1}
    record["loss"] = record["loss_inst"] + record["loss_proto"]
    if not warm:
        for lvl in range(1, LEVELS + 1):
            record |= {f"loss_inst/l{lvl}": 1.7 + 0.1 * lvl, f"acc_inst/l{lvl}": 40.0 + lvl,
                       f"loss_proto/l{lvl}": 1.0 - 0.1 * lvl, f"acc_proto/l{lvl}": 10.0 * lvl,
                       f"kept_inst/l{lvl}": 0.9, f"kept_proto/l{lvl}": 1.0 if lvl == LEVELS else 0.7}
    return record


def metrics_lines() -> list[str]:
    records: list[dict] = [{"kind": "init", "step": 0, "knn_top1": 20.0, "knn_top5": 60.0, "val_nmi": 0.1}]
    step = 0
    for epoch in range(3):
        if epoch >= 1:
            records += [{"kind": "cluster", "step": step, "epoch": epoch, "level": lvl,
                         "clusters": 16 >> (lvl - 1), "samples": 160, "objective": 1.0,
                         "nmi": 0.3 + 0.1 * epoch, "purity": 0.5, "concentration_mean": 0.2}
                        for lvl in range(1, LEVELS + 1)]
        for _ in range(2):
            step += 1
            records.append(_train_record(step, epoch))
        records.append({"kind": "epoch", "step": step, "epoch": epoch, "loss": 3.0, "loss_inst": 3.0,
                        "images_per_s": 90.0, "epoch_s": 2.0, "eta_s": 4.0})
        records.append({"kind": "knn", "step": step, "epoch": epoch, "knn_top1": 30.0 + epoch,
                        "knn_top5": 80.0})
    records.append({"kind": "final", "step": step, "knn_top1": 70.1, "knn_top5": 98.0, "val_nmi": 0.4})
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"kind": "train", "step": 3, "loss": NaN}')  # a diverged step: no point, no crash
    lines.insert(5, '{"kind": "future_kind", "step": 4, "whatever": [1, 2]}')
    lines.append('{"kind": "train", "step": 9, "lo')  # the line a kill cut short
    return lines


def test_curves_from_every_record_kind_and_robust_to_missing_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(metrics_lines()) + "\n")
    records = read_records(path)
    assert len(records) == len(metrics_lines()) - 1  # only the cut line is dropped
    found = {c.title: c for c in charts(records, epochs=3)}
    assert set(found) == {"Training loss", "Loss per level", "Kept negatives per level",
                          "Top-1 of the positive per level", "kNN top-1 per epoch",
                          "Clustering of the training split per epoch"}
    per_level = {s.label for s in found["Loss per level"].series}
    assert per_level == {f"{k} L{lvl}" for k in ("loss_inst", "loss_proto") for lvl in range(1, LEVELS + 1)}
    knn = next(s for s in found["kNN top-1 per epoch"].series if s.label == "top-1")
    assert list(zip(knn.x, knn.y, strict=True)) == [(0, 20.0), (1, 30.0), (2, 31.0), (3, 32.0), (3, 70.1)]
    nmi = {s.label: s for s in found["Clustering of the training split per epoch"].series}
    assert nmi["nmi L2"].x == [1, 2] and nmi["nmi L2"].y == pytest.approx([0.4, 0.5])
    assert all(np.isfinite(y) for c in found.values() for s in c.series for y in s.y)
    assert all(c.note.endswith(".") for c in found.values())  # each chart says what it measures
    # older or partial files: whatever exists is drawn, nothing fails
    first_step = next(r for r in records if r["kind"] == "train")  # a warm-up step: no per-level terms
    assert [c.title for c in charts([first_step])] == ["Training loss"]
    assert charts([]) == [] and charts([{"kind": "train"}, {"step": 1, "loss": 2}]) == []
    assert read_records(tmp_path / "missing.jsonl") == []


class Page(HTMLParser):
    """What a test needs from the page: every cluster block with its rows and their images, the
    table of contents, element ids, the matrix counts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.toc: list[str] = []
        self.ids: set[str] = set()
        self.matrix: list[int] = []
        self._in: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "details" and "cluster" in classes:
            self.sections.append({"id": a["id"], "level": int(a["data-level"]), "cid": int(a["data-cid"]),
                                  "size": int(a["data-size"]), "rows": []})
        elif tag == "div" and "row" in classes:
            self.sections[-1]["rows"].append({"level": int(a["data-level"]), "cid": int(a["data-cid"]),
                                              "size": int(a["data-size"]), "own": "own" in classes,
                                              "images": []})
        elif tag == "img":
            cosine = float(re.search(r"cosine (-?[\d.]+)", a["title"]).group(1))
            self.sections[-1]["rows"][-1]["images"].append((int(a["data-idx"]), cosine))
        elif tag == "nav" and "toc" in classes:
            self._in.append("toc")
        elif tag == "a" and self._in[-1:] == ["toc"]:
            self.toc.append(a["href"])
        elif tag == "table" and "matrix" in classes:
            self._in.append("matrix")
        elif tag == "td" and self._in[-1:] == ["matrix"]:
            self._in.append("td")

    def handle_endtag(self, tag):
        if self._in and (tag, self._in[-1]) in (("nav", "toc"), ("table", "matrix"), ("td", "td")):
            self._in.pop()

    def handle_data(self, data):
        if self._in[-1:] == ["td"] and data.strip():
            self.matrix.append(int(data))


def _stored(tag: Path) -> dict:
    return torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _momentum_embeddings(run: Path, tag: Path) -> torch.Tensor:
    """The training split embedded by the trainer's own path (`split_features` over the eval loader,
    `HCSC.embed_momentum`), with the torch backend: the same eval transform the report uses."""
    from cluster.features import gather_by_idx, split_features
    from core.config import load_config
    from model.hcsc import HCSC

    cfg = load_config(run / "config.yaml", world=1)
    model = HCSC(cfg.model, cfg.hcsc)
    model.load_state_dict(_stored(tag)["module"])
    model.eval()
    data = dataclasses.replace(cfg.data, backend="torch", workers=1)
    found = split_features(model.embed_momentum, data, cfg.data.train_split, normalize=True)
    return gather_by_idx(found.idx, found.feats, found.num_samples)


@pytest.fixture(scope="module")
def stored_report(run_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The default report of a copy of the trained run whose metrics.jsonl holds every record kind."""
    root = tmp_path_factory.mktemp("stored-report")
    run = root / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("tb", ".lock"))
    (run / "metrics.jsonl").write_text("\n".join(metrics_lines()) + "\n")
    out = root / "report"
    code = main(["report", "--checkpoint", str(run), "--out", str(out), "--workers", "1"])
    assert code == 0
    return run, out


@pytest.mark.slow
def test_report_shows_the_prototypes_stored_with_the_checkpoint(stored_report, capsys):
    run, out = stored_report
    tag = _latest(run)
    state = _stored(tag)
    protos = Prototypes.from_state_dict(state["prototypes"])
    epoch = prototypes_epoch(state["epoch"], state["batch_in_epoch"])
    assert epoch == 1  # the debug run clusters from epoch 1 (warm-up 1) and ends after epoch 1
    page = (out / "index.html").read_text()
    assert f"Prototypes of epoch {epoch}, computed at its start" in page and tag.name in page
    levels = protos.num_levels
    sizes = [torch.bincount(a, minlength=c.shape[0]) for a, c in zip(protos.im2cluster, protos.centroids,
                                                                     strict=True)]
    parsed = Page(page)

    # every top-level cluster: in the contents, and one section, with the stored member count
    top_ids = {f"L{levels}-c{cid}" for cid in range(protos.centroids[-1].shape[0])}
    assert set(parsed.toc) == {f"#{i}" for i in top_ids} and len(parsed.toc) == len(top_ids)
    assert {s["id"] for s in parsed.sections} == top_ids and len(parsed.sections) == len(top_ids)
    embedded = _momentum_embeddings(run, tag)
    shown = 0
    for section in parsed.sections:
        top = section["cid"]
        assert section["level"] == levels and section["size"] == sizes[-1][top]
        own, *children = section["rows"]
        assert own["own"] and (own["level"], own["cid"]) == (levels, top)
        assert [c["cid"] for c in children] == sorted(
            (c for c in range(sizes[-2].numel()) if protos.cluster2cluster[-1][c] == top and sizes[-2][c]),
            key=lambda c: (-int(sizes[-2][c]), c))[:6]  # the largest children, at most --children 6
        for row in section["rows"]:
            level, cid = row["level"], row["cid"]
            members = (protos.im2cluster[level - 1] == cid).nonzero().squeeze(1)
            assert row["size"] == members.numel()
            idx = [i for i, _ in row["images"]]
            assert len(idx) == min(8, members.numel())  # all 160 images embedded: --images 8 each
            # the images shown belong to the row's prototype and, level by level, to the section's
            for i in idx:
                assert int(protos.im2cluster[level - 1][i]) == cid and int(protos.im2cluster[-1][i]) == top
            # ...and are its members nearest to the centroid in the momentum encoder's head space
            sims = embedded[members] @ protos.centroids[level - 1][cid]
            nearest = sims.topk(len(idx)).values.tolist()
            assert [c for _, c in row["images"]] == pytest.approx(nearest, abs=2e-3)
            shown += len(idx)
    assert shown == page.count("<img ") > 0

    # the run's config, the curves of every record kind, the scores with their explanations
    assert "config.yaml" in page and "resnet18_small" in page and "train_split: train" in page
    for title in ("Training loss", "Loss per level", "Kept negatives per level", "kNN top-1 per epoch",
                  "Clustering of the training split per epoch"):
        assert f"<figcaption>{title}</figcaption>" in page
    for term in ("NMI", "AMI", "ARI", "Hungarian accuracy", "Purity", "Concentration", "kept_inst"):
        assert term in page
    assert "most images sit in unmatched clusters" in page  # why Hungarian accuracy is low for M >> C
    # class x top-level cluster matrix: every training image counted once; the prototype map: one
    # dot per prototype of every level
    assert sum(parsed.matrix) == protos.im2cluster[0].numel()
    scatter = re.search(r'<svg[^>]*aria-label="prototype map".*?</svg>', page, flags=re.S).group(0)
    assert scatter.count("<circle") == sum(c.shape[0] for c in protos.centroids)
    # one self-contained file: nothing loaded from elsewhere
    assert "http" not in page.replace(SVG_NS, "") and "<link" not in page
    assert len(list(out.glob("cluster_L*_*.png"))) == min(6, int((sizes[-1] > 0).sum()))
    capsys.readouterr()


@pytest.mark.slow
def test_report_with_max_images_ranks_a_subset_of_the_members(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["report", "--checkpoint", str(_latest(run_dir)), "--out", str(out), "--workers", "1",
                 "--max-images", "40", "--images", "3", "--children", "2", "--montages", "0"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "stored" and result["prototypes_epoch"] == 1
    assert 40 <= result["embedded"] < 160
    protos = Prototypes.from_state_dict(_stored(_latest(run_dir))["prototypes"])
    parsed = Page((out / "index.html").read_text())
    assert len(parsed.sections) == protos.centroids[-1].shape[0]
    for section in parsed.sections:
        for row in section["rows"]:
            members = (protos.im2cluster[row["level"] - 1] == row["cid"]).nonzero().squeeze(1).tolist()
            assert len(row["images"]) == min(3, len(members))  # topped up: every prototype has candidates
            assert {i for i, _ in row["images"]} <= set(members)
    assert not list(out.glob("*.png"))  # --montages 0


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def assert_renders(page: Path, tmp_path: Path) -> None:
    """Headless chromium: every <img> loaded (naturalWidth > 0), every SVG in the DOM and every one
    outside a collapsed section drawn with a size; a screenshot saved as tmp_path/report.png."""
    text = page.read_text()
    n_img, n_svg = len(re.findall(r"<img\b", text)), len(re.findall(r"<svg\b", text))
    proc = _chromium("--virtual-time-budget=10000", "--dump-dom", f"file://{page}",
                     profile=tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{n_img}"' in body and f'data-loaded="{n_img}"' in body, body
    assert f'data-svgs="{n_svg}"' in body, body
    visible = int(re.search(r'data-svgs-visible="(\d+)"', body).group(1))
    assert visible >= 3 and f'data-svgs-drawn="{visible}"' in body, body
    imgs = re.findall(r"<img\b[^>]*>", dom)
    assert len(imgs) == n_img
    assert all(re.search(r'data-loaded="[1-9]\d*"', tag) and "data-failed" not in tag for tag in imgs)

    shot = tmp_path / "report.png"
    proc = _chromium("--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", f"file://{page}",
                     profile=tmp_path / "profile2")
    assert proc.returncode == 0 and shot.is_file() and shot.stat().st_size > 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 20  # a rendered page with images, not a blank canvas


@pytest.mark.slow
@needs_chromium
def test_stored_report_renders_with_every_image_and_svg(stored_report, tmp_path):
    _, out = stored_report
    page = out / "index.html"
    assert page.read_text().count("<svg") >= 6 + 3 + 1  # charts, histograms, the map (+ class mixes)
    assert_renders(page, tmp_path)


@pytest.mark.slow
def test_report_of_a_checkpoint_without_prototypes_is_one_line(run_dir, tmp_path, capsys):
    warmup = run_dir / "checkpoints" / "epoch0001-batch000000"
    assert _stored(warmup)["prototypes"] is None  # saved at the end of the warm-up epoch
    out = tmp_path / "report"
    code = main(["report", "--checkpoint", str(warmup), "--out", str(out)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("hcsc-eval report: error: --checkpoint")
    for text in ("no prototypes", "warm-up", "hcsc.warmup_epochs=1", "--recluster"):
        assert text in lines[0], (text, lines[0])
    assert not out.exists()


@pytest.mark.slow
@needs_chromium
def test_recluster_report_renders_with_every_image_loaded(fm_shards, official_ckpt, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["report", "--recluster", "--checkpoint", str(official_ckpt), "--shards", str(fm_shards),
                 "--split", "train", "--num-clusters", "12,3", "--children", "4", "--images", "5",
                 "--out", str(out), *LOADER])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "recluster" and result["levels"] == [12, 3]
    assert result["prototypes_epoch"] is None
    page = (out / "index.html").read_text()
    assert "Re-clustering of the train split" in page
    parsed = Page(page)
    assert sorted(s["cid"] for s in parsed.sections) == [0, 1, 2]  # every top-level cluster
    assert set(parsed.toc) == {f"#L2-c{c}" for c in range(3)}
    n_img = len(re.findall(r"<img\b", page))
    assert 3 <= n_img <= 3 * (1 + 4) * 5 and "http" not in page.replace(SVG_NS, "")
    assert page.count("<svg") >= 2 + 3 + 1  # two histograms, a class-mix bar per cluster, the map
    assert any(name in page for name in ("Trouser", "Sneaker", "Bag", "Ankle boot", "Pullover"))
    assert sum(parsed.matrix) == 160
    montages = sorted(out.glob("cluster_L2_*.png"))
    assert len(montages) == 3 and all(Image.open(m).size[0] > 96 for m in montages)
    assert_renders(out / "index.html", tmp_path)


@pytest.fixture(scope="module")
def moved_run(run_dir, tmp_path_factory) -> Path:
    """A copy of the trained run whose config names a shard folder that no longer exists."""
    run = tmp_path_factory.mktemp("moved") / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("tb", ".lock"))
    config = run / "config.yaml"
    config.write_text(re.sub(r"(?m)^  shards: .*$", "  shards: /nonexistent/shards", config.read_text()))
    return run


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """A train split of another size than the one the run trained on."""
    from shards.build import build_shards

    out = tmp_path_factory.mktemp("other-shards")
    build_shards(f"fashion-mnist:{fashion_mnist_dir}:train", out, split="train", limit=48,
                 samples_per_shard=48, show_progress=False)
    return out


STORED_MISTAKES = {
    "another split": (lambda run, other: [str(run), "--split", "val"],
                      ["--split val", "training split 'train'", "--recluster"]),
    "another encoder": (lambda run, other: [str(run), "--encoder", "resnet18"],
                        ["--encoder resnet18", "'resnet18_small'", "--recluster"]),
    "a re-clustering flag": (lambda run, other: [str(run), "--num-clusters", "8,4"],
                             ["--num-clusters 8,4", "only with --recluster"]),
    "shards of another size": (lambda run, other: [str(run), "--shards", str(other)],
                               ["--shards", "48 samples", "assign 160", "--shards"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STORED_MISTAKES))
def test_stored_report_mistakes_are_one_line(name, run_dir, other_shards, tmp_path, capsys):
    argv, want = STORED_MISTAKES[name]
    code = main(["report", "--checkpoint", *argv(run_dir, other_shards), "--out", str(tmp_path / "report")])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and captured.out == "" and len(lines) == 1, captured.err
    for text in want:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_stored_report_of_a_moved_run_names_data_shards_and_takes_shards(moved_run, fm_shards, tmp_path,
                                                                          capsys):
    code = main(["report", "--checkpoint", str(moved_run), "--out", str(tmp_path / "a")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert "data.shards of" in lines[0] and "/nonexistent/shards" in lines[0] and "--shards" in lines[0]
    code = main(["report", "--checkpoint", str(moved_run), "--shards", str(fm_shards), "--out",
                 str(tmp_path / "b"), "--workers", "1", "--images", "2", "--children", "1",
                 "--montages", "0"])
    assert code == 0 and json.loads(capsys.readouterr().out)["embedded"] == 160


def _fake_checkpoint(root: Path, prototypes: object, config: str = "hcsc:\n  warmup_epochs: 1\n") -> Path:
    """A checkpoint folder laid out as our trainer writes it, with the given client state."""
    from tests.evaluate.conftest import tiny_hcsc

    tag = root / "checkpoints" / "epoch0003-batch000000"
    tag.mkdir(parents=True)
    torch.save({"module": tiny_hcsc().state_dict(), "epoch": 3, "batch_in_epoch": 0, "global_step": 9,
                "config_yaml": config, "prototypes": prototypes}, tag / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text(tag.name)
    return tag


def _good_prototypes() -> dict:
    fine = torch.arange(10) % 4
    parent = torch.tensor([0, 0, 1, 1])
    return Prototypes([fine, parent[fine]], [torch.eye(4, 8), torch.eye(2, 8)],
                      [torch.ones(4), torch.ones(2)], [parent], [torch.zeros(4, 2)]).state_dict()


BAD_STORES = {
    "plain MoCo": (None, "hcsc:\n  enabled: false\n", ["no prototypes", "hcsc.enabled=false", "--recluster"]),
    "assignment beyond the centroids": (
        _good_prototypes() | {"im2cluster": [torch.arange(10), torch.zeros(10, dtype=torch.long)]}, None,
        ["malformed", "--recluster"]),
    "not lists of tensors": ({"im2cluster": torch.zeros(3)}, None, ["not lists of tensors"]),
}


@pytest.mark.parametrize("name", list(BAD_STORES))
def test_load_stored_refuses_in_one_line(name, tmp_path):
    from evaluate.checkpoints import CheckpointError
    from evaluate.stored import load_stored

    prototypes, config, want = BAD_STORES[name]
    tag = _fake_checkpoint(tmp_path / "run", prototypes, *([config] if config else []))
    with pytest.raises(CheckpointError) as err:
        load_stored(tmp_path / "run")
    assert "\n" not in str(err.value) and str(tag) in str(err.value)
    for text in want:
        assert text in str(err.value), (text, str(err.value))


def test_load_stored_reads_the_client_state(tmp_path):
    from evaluate.stored import load_stored

    tag = _fake_checkpoint(tmp_path / "run", _good_prototypes())
    stored = load_stored(tag)  # the tag folder; no config.yaml beside checkpoints/: the stored copy
    assert (stored.epoch, stored.batch_in_epoch, stored.prototypes_epoch, stored.tag) == (3, 0, 2, tag.name)
    assert stored.config.hcsc.warmup_epochs == 1 and stored.prototypes.num_levels == 2
    (tmp_path / "run" / "config.yaml").write_text("hcsc:\n  warmup_epochs: 2\n")
    assert load_stored(tmp_path / "run").config.hcsc.warmup_epochs == 2  # RUN/config.yaml comes first
