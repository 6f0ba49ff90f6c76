"""One report per evaluation: metrics with intervals, calibration, plots and a heat-map gallery.

Written into the run directory as `report.md` (with `report_files/*.png`) and `report.html` (one file,
images embedded), plus `evaluation.json` with the numbers and `test_predictions.parquet` per image.
Built at the end of `cli.py test` and rebuilt from a finished run by `cli.py report RUN_DIR`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

from datamodules import splits
from datamodules.duplicate_audit import summary_text
from evaluation import calibration, plots
from evaluation.document import Document
from evaluation.heatmaps import HeatmapUnavailable, heatmaps, overlay
from evaluation.intervals import bootstrap
from evaluation.resampling import patient_groups, resampling_method
from lightning_modules.metrics import METRIC_NAMES
from runs import files
from runs.cli import ReportConfig, wandb_run_id
from runs.files import RunFiles

TITLES = {"acc": "Accuracy", "balanced_acc": "Balanced accuracy", "precision": "Precision", "sensitivity": "Sensitivity",
          "specificity": "Specificity", "f1": "F1", "mcc": "MCC", "auroc": "AUROC"}


def split_rows(datamodule, split: str) -> pl.DataFrame:
    """path/label/patient_id of one split, in the order its (unshuffled) loader yields images."""
    return datamodule.resolve().frame.filter(pl.col("split") == split).select("path", "label", "patient_id", "target")


def _numpy_probs(probs, k: int) -> np.ndarray:
    """Probabilities as (N, K) float numpy, from a tensor or a list of per-batch tensors (`trainer.predict`)."""
    if isinstance(probs, (list, tuple)):
        probs = torch.cat([p.float().cpu() for p in probs]) if probs else torch.zeros(0, k)
    return probs.float().cpu().numpy().reshape(-1, k)


def _panel(image: np.ndarray, maps: list[np.ndarray], path: Path, min_side: int = 192) -> Path:
    """Original | overlays side by side, upscaled so small inputs stay visible."""
    import cv2

    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    tiles = [rgb, *[overlay(image, m) for m in maps]]
    scale = max(1, int(np.ceil(min_side / rgb.shape[0])))
    tiles = [cv2.resize(t, (t.shape[1] * scale, t.shape[0] * scale), interpolation=cv2.INTER_NEAREST) for t in tiles]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)).save(path)
    return path


def _gallery(model, dataset, probs, targets, cfg: ReportConfig, out: Path) -> tuple[list[tuple[Path, str]], str]:
    """Most confident correct and wrong test images of each class with their heat maps."""
    classes = model.classes
    preds = probs.argmax(1)
    conf = probs.max(1)
    picked = []
    for c in range(len(classes)):
        for correct in (True, False):
            idx = np.flatnonzero((targets == c) & ((preds == c) == correct))
            picked += [(int(i), correct) for i in idx[np.argsort(-conf[idx])][: cfg.heatmaps_per_class]]
    if not picked:
        return [], ""
    images = torch.stack([dataset[i][0] for i, _ in picked])  # (B, H, W, C) uint8
    cams, attention = heatmaps(model.net, images, [int(preds[i]) for i, _ in picked], cfg.heatmap)
    items = []
    for k, (i, correct) in enumerate(picked):
        maps = [cams[k]] + ([attention[k]] if attention is not None else [])
        name = f"heatmap_{k:02d}_{classes[targets[i]]}_{'correct' if correct else 'wrong'}.png"
        caption = (f"true {classes[targets[i]]}, predicted {classes[preds[i]]} (p={conf[i]:.2f}) — "
                   f"{'correct' if correct else 'WRONG'}")
        items.append((_panel(images[k].numpy(), maps, out / name), caption))
    layout = "image | " + cfg.heatmap + (" | attention gate" if attention is not None else "")
    return items, layout


def _calibration(probs: np.ndarray, targets: np.ndarray, cfg: ReportConfig, datamodule, val_probs
                 ) -> tuple[dict, dict, dict, float | None]:
    """ECE, reliability bins and NLL of the test probabilities, and again after temperature scaling fitted on
    the validation split (when asked for and given): (eces, bins, nlls, temperature)."""
    eces = {"test": calibration.expected_calibration_error(probs, targets, cfg.calibration_bins)}
    bins = {"test": calibration.reliability(probs, targets, cfg.calibration_bins)}
    nlls = {"test": calibration.nll(probs, targets)}
    temperature = None
    if cfg.temperature_scaling and val_probs is not None:
        val_targets = split_rows(datamodule, "val")["target"].to_numpy()
        temperature = calibration.fit_temperature(_numpy_probs(val_probs, probs.shape[1]), val_targets)
        scaled = calibration.apply_temperature(probs, temperature)
        name = f"test, T={temperature:.2f}"
        eces[name] = calibration.expected_calibration_error(scaled, targets, cfg.calibration_bins)
        bins[name] = calibration.reliability(scaled, targets, cfg.calibration_bins)
        nlls[name] = calibration.nll(scaled, targets)
    return eces, bins, nlls, temperature


def _figures(run_dir: Path, out: Path, probs: np.ndarray, targets: np.ndarray, classes: list[str], pos: int,
             bins: dict, eces: dict) -> dict[str, Path]:
    """The report's plots: confusion matrix, ROC and PR curves, reliability diagram, training curves."""
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(cm, (targets, probs.argmax(1)), 1)
    return {
        "confusion": plots.confusion_matrices(cm, classes, out / "confusion_matrix.png"),
        "roc": plots.roc_curves(probs, targets, classes, pos, out / "roc.png"),
        "pr": plots.pr_curves(probs, targets, classes, pos, out / "precision_recall.png"),
        "reliability": plots.reliability_diagram(bins, eces, out / "reliability.png"),
        "curves": plots.training_curves(RunFiles(run_dir).metrics, out / "training_curves.png"),
    }


