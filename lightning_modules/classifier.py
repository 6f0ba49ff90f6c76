"""`ImageClassifier`: the one LightningModule every fit, sweep trial and test trains through.

The network, loss and optimizer are injected from config; the module holds only training logic:
normalisation on the device, the loss, one metric collection per split, study 002's overfitting gap
(`train/acc - val/acc`), and a guard that fails a run whose loss became NaN/inf.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import CatMetric, MaxMetric, MeanMetric

from errors import ConfigError
from lightning_modules.losses import build_loss
from lightning_modules.metrics import ClassificationMetrics, confusion_matrix
from lightning_modules.networks import NetworkConfig, build_network


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run (or sweep trial) fails with this reason."""


class ImageClassifier(LightningModule):
    """Image classifier with injected network, loss and optimizer.

    Args:
        network: which backbone and head to build (see `NetworkConfig`).
        loss: a registered loss name: ce, bce, mse, mae, logcosh, ce_logcosh, focal.
        loss_kwargs: extra loss arguments, e.g. {label_smoothing: 0.1} or {alpha: 0.5, beta: 0.5}.
        optimizer: any torch optimizer with its arguments (`class_path`/`init_args` in YAML).
        lr_scheduler: optional LR scheduler; ReduceLROnPlateau watches val/loss (train/loss when there is no
            validation, as in a cross-validated refit).
        classes: class names in output order (linked from `data.classes`).
        image_size: input size (linked from `data.image_size`).
        in_chans: input channels (linked from `data.channels`).
        resize: how images were fitted to `image_size`, "squash" or "letterbox" (linked from `data.resize`);
            kept in the checkpoint so a bare .ckpt predicts exactly as in training.
        positive_class: the positive (diseased) class for binary metrics; default: the second class.
        class_weights: "none", "balanced" (inverse training-split frequency), or one weight per class.
        channels_last: NHWC memory format; None = on when training on a GPU, ignored on CPU.
        compile: `torch.compile` the network (GPU only; ignored with a warning on CPU).
    """

    def __init__(
        self,
        network: NetworkConfig = NetworkConfig(),  # noqa: B008 -- never mutated
        loss: str = "ce",
        loss_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        classes: list[str] | None = None,
        image_size: int | list[int] = 224,
        in_chans: int = 3,
        resize: Literal["squash", "letterbox"] = "squash",
        positive_class: str | None = None,
        class_weights: Literal["none", "balanced"] | list[float] = "none",
        channels_last: bool | None = None,
        compile: bool = False,
    ):
        super().__init__()
        network = NetworkConfig(**network) if isinstance(network, dict) else network
        if not classes or len(classes) < 2:
            raise ConfigError(f"model.classes: need at least 2 classes, got {classes!r} (set data.classes)")
        # Plain types only in hparams, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "network"])
        self.hparams["network"] = asdict(network)
        self.classes = list(classes)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if positive_class is None:
            positive_class = self.classes[1] if len(self.classes) == 2 else None
        elif positive_class not in self.classes:
            raise ConfigError(f"model.positive_class '{positive_class}' is not one of the classes {self.classes}")
        self.positive_index = self.classes.index(positive_class) if positive_class else 1
        weights = None
        if isinstance(class_weights, list):
            if len(class_weights) != len(self.classes):
                raise ConfigError(f"model.class_weights has {len(class_weights)} values for {len(self.classes)} classes")
            weights = class_weights
        self.loss_fn = build_loss(loss, len(self.classes), weights, **(loss_kwargs or {}))
        self.net = build_network(network, self.loss_fn.num_outputs, size, in_chans)
        k = len(self.classes)
        self.train_metrics = ClassificationMetrics(k, self.positive_index, "train/")
        self.val_metrics = ClassificationMetrics(k, self.positive_index, "val/")
        self.test_metrics = ClassificationMetrics(k, self.positive_index, "test/")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(nan_strategy="disable"), MeanMetric(), MeanMetric()
        # Negative log-likelihood of the predicted probabilities: unlike val/loss it means the same thing
        # whatever the training loss, so stage-2 candidates trained with CE, MSE or MAE can be compared on it.
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.test_confusion = confusion_matrix(k)
        # Per-image test outputs for intervals and reports, gathered across DDP ranks by torchmetrics.
        self.test_probs, self.test_targets = CatMetric(), CatMetric()
        self.last_val: dict[str, float] = {}
        self.test_results: dict[str, Any] = {}
        self._use_channels_last = False
        self._compiled = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, C, H, W) -> logits (B, num_outputs)."""
        return (self._compiled or self.net)(x)

    def setup(self, stage: str) -> None:
        on_gpu = self.device.type == "cuda" or (self._trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        wants = self.hparams.channels_last
        if wants and not on_gpu:
            warnings.warn("model.channels_last is a GPU setting; ignored on CPU.", stacklevel=1)
        self._use_channels_last = bool(on_gpu if wants is None else wants and on_gpu)
        if self._use_channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            if on_gpu:
                self._compiled = torch.compile(self.net)
            else:
                warnings.warn("model.compile is a GPU setting; ignored on CPU.", stacklevel=1)
        if stage == "fit" and self.hparams.class_weights == "balanced":
            counts = torch.tensor(self.trainer.datamodule.class_counts("train"), dtype=torch.float32)
            self.loss_fn.set_class_weights(counts.sum() / (len(counts) * counts.clamp_min(1)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, C) as the data layer delivers them -> logits (B, num_outputs)."""
        x = self.net.normalize(images)  # (B, C, H, W) float
        x = x.contiguous(memory_format=torch.channels_last if self._use_channels_last else torch.contiguous_format)
        return self(x)

    def predict_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, C) -> class probabilities (B, K). The one way every consumer (test metrics,
        `predict`, the evaluation report, the web server) turns images into probabilities."""
        return self.loss_fn.probabilities(self.logits(images))

    def predict_loader(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) probabilities and (N,) targets of one eval-mode pass over a loader of (images, targets), for
        passes outside a Trainer stage (no callbacks run); the module's train/eval mode is restored."""
        was_training = self.training
        self.eval()
        probs, targets = [], []
        try:
            with torch.inference_mode():
                for images, target in loader:
                    probs.append(self.predict_probabilities(images.to(self.device)).float().cpu())
                    targets.append(torch.as_tensor(target))
        finally:
            self.train(was_training)
        if not probs:
            return torch.zeros(0, len(self.classes)), torch.zeros(0, dtype=torch.long)
        return torch.cat(probs), torch.cat(targets).long()

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]):
        images, target = batch  # (B, H, W, C) uint8, (B,)
        logits = self.logits(images)
        loss = self.loss_fn(logits, target)
        return loss, self.loss_fn.probabilities(logits.detach()), target

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, probs, target = self._step(batch)
        self.train_loss.update(loss.detach())
        self.train_metrics.update(probs, target)
        self.log("train/loss_step", loss.detach(), prog_bar=True, batch_size=len(target))
        return loss

    def on_train_epoch_end(self) -> None:
        mean_loss = self.train_loss.compute()
        self.train_loss.reset()
        if not torch.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"training loss became {mean_loss.item()} in epoch {self.current_epoch}. Lower the learning "
                "rate, check the images for constant/empty inputs, or use a different loss."
            )
        values = self.train_metrics.compute()
        self.train_metrics.reset()
        self.log("train/loss", mean_loss, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        if "val/acc" in self.last_val:
            # Study 002, 1.2.5: overfitting = train accuracy - validation accuracy, after the epoch.
            self.log("val/overfit", values["train/acc"] - self.last_val["val/acc"], sync_dist=True)

    @staticmethod
    def _nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(probs.clamp_min(1e-7).log(), target)

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, probs, target = self._step(batch)
        self.val_loss.update(loss, weight=len(target))
        self.val_nll.update(self._nll(probs, target), weight=len(target))
        self.val_metrics.update(probs, target)

    def on_validation_epoch_end(self) -> None:
        values = {"val/loss": self.val_loss.compute(), "val/nll": self.val_nll.compute(), **self.val_metrics.compute()}
        self.val_loss.reset()
        self.val_nll.reset()
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(values["val/acc"])
        self.log_dict(values, prog_bar=False, sync_dist=True)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
        self.log("val/loss_prog", values["val/loss"], prog_bar=True, logger=False, sync_dist=True)
        self.last_val = {k: float(v) for k, v in values.items()}

    def test_step(self, batch, batch_idx: int) -> None:
        loss, probs, target = self._step(batch)
        self.test_loss.update(loss, weight=len(target))
        self.test_nll.update(self._nll(probs, target), weight=len(target))
        self.test_metrics.update(probs, target)
        self.test_confusion.update(probs.argmax(1), target)
        self.test_probs.update(probs)
        self.test_targets.update(target.float())

    def on_test_epoch_end(self) -> None:
        values = {"test/loss": self.test_loss.compute(), "test/nll": self.test_nll.compute(), **self.test_metrics.compute()}
        self.log_dict(values, sync_dist=True)
        self.test_results = {
            "metrics": {k.removeprefix("test/"): float(v) for k, v in values.items()},
            "confusion_matrix": self.test_confusion.compute().tolist(),
            "probs": self.test_probs.compute().reshape(-1, len(self.classes)).cpu(),
            "targets": self.test_targets.compute().long().cpu(),
            "classes": self.classes,
            "positive_class": self.classes[self.positive_index] if len(self.classes) == 2 else None,
        }
        for m in (self.test_loss, self.test_nll, self.test_metrics, self.test_confusion, self.test_probs, self.test_targets):
            m.reset()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.predict_probabilities(images)  # (B, K)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Without validation (a cross-validated winner's refit, data.split.fold: all) the plateau is
            # judged on the training loss.
            trainer = getattr(self, "_trainer", None)
            config["monitor"] = "train/loss" if trainer is not None and trainer.limit_val_batches == 0 else "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    @classmethod
    def load_trained(cls, checkpoint: str | Path, map_location: str | torch.device = "cpu") -> ImageClassifier:
        """A trained model for inference: weights-only loading, and no ImageNet download (the checkpoint
        holds every weight), so it works offline whatever the training config said about `pretrained`."""
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network = {**ckpt["hyper_parameters"]["network"], "pretrained": False, "pretrained_path": None}
        model = cls.load_from_checkpoint(checkpoint, map_location=map_location, weights_only=True, network=network)
        return model.eval()

    def num_parameters(self) -> int:
        """Total parameters of the network (study 002 breaks score ties towards fewer parameters)."""
        return sum(p.numel() for p in self.net.parameters())
