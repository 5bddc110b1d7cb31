"""The augmentation contract of docs/method.md §5.3, checked on recorded views of either backend.

`record_dali` (the DALI graph's probe outputs) and `record_reference` (the torch backend's own
transforms, instrumented) return one `View` per augmented view: the decoded source, the random draws
behind the view and what the backend produced. `violations(views)` returns one line per broken clause,
each starting with the clause's name (an empty list: the contract holds):

  freq    each random operation ran with its probability (colour jitter 0.8, grayscale 0.2, blur
          0.5, flip 0.5): |count - n p| <= 5 sqrt(n p (1 - p)). A correct backend breaks one such
          bound with probability below 1e-6, so the checks cannot flake; with ~1000 views they catch
          a probability off by about 0.08 (0.06 at p 0.2).
  crop    per view spec, the crop's area fraction, log aspect ratio and relative position have the
          distributions of torchvision's RandomResizedCrop.get_params on images of the same sizes:
          two-sample Kolmogorov-Smirnov p >= 1e-6.
  ranges  brightness, contrast, saturation factors in [0.6, 1.4], hue in [-0.1, 0.1] turns, blur
          sigma in [0.1, 2.0], each uniform over its range (one-sample KS p >= 1e-6).
  order   each jittered view's order is a permutation; every operation sits at every step with
          p 1/4 (5 sigma) and the 24 orders are equally likely (chi-square p >= 1e-6).
  pixels  each view rebuilt with torchvision/PIL from its record equals the backend's output:
          the crop (torchvision resized_crop of the same window, bilinear, antialiased) within
          CROP_MEAN grey levels on average, and CROP_INNER_MEAN on average and CROP_INNER_MAX at most
          away from the crop's border row and column; every later step (jitter in the recorded
          order, grayscale, blur, flip, normalisation), applied to the backend's own crop, within
          OPS_MEAN on average with at most OPS_FRACTION of the pixels off by half a grey level or more.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from pipeline import augment as aug
from pipeline import dali_graph, reference
from pipeline.plan import epoch_plan, load_shards

SIGMAS = 5.0  # frequency bounds, in binomial standard deviations
P_MIN = 1e-6  # smallest p-value a distribution test may give
# Crop, DALI against PIL on the same window, in grey levels. Measured on the 20 foolbox photos
# (512 px, crops to 64, 48 and 32 px, 1040 views): away from the crop's border row and column a
# per-view mean of at most 0.11 and at most 1 anywhere (the two antialiased bilinear resamplers round
# differently); over the whole crop a mean of at most 0.54, because at the border PIL renormalises the
# filter where DALI clamps (up to 25 grey levels on that row in strong downscales).
CROP_MEAN = 1.0
CROP_INNER_MEAN = 0.25
CROP_INNER_MAX = 2.0
# Everything after the crop: DALI against PIL. Measured: bit-identical except, rarely, one grey level
# where a float tie rounds the other way (a per-view mean of at most 0.002).
OPS_MEAN = 0.02
OPS_FRACTION = 0.002
# torchvision's functions for `dali_graph.JITTER_OPS`, in that order
JITTER_FUNCTIONS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))  # torchvision ColorJitter(0.4, 0.4, 0.4, 0.1)


@dataclass
class View:
    """One augmented view and the random draws behind it."""

    image: np.ndarray  # the decoded source, uint8 HWC
    spec: aug.ViewSpec
    anchor: tuple[int, int]  # crop window: top, left
    size: tuple[int, int]  # crop window: height, width
    crop: np.ndarray  # the backend's resized crop, uint8 HWC
    jitter: bool
    order: tuple[int, ...]  # step at which each of `dali_graph.JITTER_OPS` ran
    factors: tuple[float, ...]  # as `dali_graph.JITTER_OPS` (hue in turns)
    gray: bool
    blur: bool
    sigma: float
    flip: bool
    output: np.ndarray  # float CHW, normalised

    def describe(self) -> str:
        ops = [f"jitter {dict(zip(dali_graph.JITTER_OPS, np.round(self.factors, 3).tolist(), strict=True))} "
               f"order {self.order}"] if self.jitter else []
        ops += ["gray"] * self.gray + [f"blur sigma {self.sigma:.2f}"] * self.blur + ["flip"] * self.flip
        return ", ".join(ops) or "crop only"


def record_dali(folder, specs: list[aug.ViewSpec], batches: int, *, batch_size: int = 20, seed: int = 1,
                device: str = "cpu", fast: bool = False) -> list[View]:
    """Views of DALI's train graph over the split `train` of `folder`, with `probe=True`."""
    shards, total = load_shards(folder, "train")
    plan = epoch_plan(shards, total, train=True, rank=0, world=1, epoch=0, seed=seed, batch_size=batch_size)
    pipe = dali_graph.train_pipeline(plan, specs, True, None, device, seed, fast=fast, probe=True,
                                     batch_size=batch_size, num_threads=2, seed=seed, exec_dynamic=True,
                                     device_id=0 if device == "gpu" else None)
    pipe.build()
    fields = len(dali_graph.PROBE_FIELDS)
    views = []
    for _ in range(batches):
        outs = [_numpy(o) for o in pipe.run()]
        decoded = outs[len(specs) + 2]
        for v, spec in enumerate(specs):
            first = len(specs) + 3 + v * fields
            probe = dict(zip(dali_graph.PROBE_FIELDS, outs[first:first + fields], strict=True))
            for k in range(batch_size):
                views.append(View(
                    image=decoded[k], spec=spec, anchor=tuple(probe["anchor"][k].tolist()),
                    size=tuple(probe["size"][k].tolist()), crop=probe["crop"][k],
                    jitter=bool(probe["jitter"][k]), order=tuple(probe["order"][k].tolist()),
                    factors=tuple(probe["factors"][k].tolist()), gray=bool(probe["gray"][k]),
                    blur=bool(probe["blur"][k]), sigma=float(probe["sigma"][k]), flip=bool(probe["flip"][k]),
                    output=outs[v][k]))
    del pipe
    return views


