"""Training logic: the classification LightningModule and the registries of networks, losses and optimizers.

Names are imported lazily, so that importing one light module (e.g. the registry, from the sweep's coordinator, which
must start fast) does not import torch and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "ImageClassifier": "lightning_modules.classifier",
    "NonFiniteLossError": "lightning_modules.classifier",
    "NetworkConfig": "lightning_modules.networks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
