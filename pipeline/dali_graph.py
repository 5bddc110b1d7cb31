"""DALI pipeline definitions: the webdataset reader, train views (docs/method.md §5.3) and eval preprocessing.

Train views. By default each view follows the official MoCo v2 recipe as the reference backend
(torchvision's PIL functions) computes it, op for op (`pipeline.dali_pil`): RandomResizedCrop; with
p 0.8 brightness, contrast, saturation and hue in a random order drawn per sample, each rounded to
uint8 as PIL rounds; grayscale with p 0.2; PIL's GaussianBlur on the uint8 image with p 0.5;
horizontal flip; normalisation. Each operation runs only on the samples that draw it (DALI
conditionals). ``data.fast_augment`` keeps the older, cheaper approximation (`_fast_colour_blur`), a
documented deviation that bench/pipeline.py measures separately.

Every random draw comes from DALI's own seeded generators (pipeline seed derived from (seed,
epoch, rank)), so a pipeline rebuilt with the same arguments and run to batch k reproduces batch k
bit for bit; the loader's resume and corrupt-sample recovery rely on that. Once the loader knows
of corrupt samples it rebuilds the graph with a per-sample ``keep`` flag (external source, one
batch per iteration) that routes them around the decoder through DALI conditionals; they come
out as blank images and are dropped by the loader. Graphs without known-corrupt samples carry no
masking ops.

``train_pipeline(..., probe=True)`` also outputs the decoded images and, per view, the draws behind
it (`PROBE_FIELDS`), so the tests can rebuild every view with torchvision and compare. The probe
only adds outputs, made after every random operator, so its views are the ones the loader gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import do_not_convert

from pipeline import augment as aug
from pipeline import dali_pil as pil
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
# Per view, in this order: crop window (anchor y x, size h w, in decoded pixels); the resized crop
# (uint8 HWC, before any colour operation); whether the colour jitter ran; the step (0-3) at which
# brightness, contrast, saturation and hue ran; their factors (hue in turns); whether grayscale ran;
# whether the blur ran; its sigma; whether the view was flipped.
PROBE_FIELDS = ("anchor", "size", "crop", "jitter", "order", "factors", "gray", "blur", "sigma", "flip")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # the `order` and `factors` columns
# The fast graph's fixed order: contrast, then brightness (one brightness_contrast), then
# saturation and hue (one color_twist).
_FAST_ORDER = (1, 0, 2, 3)


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
    if device == "gpu":
        # nvJPEG upsamples chroma by pixel replication unless asked for libjpeg-turbo's "fancy"
        # (triangular) upsampling, which the CPU decoder and PIL use: without it GPU pixels drift
        # from the reference's.
        return fn.decoders.image(jpg, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True)
    return fn.decoders.image(jpg, device="cpu", output_type=types.RGB)


@dataclass
class Draws:
    """The random draws behind one train view (DataNodes, one value per sample)."""

    anchor: Any
    size: Any
    jitter: Any
    factors: list[Any]  # brightness, contrast, saturation, hue (turns), as `JITTER_OPS`
    order: list[Any] | None  # step of each `JITTER_OPS` operation; None: `_FAST_ORDER`
    gray: Any
    blur: Any
    sigma: Any
    flip: Any
    crop: Any = None  # the resized crop, set by `_view`


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _ranks(keys: list[Any]) -> list[Any]:
    """The rank of each key among `keys` (ties to the lower index): a uniformly random
    permutation for i.i.d. uniform keys, as torchvision's ``torch.randperm(4)``."""
    ranks = []
    for i, key in enumerate(keys):
        before = [other < key if j > i else other <= key for j, other in enumerate(keys) if j != i]
        rank = fn.cast(before[0], dtype=types.INT32)
        for b in before[1:]:
            rank = rank + b
        ranks.append(rank)
    return ranks


