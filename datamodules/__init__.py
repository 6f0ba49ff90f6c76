"""Everything from files on disk to batches: sources, image decoding, the cache, splits, augmentation.

Names are imported lazily, so that importing one light module (e.g. `datamodules.splits`) does not import
torch and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "EMBEDDED": "datamodules.datamodule",
    "ImageDataModule": "datamodules.datamodule",
    "SplitConfig": "datamodules.splits",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
