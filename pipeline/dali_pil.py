"""torchvision's PIL augmentation functions (docs/method.md §5.3) rebuilt from DALI operators.

The default DALI train graph (`pipeline.dali_graph`) applies these, so it computes what the reference
backend (`pipeline.reference`: torchvision on PIL images) computes, rounding included. Every function
takes and returns uint8 HWC images; `tests/pipeline/test_pil_ops.py` compares each with torchvision /
PIL on real photos and states the tolerances (differences come from float ties, not from the maths).

- `brightness`, `contrast`, `saturation`: PIL's ``ImageEnhance`` blends ``a + f * (x - a)`` against
  black, the rounded mean of the image's "L" conversion, or each pixel's "L" value, truncated to uint8
  as ``Image.blend`` does (not rounded).
- `hue`: torchvision's ``adjust_hue``: PIL's 8-bit HSV round trip with the hue channel shifted by
  ``int(hue * 255)`` modulo 256. DALI's own ``hsv``/``color_twist`` rotate hue linearly in YIQ, which
  is a different function (several grey levels apart at the recipe's strength).
- `grayscale`: PIL's ``convert("L")`` (ITU-R 601-2 luma in 16-bit fixed point) on all three channels.
- `gaussian_blur`: PIL's ``GaussianBlur`` is not a Gaussian kernel but three passes of an extended box
  filter per axis, each rounded to uint8, clamping at the edges; here six 1-D ``fn.filter`` passes
  with PIL's own weights (a true Gaussian of the same sigma differs by 0.4-0.8 grey levels on average).

Rounding to uint8: ``brightness_contrast`` with ``dtype=UINT8`` rounds half away from zero and
saturates; a shift of -0.5 turns that into PIL's truncation of a non-negative value, exactly.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from pipeline import augment as aug

# PIL's "L" weights (Convert.c: L24 = 19595 R + 38470 G + 7471 B + 0x8000, then >> 16). As floats
# over 65536 every product and sum is exact in float32, and coord_transform's rounding cast adds the
# 0x8000 half.
L_WEIGHTS = [19595 / 65536, 38470 / 65536, 7471 / 65536]
_FLOOR = -0.5 / 255  # brightness_shift in units of the uint8 range: round(y - 0.5) == floor(y)
_BLUR_PASSES = 3  # ImageFilter.GaussianBlur's default (BoxBlur.c: ImagingGaussianBlur)
_ONE = float(1 << 24)  # BoxBlur.c weights are 24-bit fixed point


def _floor_u8(img, device: str = "cpu"):
    """uint8 of ``floor(clamp(img, 0, 255))``: how Image.blend stores a float result.

    On the CPU ``brightness_contrast`` rounds halves away from zero, so a -0.5 shift makes its one
    cheap conversion a floor. DALI's GPU kernels round halves to even instead, so there the value is
    floored first and the cast only converts whole numbers (exact in any rounding mode)."""
    if device == "gpu":
        return fn.cast(dmath.floor(img), dtype=types.UINT8)
    return fn.brightness_contrast(img, brightness_shift=_FLOOR, dtype=types.UINT8)


def _round_u8(img):
    """uint8 of ``round(clamp(img, 0, 255))`` (C's round, halves away from zero, on the CPU; DALI's
    GPU kernels round exact halves to even, which hsv2rgb's products do not produce in practice)."""
    return fn.brightness_contrast(img, dtype=types.UINT8)


def _luma_float(img):
    """PIL's "L" of a uint8 HWC image as whole numbers in float, HW1: ``floor(L24 / 2^16 + 1/2)``."""
    return dmath.floor(fn.coord_transform(img, M=L_WEIGHTS, dtype=types.FLOAT) + 0.5)


def luma(img, device: str = "cpu"):
    """PIL's ``convert("L")`` of a uint8 HWC image, uint8 HW1 (coord_transform's rounding cast is
    PIL's + 0x8000 on the CPU; on the GPU it would round halves to even)."""
    if device == "gpu":
        return fn.cast(_luma_float(img), dtype=types.UINT8)
    return fn.coord_transform(img, M=L_WEIGHTS, dtype=types.UINT8)


def brightness(img, factor, device: str = "cpu"):
    """torchvision ``adjust_brightness`` (ImageEnhance.Brightness: a blend with black)."""
    if device == "gpu":
        return _floor_u8(img * factor, device)
    return fn.brightness_contrast(img, brightness=factor, brightness_shift=_FLOOR)


def contrast(img, factor, device: str = "cpu"):
    """torchvision ``adjust_contrast`` (ImageEnhance.Contrast): a blend with the grey level
    ``int(mean(L) + 0.5)`` (ImageStat's mean, in double: the exact float32 sum of "L" over the pixel
    count).

    Written with arithmetic operators, the same float32 operations as Image.blend: DALI's
    ``brightness_contrast`` folds the pivot into one multiply-add whose rounding differs from PIL's
    for about 0.5% of colours (one grey level), and takes the pivot only as a CPU argument.
    """
    shape = img.shape()
    pixels = fn.cast(shape[0] * shape[1], dtype=types.FLOAT64)
    total = fn.cast(fn.reductions.sum(luma(img, device), dtype=types.FLOAT), dtype=types.FLOAT64)
    pivot = fn.cast(dmath.floor(total / pixels + 0.5), dtype=types.FLOAT)
    return _floor_u8(pivot + factor * (img - pivot), device)


def saturation(img, factor, device: str = "cpu"):
    """torchvision ``adjust_saturation`` (ImageEnhance.Color: a blend with each pixel's "L")."""
    gray = _luma_float(img)
    return _floor_u8(gray + factor * (img - gray), device)


def grayscale(img, device: str = "cpu"):
    """torchvision ``rgb_to_grayscale(img, 3)``: PIL's "L" in all three channels."""
    gray = luma(img, device)
    return fn.cat(gray, gray, gray, axis=2)


@cache
def _hsv_weights() -> tuple[list[float], list[float], list[float]]:
    """Per RGB channel and 8-bit hue h: the w in ``round(v * (1 - s * w))`` that PIL's hsv2rgb
    gives that channel (Convert.c: v is w = 0, p is 1, q is f, t is 1 - f, picked by the sector)."""
    weights: tuple[list[float], list[float], list[float]] = ([], [], [])
    for h in range(256):
        i = math.floor(h * 6.0 / 255.0)
        f = float(np.float32(h * 6.0 / 255.0 - i))
        v, p, q, t = 0.0, 1.0, f, 1.0 - f
        rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6]
        for channel, w in zip(weights, rgb, strict=True):
            channel.append(w)
    return weights