def _draw(shape, spec: aug.ViewSpec, random_order: bool) -> Draws:
    """Every random number of one view, drawn for every sample whether or not an operation uses it,
    so the stream of draws (and with it every later view and batch) does not depend on the data."""
    anchor, size = fn.random_crop_generator(shape, random_area=list(spec.scale),
                                            random_aspect_ratio=list(aug.ASPECT), num_attempts=10)
    b, c, s, h = aug.JITTER
    jitter = _coin(aug.P_JITTER)
    factors = [_uniform(max(0.0, 1 - b), 1 + b), _uniform(max(0.0, 1 - c), 1 + c),
               _uniform(max(0.0, 1 - s), 1 + s), _uniform(-h, h)]  # torchvision ColorJitter ranges
    order = _ranks([_uniform(0.0, 1.0) for _ in JITTER_OPS]) if random_order else None
    gray = _coin(aug.P_GRAY)
    sigma, blur = _uniform(*aug.SIGMA), _coin(aug.P_BLUR)
    flip = fn.random.coin_flip(probability=aug.P_FLIP)  # int32: crop_mirror_normalize's `mirror`
    return Draws(anchor, size, jitter, factors, order, gray, blur, sigma, flip)


def _crop(decoded, draws: Draws, spec: aug.ViewSpec):
    """RandomResizedCrop from the image decoded once for all views (decoding only each crop's
    region was slower on the CPU: BENCHMARKS.md, pipeline history): the drawn window resized to the
    view size, as torchvision's crop-then-resize."""
    window = fn.slice(decoded, draws.anchor, draws.size, axes=[0, 1])
    return fn.resize(window, size=[spec.size, spec.size], interp_type=types.INTERP_LINEAR,
                     antialias=TRAIN_ANTIALIAS)


def _blend_step(img, draws: Draws, step: int, hue_first: bool, device: str):
    """Brightness, contrast or saturation: the one whose turn is `step` in this sample's order, for
    the samples whose hue runs after (`hue_first` False) or before (True) that step."""
    rank_b, rank_c, rank_s, rank_h = draws.order  # type: ignore[misc]  # random_order graphs only
    b, c, s, _ = draws.factors
    mine = rank_h < step if hue_first else rank_h > step
    if mine & (rank_b == step):
        img = pil.brightness(img, b, device)
    elif mine & (rank_c == step):
        img = pil.contrast(img, c, device)
    elif mine & (rank_s == step):
        img = pil.saturation(img, s, device)
    return img


def _jitter(img, draws: Draws, device: str):
    """ColorJitter's four operations in this sample's random order. The graph holds hue, by far the
    costliest (PIL's HSV round trip is about 45 operators), once: the blends before it, hue, the
    blends after it. A step-by-step graph would hold every operation at each of the four steps, and
    each operator instance costs time per batch (about 5% more CPU per image, measured)."""
    for step in range(len(JITTER_OPS) - 1):
        img = _blend_step(img, draws, step, False, device)
    img = pil.hue(img, draws.factors[3], device)
    for step in range(1, len(JITTER_OPS)):
        img = _blend_step(img, draws, step, True, device)
    return img


def _faithful_colour_blur(img, draws: Draws, blur: bool, device: str):
    """method.md §5.3 steps 2-4 as torchvision computes them, on uint8 HWC: ColorJitter (its four
    operations in this sample's random order, each rounded as PIL rounds), grayscale, PIL's blur."""
    if draws.jitter:
        img = _jitter(img, draws, device)
    if draws.gray:
        img = pil.grayscale(img, device)
    if blur and draws.blur:
        img = pil.gaussian_blur(img, draws.sigma, device)
    return img


