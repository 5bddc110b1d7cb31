"""Per-input decisions: real JPEGs are copied, what ImageNet contains is converted, broken is skipped."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shards.convert import encode_array, prepare, probe_bytes, probe_file
from tests.shards.conftest import awkward_inputs

EXPECTED = {
    "cmyk.JPEG": "convert:cmyk",
    "gray.JPEG": "convert:grayscale",
    "png_named.JPEG": "convert:png",
    "sixteen.png": "convert:16-bit",
    "truncated.JPEG": "skip:truncated JPEG (no end-of-image marker)",
    "empty.JPEG": "skip:empty file",
}


def test_real_imagenet_jpegs_are_copied_byte_for_byte(foolbox_jpegs):
    for path in foolbox_jpegs:
        data = path.read_bytes()
        assert probe_file(str(path)) == "copy"
        assert prepare(data, max_side=None, quality=95) == (data, "copy")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_awkward_inputs_get_the_right_decision(name, foolbox_jpegs, tmp_path):
    data = awkward_inputs(foolbox_jpegs[0])[name]
    path = tmp_path / name
    path.write_bytes(data)
    # the scan (head + tail read) and the writer (whole bytes) must agree
    assert probe_file(str(path)) == probe_bytes(data) == EXPECTED[name]


@pytest.mark.parametrize("name", ["cmyk.JPEG", "gray.JPEG", "png_named.JPEG", "sixteen.png"])
def test_converted_inputs_become_rgb_jpegs(name, foolbox_jpegs):
    out, _ = prepare(awkward_inputs(foolbox_jpegs[0])[name], max_side=None, quality=95)
    img = Image.open(io.BytesIO(out))
    assert (img.format, img.mode) == ("JPEG", "RGB")


def test_sixteen_bit_is_scaled_not_clipped(foolbox_jpegs):
    out, _ = prepare(awkward_inputs(foolbox_jpegs[0])["sixteen.png"], max_side=None, quality=95)
    row = np.asarray(Image.open(io.BytesIO(out)).convert("L"), dtype=float)[16]
    # the ramp 0..65535 must come out as 0..255, not as mostly white (PIL's convert clips at 255)
    assert row[0] < 8 and row[-1] > 247 and abs(row[32] - 130) < 8


def test_garbage_behind_a_jpeg_name_is_skipped(tmp_path):
    path = tmp_path / "garbage.JPEG"
    path.write_bytes(b"\x00\x01garbage" * 100)
    assert probe_file(str(path)).startswith("skip:does not decode")


def test_the_skip_reason_is_the_same_in_every_process(tmp_path):
    """The reason is written into _info.json: no object address (PIL names its BytesIO) in it."""
    path = tmp_path / "garbage.JPEG"
    path.write_bytes(b"\x00\x01garbage" * 100)
    reason = probe_file(str(path))
    assert reason == ("skip:does not decode (UnidentifiedImageError: cannot identify image file "
                      "<_io.BytesIO object>)")
    assert probe_file(str(path)) == reason


def test_jpeg_with_trailing_bytes_after_eoi_is_still_copied(foolbox_jpegs, tmp_path):
    data = foolbox_jpegs[1].read_bytes() + b"\x00" * 10000  # longer than the tail that is read first
    path = tmp_path / "trailing.JPEG"
    path.write_bytes(data)
    assert probe_file(str(path)) == "copy"


def test_max_side_resizes_larger_images_only(foolbox_jpegs):
    data = foolbox_jpegs[2].read_bytes()  # 512 x 512
    out, decision = prepare(data, max_side=200, quality=90)
    assert decision == "convert:resized"
    assert Image.open(io.BytesIO(out)).size == (200, 200)
    assert prepare(data, max_side=512, quality=90) == (data, "copy")


def test_fashion_pixels_become_an_rgb_jpeg_close_to_the_original():
    pixels = np.tile(np.arange(0, 252, 9, dtype=np.uint8), (28, 1))
    img = Image.open(io.BytesIO(encode_array(pixels, 95)))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (28, 28))
    assert np.abs(np.asarray(img.convert("L"), dtype=float) - pixels).mean() < 3


def test_jpeg_with_a_header_larger_than_the_first_read_is_copied(foolbox_jpegs, tmp_path):
    data = foolbox_jpegs[3].read_bytes()
    app = b"\xff\xe1" + (2 + 30000).to_bytes(2, "big") + b"Exif\0\0" + bytes(29994)  # big EXIF segment
    path = tmp_path / "exif.JPEG"
    path.write_bytes(data[:2] + app + data[2:])
    assert probe_file(str(path)) == "copy"