def _test_rows(datamodule, targets: np.ndarray) -> pl.DataFrame:
    """The test split's rows (path, patient, label, ...), checked to line up with the test's targets."""
    rows = split_rows(datamodule, "test")
    if len(rows) != len(targets) or not (rows["target"].to_numpy() == targets).all():
        raise RuntimeError(f"test outputs ({len(targets)} images) do not line up with the test split ({len(rows)} rows)")
    return rows.drop("target")


def build_report(run_dir: Path, model, datamodule, cfg: ReportConfig, test_probs, test_targets, val_probs=None,
                 wandb_mode: str | None = None, wandb_project: str = "medsel", wandb_run=None) -> Path:
    """Write the evaluation report of a tested model into `run_dir`.

    Args:
        run_dir: the run directory.
        model: the trained ImageClassifier.
        datamodule: its ImageDataModule.
        cfg: what to include.
        test_probs: (N, K) test-split probabilities from the test itself, in split order.
        test_targets: (N,) their class indices.
        val_probs: validation-split probabilities (tensor or per-batch list) for temperature scaling, or None.
        wandb_mode: offline/online/disabled/None: where the plots and tables also go.
        wandb_project: W&B project for a resumed run.
        wandb_run: an active W&B run to log into (the test's own logger) instead of resuming one.

    Returns:
        The path of report.html.
    """
    run_dir = Path(run_dir)
    out = RunFiles(run_dir) / files.REPORT_FILES
    out.mkdir(parents=True, exist_ok=True)
    classes = list(model.classes)
    pos = model.positive_index if len(classes) == 2 else 1
    probs = _numpy_probs(test_probs, len(classes))
    targets = np.asarray(test_targets.cpu() if hasattr(test_targets, "cpu") else test_targets).astype(int)
    rows = _test_rows(datamodule, targets)
    groups = patient_groups(rows["patient_id"].to_list())  # None: no ids; a missing id is a patient of its own
    overall, per_class = bootstrap(probs, targets, pos, groups, cfg.bootstrap, cfg.level, cfg.seed)
    rows.with_columns(
        predicted=pl.Series([classes[i] for i in probs.argmax(1)]),
        **{f"p_{c}": pl.Series(probs[:, j]) for j, c in enumerate(classes)},
    ).write_parquet(RunFiles(run_dir) / files.TEST_PREDICTIONS)

    eces, bins, nlls, temperature = _calibration(probs, targets, cfg, datamodule, val_probs)
    figures = _figures(run_dir, out, probs, targets, classes, pos, bins, eces)
    gallery, layout, heat_note = [], "", ""
    if cfg.heatmap != "none":
        try:
            gallery, layout = _gallery(model, datamodule.datasets["test"], probs, targets, cfg, out)
        except HeatmapUnavailable as e:
            heat_note = f"No heat maps: {e}."

    evaluation = {
        "n_images": int(len(targets)), "resampled": "patients" if groups is not None else "images",
        "n_groups": int(len(np.unique(groups))) if groups is not None else int(len(targets)),
        "resampling": resampling_method(targets, groups), "level": cfg.level, "bootstrap": cfg.bootstrap,
        "metrics": {k: asdict(v) for k, v in overall.items()},
        "per_class": {m: {classes[c]: asdict(v) for c, v in enumerate(vals)} for m, vals in per_class.items()},
        "calibration": {"ece": eces, "nll": nlls, "temperature": temperature, "bins": cfg.calibration_bins},
        "positive_class": classes[pos] if len(classes) == 2 else None, "classes": classes,
    }
    RunFiles(run_dir).write_json(files.EVALUATION, evaluation)

    doc = run_document(run_dir, model, datamodule, evaluation, figures, gallery, layout, heat_note)
    _, page = doc.write(RunFiles(run_dir) / files.REPORT, f"Evaluation — {run_dir.name}")
    _log_wandb(run_dir, evaluation, figures, gallery, wandb_mode, wandb_project, wandb_run)
    return page


