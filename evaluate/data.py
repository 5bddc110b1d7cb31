"""Loader settings for evaluation: the `DataConfig` every `hcsc-eval` command builds its loaders from."""

from __future__ import annotations

from core.config import ConfigError, DataConfig
from evaluate.checks import ArgumentError

# The `hcsc-eval` flag behind each `DataConfig` key it sets, so a validation error names what the
# user typed; longer keys first (data.eval_batch_size contains data.batch_size's tail).
FLAGS = {"data.eval_batch_size": "--batch-size", "data.eval_interpolation": "--interpolation",
         "data.eval_resize": "--resize", "data.image_size": "--image-size", "data.batch_size": "--batch-size",
         "data.backend": "--backend", "data.workers": "--workers"}


def data_config(shards: str, *, backend: str = "dali", image_size: int = 224, resize: int = 256,
                interpolation: str = "bilinear", batch_size: int = 128, workers: int = 4,
                min_scale: float = 0.08) -> DataConfig:
    """A `DataConfig` for evaluation: `batch_size` per rank serves both eval and linear mode.

    ``min_scale`` 0.08 is torchvision's RandomResizedCrop default, the linear protocol (method.md §7.1).
    ``interpolation`` is the eval-mode resize filter (bicubic for kNN and clustering, method.md §7.1).

    Raises:
        ArgumentError: a value `DataConfig` refuses, named by its `hcsc-eval` flag (``--resize``).
    """
    try:
        return DataConfig(shards=str(shards), backend=backend, image_size=image_size, eval_resize=resize,
                          eval_interpolation=interpolation,
                          batch_size=batch_size, eval_batch_size=batch_size, workers=workers,
                          min_scale=min_scale, max_scale=1.0, blur=False)
    except ConfigError as err:
        message = str(err)
        for key, flag in FLAGS.items():
            message = message.replace(key, flag)
        raise ArgumentError(message) from None
