"""Decide, per input, whether its bytes are copied, converted to RGB JPEG, or skipped.

Copied byte-for-byte (no re-encode by default: it changes pixel statistics):
complete 8-bit, 3-component, Huffman-coded JPEGs (baseline, extended sequential or progressive;
every decoder the pipeline uses reads them). Everything else that decodes (CMYK or grayscale JPEGs,
PNG or other formats, whatever their file name, 16-bit images) is converted to RGB JPEG at
``quality``, with the reason counted. Empty, truncated or undecodable files are skipped with the
reason. The JPEG check parses only the marker segments up to the first scan and looks for the EOI
marker after it, so copying needs no decode; truncated files lack EOI (entropy-coded data cannot
contain ``FF D9``: every ``FF`` in it is stuffed).
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
from PIL import Image

HEAD_BYTES = 1 << 13  # the header segments of most JPEGs fit; otherwise the whole file is read
TAIL_BYTES = 1 << 12
# SOF markers: C0 baseline, C1 extended sequential, C2 progressive (Huffman); the rest are lossless,
# hierarchical or arithmetic-coded, which some decoders (nvJPEG) do not read.
COPYABLE_SOF = {0xC0, 0xC1, 0xC2}
ALL_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_MARKER = struct.Struct(">BBH")  # 0xFF, marker, segment length (meaningless for length-less markers)
_SOF = struct.Struct(">BHHB")  # precision, height, width, components
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class InputError(ValueError):
    """An input that cannot become a sample; the message is the reason recorded in ``skipped``."""


@dataclass(frozen=True)
class JpegHeader:
    sof: int
    precision: int
    height: int
    width: int
    components: int
    sos: int  # offset of the first start-of-scan marker


def parse_jpeg_header(data: bytes) -> JpegHeader | None:
    """Marker segments of a JPEG up to its first scan; None when `data` does not hold them all."""
    if data[:2] != b"\xff\xd8":
        return None
    sof: tuple[int, int, int, int, int] | None
    pos, sof, end = 2, None, len(data)
    while pos + 4 <= end:
        prefix, marker, seglen = _MARKER.unpack_from(data, pos)  # one call: this loop runs per input
        if prefix != 0xFF:
            return None
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker == 0xDA:
            return JpegHeader(*sof, pos) if sof else None
        else:
            if marker in ALL_SOF and pos + 10 <= end:
                sof = (marker, *_SOF.unpack_from(data, pos + 4))
            pos += 2 + seglen
    return None


def is_copyable(header: JpegHeader | None, max_side: int | None) -> TypeGuard[JpegHeader]:
    return (header is not None and header.sof in COPYABLE_SOF and header.precision == 8
            and header.components == 3 and header.width > 0 and header.height > 0
            and (max_side is None or max(header.width, header.height) <= max_side))


def _has_eoi(data: bytes, start: int) -> bool:
    return data.rfind(b"\xff\xd9", start) >= 0


def probe_file(path: str, max_side: int | None = None) -> str:
    """``copy``, ``convert:<reason>`` or ``skip:<reason>`` for one file, reading as little as it can.

    A copyable JPEG costs two small reads (its head and tail); anything else is read and decoded.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEAD_BYTES, 0)
            header = parse_jpeg_header(head)
            if is_copyable(header, max_side) and size > len(head):
                start = max(size - TAIL_BYTES, header.sos)
                if _has_eoi(os.pread(fd, size - start, start), 0):
                    return "copy"
            data = head if size <= len(head) else os.pread(fd, size, 0)
        finally:
            os.close(fd)
    except OSError as err:
        return f"skip:unreadable file ({err.strerror})"
    return probe_bytes(data, max_side)


def probe_files(paths: list[str], max_side: int | None = None) -> list[str]:
    """`probe_file` for a batch of paths (one task for a worker pool)."""
    return [probe_file(path, max_side) for path in paths]


def probe_bytes(data: bytes, max_side: int | None = None) -> str:
    """The decision of `probe_file` for bytes already in memory (decodes when not copyable)."""
    try:
        _, decision = prepare(data, max_side=max_side, quality=None)
    except InputError as err:
        return f"skip:{err}"
    return decision


def prepare(data: bytes, *, max_side: int | None, quality: int | None) -> tuple[bytes | None, str]:
    """(sample image bytes, decision) for an input's bytes; with ``quality=None`` only decide.

    Raises:
        InputError: the input is empty, truncated or does not decode.
    """
    if not data:
        raise InputError("empty file")
    header = parse_jpeg_header(data)
    if is_copyable(header, max_side) and _has_eoi(data, header.sos):
        return data, "copy"
    if header is not None and not _has_eoi(data, header.sos):
        raise InputError("truncated JPEG (no end-of-image marker)")
    try:
        img = Image.open(io.BytesIO(data))
        reason = _conversion_reason(img, header, data, max_side)
        if quality is None:
            img.load()  # a full decode proves the input readable
            return None, f"convert:{reason}"
        return encode_jpeg(_to_rgb(img, max_side), quality), f"convert:{reason}"
    except Exception as err:  # PIL's plugins raise many types on corrupt files; each means "unreadable"
        # without object addresses ("<_io.BytesIO object at 0x7f...>"): the reason goes into the
        # manifest, which two builds of the same source must write byte for byte
        message = _ADDRESS.sub("", str(err))
        raise InputError(f"does not decode ({type(err).__name__}: {message})") from None


def _conversion_reason(img: Image.Image, header: JpegHeader | None, data: bytes,
                       max_side: int | None) -> str:
    png_16bit = img.format == "PNG" and len(data) > 24 and data[24] == 16
    if img.mode in SIXTEEN_BIT_MODES or png_16bit or (header is not None and header.precision > 8):
        return "16-bit"
    if img.mode == "CMYK":
        return "cmyk"
    if img.format == "JPEG" and img.mode == "L":
        return "grayscale"
    if img.format == "PNG":
        return "png"
    if img.format != "JPEG":
        return "other-format"
    if max_side is not None and max(img.size) > max_side and img.mode == "RGB":
        return "resized"
    return "jpeg-coding"


def _to_rgb(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is not None and max(img.size) > max_side:
        img.draft("RGB", (max_side, max_side))  # JPEG DCT scaling: decode no larger than needed
    if img.mode in SIXTEEN_BIT_MODES:
        # 16-bit samples span 0..65535; PIL's convert would clip them to 255 (white).
        scaled = np.clip(np.asarray(img, dtype=np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(scaled)
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    img = img.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def encode_array(pixels: np.ndarray, quality: int) -> bytes:
    """Grayscale uint8 [H, W] pixels (Fashion-MNIST) as an RGB JPEG: the decode path of real images."""
    return encode_jpeg(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("RGB"), quality)
