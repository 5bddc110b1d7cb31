"""DALI pipeline definitions: the webdataset reader, train views (method.md §5.3) and eval preprocessing.

Every random draw comes from DALI's own seeded generators (pipeline seed derived from (seed,
epoch, rank)), so a pipeline rebuilt with the same arguments and run to batch k reproduces batch k
bit for bit; the loader's resume and corrupt-sample recovery rely on that. Once the loader knows
of corrupt samples it rebuilds the graph with a per-sample ``keep`` flag (external source, one
batch per iteration) that routes them around the decoder through DALI conditionals; they come
out as blank images and are dropped by the loader. Graphs without known-corrupt samples carry no
masking ops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import do_not_convert

from pipeline import augment as aug
from pipeline.plan import EpochPlan

READER = "reader"
SHUFFLE_BUFFER = 1024  # DALI's default initial_fill; our shards are globally pre-shuffled already
# RandomResizedCrop resamples with an antialiased bilinear filter, as PIL's (the reference) does.
# Off, DALI samples bilinearly without widening the filter when it downscales: a little faster on
# the CPU (BENCHMARKS.md), at the price of aliasing in crops shrunk by more than ~1.5x. Kept on:
# fidelity to the reference.
TRAIN_ANTIALIAS = True
_MEAN = [255 * m for m in aug.MEAN]
_STD = [255 * s for s in aug.STD]
KeepSource = Callable[[int], np.ndarray]  # batch number -> bool [batch_size]


def reader(plan: EpochPlan, reader_seed: int):
    """jpg|png bytes, cls digits, idx digits of this rank's contiguous share, in `plan` order."""
    return fn.readers.webdataset(
        paths=[str(s.tar) for s in plan.shards], index_paths=[str(s.index) for s in plan.shards],
        ext=["jpg;png", "cls", "idx"], missing_component_behavior="error",
        shard_id=plan.rank, num_shards=plan.world,
        random_shuffle=plan.train, initial_fill=max(1, min(SHUFFLE_BUFFER, plan.rank_samples)),
        seed=reader_seed, pad_last_batch=not plan.train, name=READER)


def _keep_input(keep: KeepSource):
    @do_not_convert
    def source(info):  # batch mode with batch_info: one call per iteration, in order
        return list(keep(info.iteration))
    return fn.external_source(source=source, batch=True, batch_info=True, dtype=types.BOOL)


def _blank(device: str):
    img = fn.reshape(fn.zeros(shape=[8, 8, 3], dtype=types.UINT8), layout="HWC")
    return img.gpu() if device == "gpu" else img


def _if_kept(flags, make, blank):
    """`make()` for kept samples and `blank()` for masked ones; with no flags (nothing known to
    be corrupt) just `make()`, so the graph carries no conditional."""
    if flags is None:
        return make()
    if flags:  # noqa: SIM108 -- an `if` statement is what DALI turns into a per-sample conditional
        out = make()
    else:
        out = blank()
    return out


