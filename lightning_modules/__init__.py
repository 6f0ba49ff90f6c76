"""Training logic: the classification LightningModule and the registries of networks, losses and optimizers."""

from lightning_modules.classifier import ImageClassifier, NonFiniteLossError
from lightning_modules.networks import NetworkConfig
from lightning_modules.registry import ConfigError

__all__ = ["ConfigError", "ImageClassifier", "NetworkConfig", "NonFiniteLossError"]
