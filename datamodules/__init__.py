"""Everything from files on disk to batches: sources, image decoding, the cache, splits, augmentation."""

from datamodules.datamodule import EMBEDDED, ImageDataModule
from datamodules.errors import DataError
from datamodules.splits import SplitConfig

__all__ = ["EMBEDDED", "DataError", "ImageDataModule", "SplitConfig"]