def _decode(jpg, device: str):
    return fn.decoders.image(jpg, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _crop_view(decoded, spec: aug.ViewSpec):
    """RandomResizedCrop from the image decoded once for all views (decoding only each crop's
    region was slower on the CPU: BENCHMARKS.md, pipeline history)."""
    return fn.random_resized_crop(decoded, size=[spec.size, spec.size], random_area=list(spec.scale),
                                  random_aspect_ratio=list(aug.ASPECT), num_attempts=10,
                                  interp_type=types.INTERP_LINEAR, antialias=TRAIN_ANTIALIAS)


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _color(img, brightness, contrast, saturation, hue, device: str = "cpu"):
    """ColorJitter + grayscale as two cheap ops: brightness/contrast into float (contrast pivots
    on the image's mean luma, as torchvision's does), then hue/saturation as one 3x3 map on float,
    then one saturating cast back to uint8 (the clamp torchvision's uint8 PIL ops imply).
    DALI's one-op `color_twist` pivots contrast at a fixed grey (on float at 0.5). Matches
    torchvision's functions within 0.4-1.9 grey levels (tests/pipeline/test_augment.py) except
    hue: DALI rotates hue linearly in YIQ, torchvision in HSV (0.05 turn: 4.8 grey levels apart).
    On the GPU the pivot is mid-grey (128): the mean would be a GPU tensor, and DALI takes
    per-sample arguments from the CPU only (not checked on a GPU yet)."""
    if device == "gpu":
        luma = 128.0
    else:
        mean = fn.reductions.mean(img, axes=[0, 1])
        luma = aug.LUMA[0] * mean[0] + aug.LUMA[1] * mean[1] + aug.LUMA[2] * mean[2]
    out = fn.brightness_contrast(img, brightness=brightness, contrast=contrast, contrast_center=luma,
                                 dtype=types.FLOAT)
    out = fn.color_twist(out, saturation=saturation, hue=hue)
    return fn.cast(out, dtype=types.UINT8)


def _color_blur_flip(img, blur: bool, device: str, colour: bool = True):
    """docs/method.md §5.3 steps 2-6 on one view (uint8 HWC in, float CHW normalised out).

    Cost (2-core CPU, bench/pipeline.py --profile): each op runs only on the samples that draw it
    (DALI conditionals), and the blur runs last, on the normalised float CHW view, where DALI's
    CPU kernel is about 40% cheaper than on uint8 HWC. Blur, flip and the per-pixel colour maps
    commute (the kernel sums to 1), so the order changes only rounding and clamping.
    Deviations from torchvision, documented: jitter factors are applied in a fixed order (contrast,
    brightness, then hue and saturation as one linear map in DALI's approximation) rather than a
    random permutation, clamped once at the end rather than after each op; grayscale is
    saturation 0 in the same map (luma weights as PIL's "L"); blur radius is
    `aug.BLUR_RADIUS_SIGMAS`.
    """
    b, c, s, h = aug.JITTER
    jitter, gray = _coin(aug.P_JITTER), _coin(aug.P_GRAY)
    on = fn.cast(jitter, dtype=types.FLOAT)
    brightness = 1.0 + on * _uniform(-b, b)
    contrast = 1.0 + on * _uniform(-c, c)
    saturation = (1.0 + on * _uniform(-s, s)) * (1.0 - fn.cast(gray, dtype=types.FLOAT))
    hue = on * _uniform(-360 * h, 360 * h)
    if colour and jitter | gray:
        img = _color(img, brightness, contrast, saturation, hue, device)
    out = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=_MEAN, std=_STD,
                                   mirror=fn.random.coin_flip(probability=aug.P_FLIP))
    if blur:
        sigma = _uniform(*aug.SIGMA)
        window = fn.cast(2.0 * dmath.ceil(aug.BLUR_RADIUS_SIGMAS * sigma) + 1.0, dtype=types.INT32)
        if _coin(aug.P_BLUR):
            out = fn.gaussian_blur(out, sigma=sigma, window_size=window)
    return out


@pipeline_def(enable_conditionals=True)
def train_pipeline(plan: EpochPlan, specs: list[aug.ViewSpec], blur: bool, keep: KeepSource | None,
                   device: str, reader_seed: int, colour: bool = True):
    """Outputs: one float CHW view per spec, cls digits, idx digits, and keep flags when `keep`
    is given (without known-corrupt samples the graph has no masking conditional at all)."""
    jpg, cls, idx = reader(plan, reader_seed)
    flags = None if keep is None else _keep_input(keep)
    decoded = _if_kept(flags, lambda: _decode(jpg, device), lambda: _blank(device))  # once, for all views
    views = [_color_blur_flip(_crop_view(decoded, spec), blur, device, colour) for spec in specs]
    return (*views, cls, idx) if flags is None else (*views, cls, idx, flags)


_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _resize_shorter(img, shape, resize: int, interpolation: str):
    """Shorter side to `resize`, longer side truncated as torchvision's Resize(int) does
    (DALI's own `resize_shorter` rounds it, which shifts the center crop by a pixel)."""
    h, w = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
    scale = resize / dmath.min(h, w)
    # + 1e-3: h * (resize / h) must not floor to resize - 1 through rounding
    return fn.resize(img, resize_y=dmath.floor(h * scale + 1e-3), resize_x=dmath.floor(w * scale + 1e-3),
                     interp_type=_INTERP[interpolation], antialias=True)


@pipeline_def(enable_conditionals=True)
def eval_pipeline(plan: EpochPlan, image_size: int, resize: int, keep: KeepSource | None, device: str,
                  reader_seed: int, interpolation: str = "bilinear"):
    """Resize the shorter side to `resize` (bilinear, method.md §2.2, or bicubic, §7.1; antialiased
    like PIL), center crop `image_size`, normalise. Outputs: view, cls digits, idx digits[, keep
    flags]."""
    jpg, cls, idx = reader(plan, reader_seed)
    flags = None if keep is None else _keep_input(keep)
    img = _if_kept(flags, lambda: _resize_shorter(_decode(jpg, device), fn.peek_image_shape(jpg), resize,
                                                  interpolation),
                   lambda: fn.resize(_blank(device), size=[resize, resize]))
    view = fn.crop_mirror_normalize(img, crop=[image_size, image_size], dtype=types.FLOAT,
                                    output_layout="CHW", mean=_MEAN, std=_STD)
    return (view, cls, idx) if flags is None else (view, cls, idx, flags)


@pipeline_def
def raw_pipeline(plan: EpochPlan, reader_seed: int):
    """The reader alone (same arguments, same order): to find a corrupt sample's bytes and file."""
    jpg, _, idx = reader(plan, reader_seed)
    return jpg, idx, fn.get_property(jpg, key="source_info")
