"""Data loading: DALI train/eval pipelines over WebDataset shards, and the torch reference loader."""

from pipeline.batch import Batch
from pipeline.loader import Loader, build_loader

__all__ = ["Batch", "Loader", "build_loader"]
