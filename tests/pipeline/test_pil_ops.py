"""Each operation of `pipeline.dali_pil` against the torchvision/PIL function it rebuilds, on the same
input with the same parameter: every one of the 2^24 RGB colours for the colour operations, real
photos and noise for the blur. Both forms run here: the CPU one and the GPU one (`device="gpu"`:
floors taken before the cast because DALI's GPU kernels round halves to even), the latter on the
CPU, which computes the same operators.
Tolerance: none for the colour operations (equal to PIL's on every colour; one level off anywhere
fails); the blur as stated in its test."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from nvidia.dali import fn, pipeline_def
from PIL import Image, ImageFilter

from pipeline import augment as aug
from pipeline import dali_pil

# Every RGB colour once, as 16 tiles of 256 x 4096 px (each tile its own mean: 16 contrast pivots)
_R, _G, _B = np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij")
ALL_COLOURS = np.stack([_R, _G, _B], axis=-1).reshape(4096, 4096, 3).astype(np.uint8)
TILES = [ALL_COLOURS[i:i + 256].copy() for i in range(0, 4096, 256)]
# (DALI op, torchvision function, factors): the ColorJitter range's ends and one value inside
COLOUR_OPS = {
    "brightness": (dali_pil.brightness, TF.adjust_brightness, (0.6, 0.93, 1.4)),
    "contrast": (dali_pil.contrast, TF.adjust_contrast, (0.6, 1.07, 1.4)),
    "saturation": (dali_pil.saturation, TF.adjust_saturation, (0.6, 1.21, 1.4)),
}
HUES = (-0.1, -0.0039, 0.0, 0.05, 0.1)  # ends, under one 8-bit step, none (still a lossy HSV round trip)


def run_op(images: list[np.ndarray], op, factors: list[float]) -> list[np.ndarray]:
    """`op(images, factor)` in a CPU DALI pipeline, one factor per image."""
    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=0)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        f = fn.external_source(source=lambda: [np.float32(v) for v in factors], batch=True)
        return op(x, f)

    p = pipe()
    p.build()
    out = p.run()[0]
    return [np.array(out[k]) for k in range(len(images))]


def assert_same(ours: list[np.ndarray], ref: list[np.ndarray], inputs: list[np.ndarray]) -> None:
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        off = a != b
        assert not off.any(), f"{off.any(-1).sum()} pixels differ, by up to {np.abs(a.astype(int) - b).max()}"
    # the operation did something, so equality is not the identity twice
    assert any(not np.array_equal(b, x) for b, x in zip(ref, inputs, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "gpu"], ids=["cpu-form", "gpu-form"])
@pytest.mark.parametrize("name", sorted(COLOUR_OPS))
def test_blend_ops_equal_pil_on_every_colour(name, device):
    op, reference, factors = COLOUR_OPS[name]
    for factor in factors:
        f = float(np.float32(factor))  # the factor the pipeline draws is a float32
        ours = run_op(TILES, lambda x, v: op(x, v, device), [f] * len(TILES))
        assert_same(ours, [np.asarray(reference(Image.fromarray(t), f)) for t in TILES], TILES)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "gpu"], ids=["cpu-form", "gpu-form"])
def test_grayscale_equals_pil_on_every_colour(device):
    ours = run_op(TILES, lambda x, v: dali_pil.grayscale(x, device), [0.0] * len(TILES))
    assert_same(ours, [np.asarray(TF.rgb_to_grayscale(Image.fromarray(t), 3)) for t in TILES], TILES)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "gpu"], ids=["cpu-form", "gpu-form"])
def test_hue_equals_pil_on_every_colour(device):
    for factor in HUES:
        f = float(np.float32(factor))
        ours = run_op([ALL_COLOURS], lambda x, v: dali_pil.hue(x, v, device), [f])
        assert_same(ours, [np.asarray(TF.adjust_hue(Image.fromarray(ALL_COLOURS), f))], [ALL_COLOURS])


# Blur, DALI against PIL: at most one grey level apart, on at most BLUR_FRACTION of an image's values
# and BLUR_MEAN_FRACTION of all. PIL sums each pass in 24-bit fixed point and rounds; fn.filter sums in
# float32, so a sum within float32 precision of the rounding boundary can round the other way.
# Measured on uniform noise (the worst case: no smooth regions) with 60 sigmas drawn as the pipeline
# draws them: 59 images identical, one with 0.43% of its values one level off (0.007% overall);
# photos: identical. Sigmas that make PIL's weights near-simple fractions (exactly 0.5, 1.0 or 2.0:
# weights near 1/6, 2/3, 1/6) put 1-3% of noise values on a boundary; the pipeline's U[0.1, 2] draws
# practically never do.
BLUR_FRACTION = 0.01
BLUR_MEAN_FRACTION = 0.0005


def test_blur_matches_pil_gaussian_blur(foolbox_jpegs):
    """PIL's GaussianBlur (three extended-box passes per axis, rounded each time, edges clamped) on
    photos, uniform noise (every pixel a sharp edge) and images smaller than the kernel, sigma drawn
    from the recipe's range; one form for both devices (the GPU only moves the kernel there). A true
    Gaussian of the same sigma (DALI's gaussian_blur) differs by 0.4-0.8 grey levels on average on
    these photos, which is why the blur is built from box passes."""
    rng = np.random.default_rng(0)
    images = [np.asarray(Image.open(p).convert("RGB").resize((96, 72))) for p in foolbox_jpegs]
    images += [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(30)]
    images += [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((3, 5, 3), (5, 2, 3), (1, 1, 3))]
    sigmas = rng.uniform(*aug.SIGMA, len(images)).astype(np.float32)
    ours = run_op(images, dali_pil.gaussian_blur, sigmas.tolist())
    ref = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(float(s))))
           for im, s in zip(images, sigmas, strict=True)]
    off = [np.abs(a.astype(int) - b) for a, b in zip(ours, ref, strict=True)]
    assert max(d.max() for d in off) <= 1
    assert max((d > 0).mean() for d in off) <= BLUR_FRACTION
    assert np.mean([(d > 0).mean() for d in off]) <= BLUR_MEAN_FRACTION
    assert all(not np.array_equal(b, x) for b, x in zip(ref[:20], images[:20], strict=True))  # photos blurred