def metrics_table(evaluation: dict) -> pl.DataFrame:
    pct = f"{100 * evaluation['level']:g}% interval"
    return pl.DataFrame([{"metric": TITLES[k], "value": evaluation["metrics"][k]["value"],
                          pct: f"{evaluation['metrics'][k]['low']:.3f} – {evaluation['metrics'][k]['high']:.3f}"}
                         for k in METRIC_NAMES])


def run_document(run_dir: Path, model, datamodule, evaluation: dict, figures: dict, gallery, layout: str,
                 heat_note: str) -> Document:
    classes = evaluation["classes"]
    doc = Document(run_dir)
    net = model.hparams.get("network", {}) or {}
    doc.h1(f"Evaluation of {net.get('name', 'model')} — {run_dir.name}")
    doc.p(f"Run directory `{run_dir}`; {model.num_parameters():,} parameters; loss `{model.hparams.get('loss')}`; "
          f"classes {', '.join(classes)}" + (f"; positive class **{evaluation['positive_class']}**." if evaluation["positive_class"] else "."))
    doc.p("This is a research tool. Its numbers describe this test set, not a clinical validation.")
    doc.h2("Data split")
    doc.table(splits.count_table(datamodule.resolve().frame, classes))
    audit = RunFiles(run_dir).read_json(files.AUDIT)
    if audit is not None:
        doc.h2("Data audit")
        doc.p("Duplicates and leakage found in this run's data before training (full list: "
              f"`{files.AUDIT_CLUSTERS}`; with thumbnails: `python cli.py audit --config {RunFiles(run_dir).config}`):")
        for line in summary_text(audit).splitlines():
            doc.p(line.removeprefix("[audit] "))
    doc.h2("Test metrics")
    doc.p(f"{evaluation['n_images']} test images; {100 * evaluation['level']:g}% bootstrap intervals from "
          f"{evaluation['bootstrap']} resamples: {evaluation['resampling']}. Stratifying by class keeps every class in "
          "every resample, so no interval is padded by resamples in which a metric is undefined.")
    doc.table(metrics_table(evaluation))
    if evaluation["per_class"]:
        doc.h3("Per class (one-vs-rest)")
        rows = []
        for c in classes:
            row = {"class": c}
            for m in ("sensitivity", "specificity", "precision", "f1"):
                v = evaluation["per_class"][m][c]
                row[m] = f"{v['value']:.3f} ({v['low']:.3f} – {v['high']:.3f})"
            rows.append(row)
        doc.table(pl.DataFrame(rows))
    doc.h2("Calibration")
    cal = evaluation["calibration"]
    doc.table(pl.DataFrame([{"probabilities": k, "ECE": v, "NLL": cal["nll"][k]} for k, v in cal["ece"].items()]))
    if cal["temperature"] is not None:
        doc.p(f"Temperature scaling fitted on the validation split: T = {cal['temperature']:.3f} "
              f"({'over' if cal['temperature'] > 1 else 'under'}-confident before scaling). Accuracy is unchanged by it.")
    doc.image(figures["reliability"], "Reliability diagram")
    doc.h2("Plots")
    doc.image(figures["confusion"], "Confusion matrix")
    doc.image(figures["roc"], "ROC curves")
    doc.image(figures["pr"], "Precision-recall curves")
    doc.image(figures["curves"], "Training curves")
    doc.h2("Where the model looks")
    if gallery:
        doc.p(f"Panels: {layout}. The most confident correct and wrong test images of each class.")
        doc.gallery(gallery)
    else:
        doc.p(heat_note or "Heat maps are off (report.heatmap: none).")
    return doc


def _log_wandb(run_dir: Path, evaluation: dict, figures: dict, gallery, mode: str | None, project: str, run=None) -> None:
    if run is None and mode in (None, "disabled"):
        return
    import wandb


    owned = run is None
    if owned:
        run = wandb.init(project=project, id=wandb_run_id(run_dir), resume="allow", dir=str(run_dir), mode=mode,
                         reinit="finish_previous")
    table = metrics_table(evaluation)
    run.log({
        "report/metrics": wandb.Table(columns=table.columns, data=[list(r) for r in table.iter_rows()]),
        **{f"report/{k}": wandb.Image(str(p)) for k, p in figures.items() if p is not None},
        "report/heatmaps": [wandb.Image(str(p), caption=c) for p, c in gallery],
    })
    run.summary.update({f"test/{k}_ci_low": v["low"] for k, v in evaluation["metrics"].items()})
    run.summary.update({f"test/{k}_ci_high": v["high"] for k, v in evaluation["metrics"].items()})
    if owned:
        run.finish()