def _fast_colour(img, draws: Draws, device: str):
    """ColorJitter + grayscale as two cheap ops: brightness/contrast into float (contrast pivots
    on the image's mean luma, as torchvision's does), then hue/saturation as one 3x3 map on float,
    then one saturating cast back to uint8. DALI's one-op `color_twist` pivots contrast at a fixed
    grey (on float at 0.5). Deviations: fixed order, one rounding, DALI's linear (YIQ) hue rotation
    (0.05 turn: 4.8 grey levels from torchvision's HSV one); grayscale is saturation 0 in the same map.
    On a GPU the mean luma is a GPU tensor, which DALI takes as a per-sample argument from the CPU
    only, so there brightness and contrast are arithmetic operators (the same formula)."""
    b, c, s, h = draws.factors
    on = fn.cast(draws.jitter, dtype=types.FLOAT)
    brightness, contrast = 1.0 + on * (b - 1.0), 1.0 + on * (c - 1.0)
    saturation = (1.0 + on * (s - 1.0)) * (1.0 - fn.cast(draws.gray, dtype=types.FLOAT))
    mean = fn.reductions.mean(img, axes=[0, 1])
    luma = aug.LUMA[0] * mean[0] + aug.LUMA[1] * mean[1] + aug.LUMA[2] * mean[2]
    if device == "gpu":
        out = brightness * (luma + contrast * (img - luma))
    else:
        out = fn.brightness_contrast(img, brightness=brightness, contrast=contrast, contrast_center=luma,
                                     dtype=types.FLOAT)
    out = fn.color_twist(out, saturation=saturation, hue=on * h * 360.0)
    return fn.cast(out, dtype=types.UINT8)


def _fast_blur(out, draws: Draws):
    """Gaussian blur on the normalised float CHW view, where DALI's CPU kernel is about 40% cheaper
    than on uint8 HWC, with the kernel cut at `aug.BLUR_RADIUS_SIGMAS`. Blur, flip and the
    per-pixel colour maps commute (the kernel sums to 1), so the order changes only rounding."""
    window = fn.cast(2.0 * dmath.ceil(aug.BLUR_RADIUS_SIGMAS * draws.sigma) + 1.0, dtype=types.INT32)
    if draws.blur:
        out = fn.gaussian_blur(out, sigma=draws.sigma, window_size=window)
    return out


def _view(decoded, shape, spec: aug.ViewSpec, blur: bool, device: str, colour: bool, fast: bool):
    """One view: uint8 HWC decoded image in, float CHW normalised view and its `Draws` out."""
    draws = _draw(shape, spec, random_order=colour and not fast)
    img = draws.crop = _crop(decoded, draws, spec)
    if colour and not fast:
        img = _faithful_colour_blur(img, draws, blur, device)
    elif colour and draws.jitter | draws.gray:
        img = _fast_colour(img, draws, device)
    out = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=_MEAN, std=_STD,
                                   mirror=draws.flip)
    if colour and fast and blur:
        out = _fast_blur(out, draws)
    return out, draws


def _probe_outputs(draws: Draws, blur: bool, colour: bool) -> list[Any]:
    """`PROBE_FIELDS` of one view; the flags say whether the operation ran, not just was drawn."""
    order = draws.order or [fn.cast(draws.jitter, dtype=types.INT32) * 0 + k for k in _FAST_ORDER]

    def ran(flag, on: bool):
        return flag if on else flag & False

    return [draws.anchor, draws.size, draws.crop, ran(draws.jitter, colour), fn.stack(*order),
            fn.stack(*draws.factors), ran(draws.gray, colour), ran(draws.blur, colour and blur), draws.sigma,
            draws.flip]


@pipeline_def(enable_conditionals=True)
def train_pipeline(plan: EpochPlan, specs: list[aug.ViewSpec], blur: bool, keep: KeepSource | None,
                   device: str, reader_seed: int, colour: bool = True, fast: bool = False,
                   probe: bool = False):
    """Outputs: one float CHW view per spec, cls digits, idx digits, and keep flags when `keep`
    is given (without known-corrupt samples the graph has no masking conditional at all); with
    `probe`, then the decoded images and each view's `PROBE_FIELDS`.

    `colour` False: crop and flip only (linear-probe training, method.md §7.1); `fast`: the
    ``data.fast_augment`` approximation instead of the faithful recipe.
    """
    jpg, cls, idx = reader(plan, reader_seed)
    flags = None if keep is None else _keep_input(keep)
    decoded = _if_kept(flags, lambda: _decode(jpg, device), lambda: _blank(device))  # once, for all views
    shape = decoded.shape()
    made = [_view(decoded, shape, spec, blur, device, colour, fast) for spec in specs]
    outs = [view for view, _ in made] + [cls, idx] + ([] if flags is None else [flags])
    if probe:
        outs.append(decoded)
        for _, draws in made:
            outs += _probe_outputs(draws, blur, colour)
    return tuple(outs)


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
