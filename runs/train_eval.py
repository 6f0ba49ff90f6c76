"""The selected checkpoint measured in eval mode on the training and validation splits, after `fit`.

Study 002's overfit term is training accuracy minus validation accuracy. The accuracy Lightning logs
during training is a running figure: augmentation and dropout are on and the weights change within the
epoch, which put it 0.10-0.17 away from the accuracy of the final weights in a small run. This callback
loads the best checkpoint's weights once fit ends, runs the training split without augmentation and the
validation split in eval mode, and writes

- `train_eval.json`: `train_eval/acc` (and the other metrics), `train_eval/val_acc` and
  `train_eval/overfit` = `train_eval/acc - train_eval/val_acc`, all at that checkpoint;
- `val_predictions.parquet`: path, patient_id, target and `p_<class>` per validation image, which the
  sweep's paired comparisons (`sweeps.compare`) resample.

The cost is one extra pass over the training and validation splits per run. Weights are put back
afterwards, so whatever follows `fit` in the same process sees the model as training left it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import polars as pl
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_modules.metrics import ClassificationMetrics
from runs import files
from runs.files import RunFiles


class TrainEvalWriter(Callback):
    """At fit end, on rank 0: eval-mode metrics of the best checkpoint on train and val (see module doc)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        run = RunFiles(Path(trainer.default_root_dir))
        dm = trainer.datamodule
        if trainer.global_rank != 0 or not Path(ckpt).is_file() or run.pruned.exists() or dm is None:
            return
        if not dm.has_split("val"):  # a refit on every non-test image (data.split.fold: all)
            return
        kept = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        best = torch.load(ckpt, map_location=pl_module.device, weights_only=True)["state_dict"]
        was_training = pl_module.training
        pl_module.load_state_dict(best)
        pl_module.eval()
        try:
            with torch.inference_mode():
                plain = copy.copy(dm.datasets["train"])
                plain.transform = None  # no augmentation: the images the model would be judged on
                train_p, train_t = pl_module.predict_loader(dm._loader("train", dataset=plain))
                val_p, val_t = pl_module.predict_loader(dm._loader("val"))
        finally:
            pl_module.load_state_dict(kept)
            pl_module.train(was_training)
        k = len(pl_module.classes)
        # Rank 0 alone, after the other DDP ranks have left: there is nothing to gather from.
        metrics = ClassificationMetrics(k, pl_module.positive_index, "train_eval/", sync_on_compute=False)
        metrics.update(train_p, train_t)
        out = {key: float(v) for key, v in metrics.compute().items()}
        out["train_eval/val_acc"] = float((val_p.argmax(1) == val_t).float().mean())
        out["train_eval/overfit"] = out["train_eval/acc"] - out["train_eval/val_acc"]
        run.write_json(files.TRAIN_EVAL, {"checkpoint": ckpt, "metrics": out,
                                          "n_train": len(train_t), "n_val": len(val_t)})
        rows = dm.resolve().frame.filter(pl.col("split") == "val")
        pl.DataFrame({
            "path": rows["path"], "patient_id": rows["patient_id"], "target": val_t.numpy(),
            **{f"p_{c}": val_p[:, j].numpy() for j, c in enumerate(pl_module.classes)},
        }).write_parquet(run / files.VAL_PREDICTIONS)
