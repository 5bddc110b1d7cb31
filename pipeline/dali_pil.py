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
    return dmath.floor(fn.coord_transform(img, M=L_WEIGHTS, T=[0.5], dtype=types.FLOAT))


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
    total = fn.cast(fn.reductions.sum(_luma_float(img)), dtype=types.FLOAT64)
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


# PIL's hue before the shift is h = B + s * q in float32 (Convert.c rgb2hsv_row: bc - gc, or
# 2.0 + rc - bc / 4.0 + gc - rc computed in double and stored as float), where q = (max - mid) / (max
# - min) is the middle channel's float quotient (the minimum channel's is exactly 1) and (B, s)
# depend on the order of r, g, b only: here indexed by 4 (r >= g) + 2 (g >= b) + (b >= r). Ties pick
# either neighbouring sextant, which gives the same 8-bit hue (the exhaustive test checks it); all
# three equal (grey, 7) must give 0.
_SEXTANT_B = [0.0, 3.0, 1.0, 3.0, -1.0, 5.0, 1.0, 0.0]
_SEXTANT_S = [1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0]
# hsv2rgb's lookup key: the 8-bit hue before the shift + shift + _HUE_OFFSET, so the table itself
# wraps modulo 256 (shifts are within +-25: int(0.1 * 255))
_HUE_OFFSET = 32
_HUE_KEYS = 256 + 2 * _HUE_OFFSET


@cache
def _hsv_weights() -> list[float]:
    """Per lookup key (RGB channel c times `_HUE_KEYS`, plus `_HUE_OFFSET` + shifted 8-bit hue h):
    the w in ``round(v * (1 - s * w))`` that PIL's hsv2rgb gives that channel (Convert.c: v is w = 0,
    p is 1, q is f, t is 1 - f, picked by the sector)."""
    weights: list[list[float]] = [[], [], []]
    for key in range(_HUE_KEYS):
        h = (key - _HUE_OFFSET) % 256
        i = math.floor(h * 6.0 / 255.0)
        f = float(np.float32(h * 6.0 / 255.0 - i))
        v, p, q, t = 0.0, 1.0, f, 1.0 - f
        rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6]
        for channel, w in zip(weights, rgb, strict=True):
            channel.append(w)
    return weights[0] + weights[1] + weights[2]


def hue(img, factor, device: str = "cpu"):
    """torchvision ``adjust_hue``: PIL's RGB -> HSV (8-bit H and S), H + int(factor * 255) mod 256,
    HSV -> RGB, in PIL's float precision (Convert.c rgb2hsv_row / hsv2rgb)."""
    r, g, b = img[:, :, 0:1], img[:, :, 1:2], img[:, :, 2:3]  # HW1 planes (HWC layout)
    high, low = dmath.max(r, g), dmath.min(r, g)
    maxc, minc, mid = dmath.max(high, b), dmath.min(low, b), dmath.max(low, dmath.min(high, b))
    cr = maxc - minc
    q = (maxc - mid) / dmath.max(cr, 1)  # float32, as PIL's; grey pixels: 0, and sextant 7 gives h 0
    sextant = (r >= g) * 4 + (g >= b) * 2 + (b >= r)
    h = (fn.lookup_table(sextant, keys=list(range(8)), values=_SEXTANT_S, dtype=types.FLOAT) * q
         + fn.lookup_table(sextant, keys=list(range(8)), values=_SEXTANT_B, dtype=types.FLOAT))
    turn = fn.cast(h, dtype=types.FLOAT64) / 6.0 + 1.0
    turn = fn.cast(fn.cast(turn - (turn >= 1.0), dtype=types.FLOAT), dtype=types.FLOAT64)  # fmod, as float
    # np.int32(hue * 255) truncates towards zero; the uint8 wrap-around is in the table
    shift = fn.cast(factor, dtype=types.FLOAT64) * 255.0
    shift = dmath.floor(dmath.abs(shift)) * (1.0 - 2.0 * (shift < 0.0)) + _HUE_OFFSET
    h8 = turn * 255.0  # (int)(h * 255.0) in double: floored, plus the shift, as a key
    if device == "gpu":  # the GPU's cast rounds halves to even: floor first, then the cast is exact
        key = fn.cast(dmath.floor(h8) + shift, dtype=types.INT32)
    else:  # the CPU's rounds halves away from zero: round(x - 1/2) == floor(x) for x >= 1/2
        key = fn.cast(h8 + (shift - 0.5), dtype=types.INT32)
    s8 = dmath.floor(fn.cast(cr / dmath.max(maxc, 1), dtype=types.FLOAT64) * 255.0)
    fs = fn.cast(s8 / 255.0, dtype=types.FLOAT)
    # one key per channel (HW1 + [3] broadcasts to HWC), each channel's weights in its own table range
    keys = key + types.Constant(np.array([0, _HUE_KEYS, 2 * _HUE_KEYS], dtype=np.int32))
    weight = fn.lookup_table(keys, keys=list(range(3 * _HUE_KEYS)), values=_hsv_weights(), dtype=types.FLOAT)
    return _round_u8(maxc * (1.0 - fs * weight))


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
