"""End-to-end builds: Fashion-MNIST (the Debian package) and real ImageNet JPEGs in both layouts."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from shards import cli
from shards.build import build_shards
from shards.convert import encode_array
from shards.format import read_info, split_info
from shards.sources import FASHION_MNIST_CLASSES, load_fashion_mnist
from shards.verify import verify
from shards.writer import sha256_file
from tests.shards.conftest import EMPTY_CLASS, SYNSETS


def read_split(out: Path, split: str = "train") -> dict[int, dict]:
    """idx -> {key, jpg, cls, shard} for every sample, read with tarfile (independent of our reader)."""
    samples: dict[int, dict] = {}
    for shard in split_info(out, split).shards:
        with tarfile.open(out / shard.name) as tar:
            members: dict[str, dict] = {}
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {"key": key, "shard": shard.name})[ext] = tar.extractfile(m).read()
        for s in members.values():
            idx = int(s["idx"])
            assert idx not in samples, f"idx {idx} twice"
            samples[idx] = s
    return samples


def test_fashion_mnist_end_to_end(fmnist_shards, fashion_mnist_dir):
    out, entry = fmnist_shards
    assert verify(out, decode=True) == []
    assert [s.num_samples for s in entry.shards] == [500, 500, 200]
    assert [s.name for s in entry.shards] == [f"train-00000{i}.tar" for i in range(3)]
    assert entry.class_names == FASHION_MNIST_CLASSES and entry.idx_range == (0, 1200)
    assert entry.converted == {"encoded": 1200} and entry.skipped == []
    for shard in entry.shards:
        assert sha256_file(out / shard.name) == shard.sha256
        assert (out / shard.name).stat().st_size == shard.bytes
    # every sample is exactly the JPEG of one distinct original image, with that image's label
    images, labels = load_fashion_mnist(str(fashion_mnist_dir), "test")
    row_of = {hashlib.sha256(encode_array(img, 95)).digest(): r for r, img in enumerate(images)}
    samples = read_split(out)
    assert sorted(samples) == list(range(1200))
    rows = set()
    for idx, s in samples.items():
        assert s["key"] == f"{idx:012d}" and s["idx"] == f"{idx:012d}".encode()
        row = row_of[hashlib.sha256(s["jpg"]).digest()]
        assert int(s["cls"]) == labels[row] and len(s["cls"]) == 10
        rows.add(row)
    assert len(rows) == 1200
    assert len({int(s["cls"]) for s in samples.values()}) == 10  # the shuffle mixes all classes


def test_same_seed_same_shards_other_seed_other_order(fmnist_shards, fashion_mnist_dir, tmp_path):
    out, entry = fmnist_shards
    again = build_shards(f"fashion-mnist:{fashion_mnist_dir}:test", tmp_path / "a", samples_per_shard=500,
                         seed=0, limit=1200, workers=2, show_progress=False)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in entry.shards]
    other = build_shards(f"fashion-mnist:{fashion_mnist_dir}:test", tmp_path / "b", samples_per_shard=500,
                         seed=1, limit=1200, show_progress=False)
    assert other.shards[0].sha256 != entry.shards[0].sha256


def test_image_folder_with_awkward_inputs(folder_shards, image_folder, foolbox_jpegs):
    out, entry = folder_shards
    assert verify(out, decode=True) == []
    assert entry.num_samples == 24 and [s.num_samples for s in entry.shards] == [5, 5, 5, 5, 4]
    assert entry.copied == 20
    assert entry.converted == {"cmyk": 1, "grayscale": 1, "png": 1, "16-bit": 1}
    skipped = {s["input"]: s["reason"] for s in entry.skipped}
    assert skipped == {f"{SYNSETS[1]}/truncated.JPEG": "truncated JPEG (no end-of-image marker)",
                       f"{SYNSETS[1]}/empty.JPEG": "empty file",
                       f"{SYNSETS[1]}/notes.txt": "not an image file name"}
    assert entry.empty_classes == [EMPTY_CLASS]
    assert entry.class_names == sorted(SYNSETS + [EMPTY_CLASS])
    # real JPEGs are copied byte for byte and keep their folder's class id
    source = {p.read_bytes(): entry.class_names.index(p.parent.name)
              for p in image_folder.glob("*/n0*.JPEG")}
    samples = read_split(out)
    copied = [s for s in samples.values() if s["jpg"] in source]
    assert len(copied) == 20
    assert all(int(s["cls"]) == source[s["jpg"]] for s in copied)
    assert {p.read_bytes() for p in foolbox_jpegs} == {s["jpg"] for s in copied}


def test_imagenet_val_layout_merges_with_train(folder_shards, foolbox_jpegs, tmp_path):
    out, train = folder_shards
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    lines = []
    for i, src in enumerate(foolbox_jpegs[:8]):
        (val_dir / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(src.read_bytes())
        lines.append(f"ILSVRC2012_val_{i:08d}.JPEG {SYNSETS[i % 4]}")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    merged = tmp_path / "merged"
    shutil.copytree(out, merged)  # a copy of the train build, so the shared fixture stays untouched
    assert cli.main(["build", "--source", f"imagenet-val:{val_dir},{tmp_path / 'val.txt'}",
                     "--out", str(merged), "--split", "val", "--samples-per-shard", "3",
                     "--workers", "1", "--quiet"]) == 0
    info = read_info(merged)
    assert sorted(info["splits"]) == ["train", "val"]
    assert info["splits"]["train"] == train.to_json()  # untouched
    val = split_info(merged, "val")
    assert val.class_names == train.class_names  # ids agree with the train folders
    assert [s.name for s in val.shards] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    samples = read_split(merged, "val")
    by_bytes = {src.read_bytes(): SYNSETS[i % 4] for i, src in enumerate(foolbox_jpegs[:8])}
    assert {val.class_names[int(s["cls"])] for s in samples.values()} <= set(SYNSETS)
    assert all(val.class_names[int(s["cls"])] == by_bytes[s["jpg"]] for s in samples.values())
    assert verify(merged) == []


def test_max_side_reencodes(image_folder, tmp_path):
    entry = build_shards(f"imagefolder:{image_folder}", tmp_path, max_side=128, quality=80,
                         samples_per_shard=100, show_progress=False)
    assert entry.copied == 0 and entry.converted["resized"] == 20
    assert verify(tmp_path, decode=True) == []


def test_index_files_equal_dalis_wds2idx(folder_shards, tmp_path):
    out, entry = folder_shards
    wds2idx = Path(sys.executable).parent / "wds2idx"
    for shard in entry.shards[:2]:
        subprocess.run([str(wds2idx), str(out / shard.name), str(tmp_path / "x.idx")], check=True,
                       capture_output=True)
        assert (tmp_path / "x.idx").read_bytes() == (out / shard.index).read_bytes()


def test_info_summarises(folder_shards, capsys):
    out, _ = folder_shards
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train: 24 samples, 5 classes" in text and "5 shards" in text and "seed" in text


def test_python_api_is_importable_without_side_effects():
    code = ("import sys, shards.build; assert 'torch' not in sys.modules; "
            "assert not any(m.startswith('nvidia') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_full_fashion_mnist_train_build(fashion_mnist_dir, tmp_path):
    entry = build_shards(f"fashion-mnist:{fashion_mnist_dir}", tmp_path, workers=2, show_progress=False)
    assert entry.num_samples == 60000 and len(entry.shards) == 60
    assert all(s.num_samples == 1000 for s in entry.shards)
    assert [s.idx_range for s in entry.shards] == [(k * 1000, k * 1000 + 1000) for k in range(60)]
    assert entry.converted == {"encoded": 60000}
    assert read_info(tmp_path)["splits"]["train"] == entry.to_json()



def test_worker_count_does_not_change_the_shards(folder_shards, image_folder, tmp_path):
    """Converted inputs included: 1 worker writes exactly the bytes 2 workers wrote."""
    out, entry = folder_shards
    again = build_shards(f"imagefolder:{image_folder}", tmp_path, samples_per_shard=5, seed=3, workers=1,
                         show_progress=False)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in entry.shards]


def test_undecodable_file_names_are_handled(tmp_path, foolbox_jpegs):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / os.fsdecode(b"caf\xe9.JPEG")).write_bytes(foolbox_jpegs[0].read_bytes())  # Latin-1 name
    entry = build_shards(f"imagefolder:{src}", tmp_path / "out", show_progress=False)
    assert entry.copied == 1 and verify(tmp_path / "out") == []