def _numpy(tensor_list) -> list[np.ndarray]:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return [np.array(tensor_list[k]) for k in range(len(tensor_list))]


class _Tap:
    """Wraps one step of the reference Compose, recording its input and output."""

    def __init__(self, step, log: dict, name: str) -> None:
        self.step, self.log, self.name = step, log, name

    def __call__(self, img):
        out = self.step(img)
        self.log[self.name] = out
        self.log[self.name + "_ran"] = out is not img  # RandomApply & co. return the input untouched
        return out


@contextmanager
def _recording(log: dict) -> Iterator[None]:
    """Record the draws of torchvision's RandomResizedCrop and ColorJitter and of the reference
    blur, by wrapping the functions they draw through (their results are unchanged)."""
    crop_params, jitter_params = T.RandomResizedCrop.get_params, T.ColorJitter.get_params
    real_blur = ImageFilter.GaussianBlur

    def crop(*args, **kw):
        log["window"] = crop_params(*args, **kw)
        return log["window"]

    def jitter(*args, **kw):
        log["jitter_params"] = jitter_params(*args, **kw)
        return log["jitter_params"]

    def blur(radius):
        log["sigma"] = radius
        return real_blur(radius)

    with mock.patch.object(T.RandomResizedCrop, "get_params", staticmethod(crop)), \
            mock.patch.object(T.ColorJitter, "get_params", staticmethod(jitter)), \
            mock.patch.object(reference.ImageFilter, "GaussianBlur", blur):
        yield


