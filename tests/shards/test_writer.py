"""The hand-assembled tar members are exactly what the standard library's `tarfile` writes."""

from __future__ import annotations

import io
import tarfile

import pytest

from shards.manifest import BuildError
from shards.sources import SourceSpec
from shards.writer import ShardTask, sample_image, tar_end, tar_member


def test_members_and_end_match_tarfile_byte_for_byte():
    members = [("000000000000.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("000000000000.cls", b"0000000003"),
               ("000000000000.idx", b"000000000000"), ("000000000001.jpg", b""),
               ("000000000001.cls", bytes(512)), ("000000000001.idx", bytes(1024 + 1))]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    ours = b"".join(b"".join(tar_member(name, data)) for name, data in members)
    ours += tar_end(len(ours))
    assert ours == expected.getvalue()


def test_an_input_changed_after_the_scan_stops_the_build(tmp_path, foolbox_jpegs):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.JPEG").write_bytes(foolbox_jpegs[0].read_bytes()[:5000])  # truncated since
    task = ShardTask(str(tmp_path), "train", 0, SourceSpec("imagefolder", str(tmp_path)), 0,
                     ["a/x.JPEG", "a/gone.JPEG"], [0, 0], ["copy", "copy"], None, 95)
    with pytest.raises(BuildError, match="a/x.JPEG: changed during the build"):
        sample_image(task, 0)
    with pytest.raises(BuildError, match=r"a/gone.JPEG: changed during the build .*unreadable file"):
        sample_image(task, 1)