def hue(img, factor):
    """torchvision ``adjust_hue``: PIL's RGB -> HSV (8-bit H and S), H + int(factor * 255) mod 256,
    HSV -> RGB, in PIL's float precision (Convert.c rgb2hsv_row / hsv2rgb); the same operators on
    either device."""
    r, g, b = img[:, :, 0:1], img[:, :, 1:2], img[:, :, 2:3]  # HW1 planes (HWC layout)
    maxc = dmath.max(r, dmath.max(g, b))
    cr = maxc - dmath.min(r, dmath.min(g, b))
    nonzero = dmath.max(cr, 1)  # grey pixels: PIL sets H = S = 0, which the formulas below give
    rc, gc, bc = ((maxc - c) / nonzero for c in (r, g, b))  # float32 quotients, as PIL's
    rc64, gc64, bc64 = (fn.cast(c, dtype=types.FLOAT64) for c in (rc, gc, bc))
    # PIL's three branches: float h = bc - gc, or 2.0 + rc - bc / 4.0 + gc - rc in double stored as float
    on_r = r == maxc
    on_g = (r != maxc) & (g == maxc)
    on_b = (r != maxc) & (g != maxc)
    h = ((bc - gc) * on_r + fn.cast(2.0 + rc64 - bc64, dtype=types.FLOAT) * on_g
         + fn.cast(4.0 + gc64 - rc64, dtype=types.FLOAT) * on_b)  # exactly one term is non-zero
    turn = fn.cast(h, dtype=types.FLOAT64) / 6.0 + 1.0
    turn = fn.cast(fn.cast(turn - dmath.floor(turn), dtype=types.FLOAT), dtype=types.FLOAT64)  # float h
    h8 = dmath.floor(turn * 255.0)  # (int)(fmod(h / 6 + 1, 1) * 255), the product in double
    s8 = dmath.floor(fn.cast(cr / dmath.max(maxc, 1), dtype=types.FLOAT64) * 255.0)
    # np.int32(hue * 255) truncates towards zero; the uint8 addition wraps
    shift = fn.cast(factor, dtype=types.FLOAT64) * 255.0
    shift = dmath.floor(dmath.abs(shift)) * (1.0 - 2.0 * (shift < 0.0))
    h8 = h8 + shift
    h8 = fn.cast(h8 - 256.0 * dmath.floor(h8 / 256.0), dtype=types.INT32)
    fs = fn.cast(s8 / 255.0, dtype=types.FLOAT)
    planes = [_round_u8(maxc * (1.0 - fs * fn.lookup_table(h8, keys=list(range(256)), values=w,
                                                            dtype=types.FLOAT)))
              for w in _hsv_weights()]
    return fn.cat(*planes, axis=2)