def record_reference(images: list[np.ndarray], specs: list[aug.ViewSpec], per_spec: int,
                     seed: int = 1) -> list[View]:
    """Views of the torch backend's transforms (`reference.view_transform`, as its loader applies
    them), seeded as its loader seeds a batch."""
    views = []
    random.seed(seed)
    torch.manual_seed(seed)
    for spec in specs:
        transform = reference.view_transform(spec, blur=True)
        log: dict = {}
        names = ["crop", "jitter", "gray", "blur", "flip", "tensor", "normalise"]
        transform.transforms = [_Tap(step, log, name)
                                for step, name in zip(transform.transforms, names, strict=True)]
        with _recording(log):
            for k in range(per_spec):
                log.clear()
                source = images[k % len(images)]
                out = transform(Image.fromarray(source)).numpy()
                top, left, h, w = log["window"]
                not_drawn = (torch.arange(4), 1.0, 1.0, 1.0, 0.0)
                steps, *factors = log["jitter_params"] if log["jitter_ran"] else not_drawn
                order = tuple(int(np.flatnonzero(steps.numpy() == op)[0]) for op in range(4))
                views.append(View(
                    image=source, spec=spec, anchor=(top, left), size=(h, w), crop=np.asarray(log["crop"]),
                    jitter=log["jitter_ran"], order=order, factors=tuple(float(f) for f in factors),
                    gray=log["gray_ran"], blur=log["blur_ran"], sigma=float(log.get("sigma", 0.0)),
                    flip=log["flip_ran"], output=out))
    return views


def rebuild(view: View) -> np.ndarray:
    """The view's steps after the crop, applied by torchvision/PIL to the backend's crop: uint8 HWC."""
    img = Image.fromarray(view.crop)
    if view.jitter:
        for op in np.argsort(view.order):
            img = JITTER_FUNCTIONS[op](img, view.factors[op])
    if view.gray:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if view.blur:
        img = img.filter(ImageFilter.GaussianBlur(view.sigma))
    if view.flip:
        img = TF.hflip(img)
    return np.asarray(img)


def reference_crop(view: View) -> np.ndarray:
    """torchvision's RandomResizedCrop output for the view's window: uint8 HWC."""
    (top, left), (h, w) = view.anchor, view.size
    size = [view.spec.size, view.spec.size]
    return np.asarray(TF.resized_crop(Image.fromarray(view.image), top, left, h, w, size,
                                      InterpolationMode.BILINEAR, antialias=True))


def grey_levels(output: np.ndarray) -> np.ndarray:
    """A normalised float CHW view back in grey levels, HWC."""
    return output.transpose(1, 2, 0) * (np.array(aug.STD) * 255) + np.array(aug.MEAN) * 255


def _frequency(name: str, flags: list[bool], p: float) -> list[str]:
    n, count = len(flags), sum(flags)
    bound = SIGMAS * np.sqrt(n * p * (1 - p))
    if abs(count - n * p) > bound:
        return [f"freq: {name} ran in {count} of {n} views, expected {n * p:.0f} +- {bound:.0f} (p {p})"]
    return []


def _uniform(name: str, values: list[float], lo: float, hi: float) -> list[str]:
    values_arr = np.asarray(values)
    if values_arr.min() < lo - 1e-6 or values_arr.max() > hi + 1e-6:
        return [f"ranges: {name} drawn in [{values_arr.min():.4f}, {values_arr.max():.4f}], "
                f"outside [{lo}, {hi}]"]
    p = stats.kstest(values_arr, stats.uniform(lo, hi - lo).cdf).pvalue
    return [f"ranges: {name} not uniform on [{lo}, {hi}] (KS p {p:.2g})"] if p < P_MIN else []


def _crop_stats(shape: tuple[int, ...], top: int, left: int, h: int, w: int) -> tuple[float, ...]:
    """Area fraction, log aspect ratio, vertical and horizontal position (0-1) of a crop window."""
    height, width = shape[:2]
    return (h * w / (height * width), float(np.log(w / h)), (top + 0.5) / (height - h + 1),
            (left + 0.5) / (width - w + 1))


