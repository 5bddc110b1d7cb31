"""The augmentation recipe of method.md §5.3, as numbers both backends read.

MoCo v2 "aug+" per view: RandomResizedCrop(size, scale) -> ColorJitter(0.4, 0.4, 0.4, 0.1) with
p 0.8 -> grayscale p 0.2 -> Gaussian blur sigma ~ U[0.1, 2.0] with p 0.5 -> horizontal flip ->
normalise. Multi-crop adds local views whose scale bounds are the global ones times size/image_size.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import DataConfig

MEAN = (0.485, 0.456, 0.406)  # method.md §5.3, ImageNet statistics
STD = (0.229, 0.224, 0.225)
ASPECT = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default ratio
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (fraction of a full turn)
P_JITTER = 0.8
P_GRAY = 0.2
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L") and torchvision's grayscale
P_BLUR = 0.5
SIGMA = (0.1, 2.0)
P_FLIP = 0.5
# DALI blurs with a truncated kernel; the reference uses PIL's box-blur approximation of a
# Gaussian, whose support is about 3 sigma. A radius of 2 sigma keeps 95% of the kernel mass
# (renormalised) and cuts the CPU cost of the blur, the pipeline's most expensive op, by about a
# third against DALI's default 3-sigma window (window <= 9 px instead of 13 at sigma 2).
# Deviation from the reference, measured in bench/pipeline.py.
BLUR_RADIUS_SIGMAS = 2.0


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: output side in px and RandomResizedCrop area range."""

    size: int
    scale: tuple[float, float]


def view_specs(cfg: DataConfig) -> list[ViewSpec]:
    """Query and key at `image_size`, then (multi-crop) one view per local size, method.md §5.3."""
    main = ViewSpec(cfg.image_size, (cfg.min_scale, cfg.max_scale))
    specs = [main, main]
    if cfg.multi_crop:
        for size in cfg.local_crop_sizes:
            ratio = size / cfg.image_size  # method.md §5.3: scale bounds proportional to size / 224
            specs.append(ViewSpec(size, (cfg.min_scale * ratio, min(1.0, cfg.max_scale * ratio))))
    return specs


LINEAR_SCALE = (0.08, 1.0)  # method.md §7.1 linear probe: torchvision's default RandomResizedCrop scale


def linear_spec(cfg: DataConfig) -> ViewSpec:
    """The one view of linear-probe training: RandomResizedCrop(image_size) + flip (method.md §7.1)."""
    return ViewSpec(cfg.image_size, LINEAR_SCALE)
