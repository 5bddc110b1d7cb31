"""Enumerating sources: the Fashion-MNIST package, ImageNet train and val layouts, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from shards.sources import (
    FASHION_MNIST_CLASSES,
    SourceError,
    SourceSpec,
    list_inputs,
    load_fashion_mnist,
    parse_source,
)
from tests.shards.conftest import EMPTY_CLASS, SYNSETS


def test_fashion_mnist_reader_matches_the_published_dataset(fashion_mnist_dir):
    train_x, train_y = load_fashion_mnist(str(fashion_mnist_dir), "train")
    test_x, test_y = load_fashion_mnist(str(fashion_mnist_dir), "test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    # published facts: 6000 / 1000 images per class; pixel mean 0.2860 of 255 (train)
    assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10
    assert abs(train_x.mean() / 255 - 0.2860) < 1e-3
    assert len(FASHION_MNIST_CLASSES) == 10


def test_fashion_mnist_part_follows_the_split(fashion_mnist_dir):
    assert parse_source(f"fashion-mnist:{fashion_mnist_dir}", "train").part == "train"
    assert parse_source(f"fashion-mnist:{fashion_mnist_dir}", "val").part == "test"
    assert parse_source(f"fashion-mnist:{fashion_mnist_dir}:train", "val").part == "train"
    assert parse_source("fashion-mnist:", "train").path == str(fashion_mnist_dir)


def test_imagefolder_lists_every_file_and_reports_the_rest(image_folder):
    listing = list_inputs(parse_source(f"imagefolder:{image_folder}", "train"))
    assert listing.class_names == sorted(SYNSETS + [EMPTY_CLASS])
    assert listing.empty_classes == [EMPTY_CLASS]
    assert len(listing.inputs) == 26  # 20 real + 6 awkward image names (the .txt is not an image)
    assert listing.skipped == [{"input": f"{SYNSETS[1]}/notes.txt", "reason": "not an image file name"}]
    for rel, cls in zip(listing.inputs, listing.labels, strict=True):
        assert rel.split("/")[0] == listing.class_names[cls]


def test_imagenet_val_labels_formats(tmp_path, foolbox_jpegs):
    for i, src in enumerate(foolbox_jpegs[:6]):
        (tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(src.read_bytes())
    labels = tmp_path / "LOC_val_solution.csv"  # Kaggle's layout: header, id without extension
    labels.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{SYNSETS[i % 3]} 10 20 30 40\n" for i in range(5))
        + "ILSVRC2012_val_00000099,n01440764 1 2 3 4\n")
    listing = list_inputs(parse_source(f"imagenet-val:{tmp_path},{labels}", "val"),
                          class_names=SYNSETS)
    assert listing.inputs == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(5)]
    assert listing.labels == [i % 3 for i in range(5)]
    reasons = {s["input"]: s["reason"] for s in listing.skipped}
    assert reasons["ILSVRC2012_val_00000099"] == "listed in LOC_val_solution.csv but not found"
    assert reasons["ILSVRC2012_val_00000005.JPEG"] == "no label in LOC_val_solution.csv"
    assert listing.empty_classes == [SYNSETS[3]]


def test_imagenet_val_plain_lines_with_ids(tmp_path, foolbox_jpegs):
    for i, src in enumerate(foolbox_jpegs[:3]):
        (tmp_path / f"v{i}.JPEG").write_bytes(src.read_bytes())
    labels = tmp_path / "labels.txt"
    labels.write_text("# file class\nv0.JPEG 2\nv1.JPEG 0\n\nv2.JPEG 7\n")
    (tmp_path / "sub").mkdir()
    listing = list_inputs(parse_source(f"imagenet-val:{tmp_path},{labels}", "val"))
    assert listing.labels == [2, 0, 7] and listing.class_names == [str(i) for i in range(8)]
    assert listing.skipped == [{"input": "sub", "reason": "a folder in the flat image folder"},
                               {"input": "labels.txt", "reason": "no label in labels.txt"}]


@pytest.mark.parametrize("source", ["imagefolder:/does/not/exist", "imagenet-val:/nope,/nope.txt",
                                    "fashion-mnist:/does/not/exist", "folder:/tmp", "/tmp"])
def test_bad_sources_are_one_line_errors(source):
    with pytest.raises(SourceError) as err:
        parse_source(source, "train")
    assert "\n" not in str(err.value) and source.split(":")[-1].split(",")[0] in str(err.value)


def test_imagefolder_reports_stray_files_and_hidden_folders(tmp_path, foolbox_jpegs):
    (tmp_path / "cls").mkdir()
    (tmp_path / ".cache").mkdir()
    (tmp_path / "cls" / "a.JPEG").write_bytes(foolbox_jpegs[0].read_bytes())
    (tmp_path / "README").write_text("x")
    listing = list_inputs(parse_source(f"imagefolder:{tmp_path}", "train"))
    assert listing.inputs == ["cls/a.JPEG"] and listing.class_names == ["cls"]
    assert listing.skipped == [{"input": ".cache", "reason": "hidden folder, not a class"},
                               {"input": "README", "reason": "not inside a class folder"}]


def test_to_arg_parses_back_to_the_same_spec(image_folder, fashion_mnist_dir, tmp_path):
    """What `verify` prints as the repair command's --source must give the same build fingerprint."""
    labels = tmp_path / "labels.txt"
    labels.write_text("")
    for source, split in ((f"imagefolder:{image_folder}", "train"),
                          (f"imagenet-val:{tmp_path},{labels}", "val"),
                          ("fashion-mnist:", "train"), ("fashion-mnist:", "val"),
                          (f"fashion-mnist:{fashion_mnist_dir}:train", "val")):
        spec = parse_source(source, split)
        assert parse_source(spec.to_arg(), split) == spec == SourceSpec.from_json(spec.to_json())


@pytest.mark.parametrize(("source", "says"), [
    ("fashion-mnist::val", "the part after the last ':' must be \"train\" or \"test\", got 'val'"),
    ("fashion-mnist:/no/such:TEST", "got 'TEST'"),
    ("imagenet-val:/data/val", "the labels file part is missing"),
    ("imagenet-val:,/data/labels.txt", "the image folder part (before the comma) is empty"),
    ("imagefolder:", "the folder path after 'imagefolder:' is empty"),
    ("imagefolders:/data", "unknown kind 'imagefolders'"),
])
def test_a_malformed_spec_names_the_part_that_is_wrong(source, says):
    with pytest.raises(SourceError) as err:
        parse_source(source, "train")
    assert str(err.value).startswith(f"--source {source!r}: ") and says in str(err.value)


def test_a_fashion_mnist_folder_may_hold_a_colon(fashion_mnist_dir, tmp_path):
    folder = tmp_path / "fm:copy"
    folder.mkdir()
    for f in fashion_mnist_dir.glob("t10k-*"):
        (folder / f.name).symlink_to(f)
    expected = SourceSpec("fashion-mnist", str(folder), part="test")
    assert parse_source(f"fashion-mnist:{folder}", "val") == expected