def _crop_distribution(views: list[View]) -> list[str]:
    found = []
    generator = torch.Generator().manual_seed(12345)
    by_spec: dict[aug.ViewSpec, list[View]] = defaultdict(list)
    for view in views:
        by_spec[view.spec].append(view)
    for spec, group in by_spec.items():
        ours = np.array([_crop_stats(v.image.shape, *v.anchor, *v.size) for v in group])
        theirs = []
        with _seeded(generator):
            for v in group:  # torchvision's draw on an image of the same size
                window = T.RandomResizedCrop.get_params(torch.empty(3, *v.image.shape[:2]), list(spec.scale),
                                                        list(aug.ASPECT))
                theirs.append(_crop_stats(v.image.shape, *window))
        for column, what in enumerate(("area fraction", "log aspect ratio", "vertical position",
                                       "horizontal position")):
            p = stats.ks_2samp(ours[:, column], np.array(theirs)[:, column]).pvalue
            if p < P_MIN:
                found.append(f"crop: {what} of {spec} differs from torchvision RandomResizedCrop "
                             f"(KS p {p:.2g})")
    return found


@contextmanager
def _seeded(generator: torch.Generator) -> Iterator[None]:
    """torch's global RNG set from `generator` (get_params draws from the global one), restored after."""
    state = torch.get_rng_state()
    torch.set_rng_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(torch.get_rng_state())
        torch.set_rng_state(state)


def _order(views: list[View]) -> list[str]:
    orders = [v.order for v in views if v.jitter]
    if any(sorted(o) != [0, 1, 2, 3] for o in orders):
        return ["order: a jitter order is not a permutation of the four operations"]
    found = []
    for op, name in enumerate(dali_graph.JITTER_OPS):
        for step in range(4):
            found += _frequency(f"{name} at step {step}", [o[op] == step for o in orders], 0.25)
    counts = [sum(o == perm for o in orders) for perm in itertools.permutations(range(4))]
    p = stats.chisquare(counts).pvalue
    if p < P_MIN:
        found.append(f"order: the 24 orders are not equally likely (chi-square p {p:.2g})")
    return [line.replace("freq:", "order:") for line in found]


def _pixels(views: list[View]) -> list[str]:
    found = []
    for i, view in enumerate(views):
        crop = np.abs(view.crop.astype(float) - reference_crop(view))
        inner = crop[1:-1, 1:-1]
        if crop.mean() > CROP_MEAN or inner.mean() > CROP_INNER_MEAN or inner.max() > CROP_INNER_MAX:
            found.append(f"pixels: view {i} ({view.describe()}): crop {crop.mean():.3f} grey levels from "
                         f"torchvision's on average, {inner.mean():.3f} and at most {inner.max():.0f} inside")
        ops = np.abs(grey_levels(view.output) - rebuild(view))
        if ops.mean() > OPS_MEAN or (ops >= 0.5).mean() > OPS_FRACTION:
            found.append(f"pixels: view {i} ({view.describe()}): {ops.mean():.3f} grey levels from "
                         f"torchvision's on average after the crop, {(ops >= 0.5).mean():.2%} of pixels off")
    return found


def violations(views: list[View]) -> list[str]:
    """Every clause of the module docstring that `views` break, one line each."""
    jittered = [v for v in views if v.jitter]
    found = []
    for name, flags, p in (("colour jitter", [v.jitter for v in views], aug.P_JITTER),
                           ("grayscale", [v.gray for v in views], aug.P_GRAY),
                           ("blur", [v.blur for v in views], aug.P_BLUR),
                           ("flip", [v.flip for v in views], aug.P_FLIP)):
        found += _frequency(name, flags, p)
    found += _crop_distribution(views)
    for op, (name, (lo, hi)) in enumerate(zip(dali_graph.JITTER_OPS, _RANGES, strict=True)):
        found += _uniform(f"{name} factor", [v.factors[op] for v in jittered], lo, hi)
    found += _uniform("blur sigma", [v.sigma for v in views if v.blur], *aug.SIGMA)
    found += _order(views)
    return found + _pixels(views)


def clauses(found: list[str]) -> set[str]:
    """The clause names of `violations` lines."""
    return {line.split(":", 1)[0] for line in found}