def _box_radius_max() -> int:
    """The largest integer box radius PIL uses for sigma up to `aug.SIGMA[1]` (the kernel size)."""
    sigma2 = aug.SIGMA[1] ** 2 / _BLUR_PASSES
    return math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)


def box_kernel(sigma):
    """PIL's 1-D extended box filter for GaussianBlur(radius=sigma) (BoxBlur.c
    _gaussian_blur_radius and ImagingHorizontalBoxBlur), as float taps over a fixed width: box
    radius r = l + a, weight ww = (int)(2^24 / (2 r + 1)) on the 2 l + 1 inner pixels and
    fw = (2^24 - (2 l + 1) ww) / 2 on the two next ones, in units of 2^-24 (exact in float32)."""
    sigma2 = sigma * sigma / float(_BLUR_PASSES)  # float32, as BoxBlur.c
    length = fn.cast(dmath.sqrt(12.0 * fn.cast(sigma2, dtype=types.FLOAT64) + 1.0), dtype=types.FLOAT)
    inner = dmath.floor((length - 1.0) / 2.0)
    frac = (2.0 * inner + 1.0) * (inner * (inner + 1.0) - 3.0 * sigma2)
    frac = frac / (6.0 * (sigma2 - (inner + 1.0) * (inner + 1.0)))
    ww = dmath.floor(_ONE / ((inner + frac) * 2.0 + 1.0))
    fw = dmath.floor((_ONE - (2.0 * fn.cast(inner, dtype=types.FLOAT64) + 1.0) * ww) / 2.0)
    fw = fn.cast(fw, dtype=types.FLOAT)
    reach = _box_radius_max() + 1
    taps = [(ww * (inner >= abs(k)) + fw * (inner + 1.0 == abs(k))) / _ONE for k in range(-reach, reach + 1)]
    return fn.stack(*taps)


def gaussian_blur(img, sigma, device: str = "cpu"):
    """PIL ``ImageFilter.GaussianBlur(sigma)``: three box passes along x, then three along y."""
    taps = box_kernel(sigma)
    width = 2 * _box_radius_max() + 3
    across, down = fn.reshape(taps, shape=[1, width]), fn.reshape(taps, shape=[width, 1])
    if device == "gpu":
        across, down = across.gpu(), down.gpu()
    for kernel in (across, down):
        for _ in range(_BLUR_PASSES):
            img = fn.filter(img, kernel, border="clamp")
    return img
