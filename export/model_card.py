"""The model card that travels with a model: `model_card.json` and `model_card.md`.

Follows "Model Cards for Model Reporting" (Mitchell et al. 2019: model details, intended use, factors, metrics,
evaluation data, training data, caveats) and the CLAIM checklist items this tool knows (data source, patient
grouping, split counts, reference standard's audit, selection procedure, metrics with intervals, calibration,
limitations, code and software). Every number is read from the run's or sweep's own files (evaluation.json,
split.json, split_counts.csv, audit.json, model.json, winner.json, sweep.yaml, the leaderboards); nothing is
retyped, and a section whose file is absent says so.

    write_model_card("artifacts/sweeps/demo", "artifacts/sweeps/demo")   # a sweep folder: its winner
    write_model_card("artifacts/runs/demo/v1", "export_onnx")             # a run directory
"""

from __future__ import annotations

import csv
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from export.layout import MODEL_CARD_JSON, MODEL_CARD_MD
from export.model_card_text import render
from runs import files

WARNING = ("Research use only. This model is not a medical device and has not been validated for clinical use; "
           "its output must not be used for diagnosis or treatment decisions.")
SMALL_TEST = 100  # fewer test images than this: intervals are wide, said as a limitation


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _yaml(path: Path) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _csv(path: Path) -> list[dict[str, str]] | None:
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def locate(path: str | Path) -> tuple[Path | None, Path | None]:
    """(sweep folder or None, run directory or None) for a sweep folder, run directory or checkpoint file."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / files.WINNER).is_file():
        return p, files.winner_run_dir(p)
    if p.is_file() and p.suffix == ".ckpt":
        run = p.parent.parent if p.parent.name == files.CHECKPOINTS else None
        return None, run if run is not None and (run / files.CONFIG).is_file() else None
    return None, p if p.is_dir() else None


def data_section(run: Path) -> dict[str, Any]:
    """Training data: source, classes, split (ratios, seed, patient grouping), counts per split, the audit."""
    config = (_yaml(run / files.CONFIG) or {}).get("data") or {}
    split = _json(run / files.SPLIT) or {}
    counts = _csv(run / files.SPLIT_COUNTS)
    audit = _json(run / files.AUDIT)
    split_cfg = config.get("split") or {}
    return {
        "source": config.get("source") or split.get("source"),
        "classes": split.get("classes") or config.get("classes"),
        "split": {"ratios": split.get("ratios"), "seed": split.get("seed"), "group_by_patient": split.get("group_by_patient"),
                  "group_by": split_cfg.get("group_by"), "folds": split_cfg.get("folds"), "file": Path(split["file"]).name
                  if split.get("file") else None, "assignment_hash": split.get("assignment_hash")},
        "counts": {row["class"]: {k: int(v) for k, v in row.items() if k != "class"} for row in counts} if counts else None,
        "audit": audit,
        "image_size": config.get("image_size"), "channels": config.get("channels"), "resize": config.get("resize"),
        "dicom": config.get("dicom"),
    }


def _leaderboard(sweep: Path, stage: str) -> dict[str, Any] | None:
    """A stage's candidates, its winner, the set the validation data cannot tell from it, the simplest of it."""
    rows = _csv(sweep / f"{stage}_leaderboard.csv")
    if not rows:
        return None
    keys = [k for k in ("candidate", "optimizer", "loss") if k in rows[0]]

    def name(row):
        return " + ".join(row[k] for k in keys)

    def params(row) -> int:  # a grid point without a finished trial has no parameter count
        return int(float(row["params"])) if row.get("params") not in (None, "", "NaN") else 2**62

    rows = sorted(rows, key=lambda r: float(r["rank"]))
    same = [r for r in rows if r is rows[0] or r.get("indistinguishable") == "true"]
    simplest = min(same, key=lambda r: (params(r), float(r["rank"])))
    return {"grid_points": [name(r) for r in rows], "winner": name(rows[0]),
            "indistinguishable": [name(r) for r in same],
            "parsimonious": name(simplest) if simplest is not rows[0] else None,
            "parsimonious_params": params(simplest),
            "compared_by": ("the leaderboard's vs_winner: the 95% interval of the difference from the winner on the "
                            "stage's headline metric includes 0 (paired bootstrap on the same validation images; "
                            "corrected resampled t-test over repeats/folds)")}


def selection_section(sweep: Path) -> dict[str, Any]:
    """How the sweep chose: stages, candidates, folds/repeats, the rule, indistinguishable set, budget."""
    cfg = _yaml(sweep / "sweep.yaml") or {}
    winner = _json(sweep / files.WINNER) or {}
    sel = cfg.get("selection") or {}
    rule = ({"rule": "metric", "metric": sel.get("metric"), "direction": sel.get("direction")} if sel.get("rule") == "metric"
            else {"rule": sel.get("rule"), "terms": sel.get("terms")})
    stage1 = cfg.get("stage1") or {}
    return {
        "sweep": winner.get("sweep") or cfg.get("name"),
        "stages": {"stage1": {"what": "base architecture", "candidates": stage1.get("candidates"),
                              "defaults": stage1.get("defaults"), "leaderboard": _leaderboard(sweep, "stage1")},
                   "stage2": {"what": "optimizer x loss", "optimizers": (cfg.get("stage2") or {}).get("optimizers"),
                              "losses": (cfg.get("stage2") or {}).get("losses"), "leaderboard": _leaderboard(sweep, "stage2")}},
        "repeats": cfg.get("repeats"), "cv": cfg.get("cv"), "seed": cfg.get("seed"),
        "rule": {**rule, "ties": "fewer parameters"},
        "winner": {k: winner.get(k) for k in ("base_architecture", "optimizer", "loss", "params", "trial", "run_dir")},
        "budget": {"pruner": cfg.get("pruner"),
                   "early_stopping_patience": ((cfg.get("overrides") or {}).get("run") or {}).get("early_stopping_patience"),
                   "max_epochs": stage1.get("defaults", {}).get("max_epochs")},
    }


def test_section(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    if evaluation is None:
        return None
    keep = ("n_images", "n_groups", "resampled", "resampling", "level", "bootstrap", "metrics", "per_class", "classes",
            "positive_class")
    return {k: evaluation[k] for k in keep if k in evaluation}


def calibration_section(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    cal = (evaluation or {}).get("calibration")
    if not cal:
        return None
    ece = cal.get("ece") or {}
    before = ece.get("test")
    after = next((v for k, v in ece.items() if k != "test"), None)
    return {"ece_before": before, "ece_after_temperature": after, "temperature": cal.get("temperature"),
            "nll": cal.get("nll"), "bins": cal.get("bins")}


def limitations(card: dict[str, Any]) -> list[str]:
    """Known limitations, each stated with the figure it rests on."""
    out = []
    test, data, model = card.get("test") or {}, card.get("data") or {}, card.get("model") or {}
    n = test.get("n_images")
    if n is None:
        out.append("No test evaluation was found (evaluation.json absent): the model's performance is unmeasured.")
    elif n < SMALL_TEST:
        widest = max(((m, v["high"] - v["low"]) for m, v in (test.get("metrics") or {}).items()), key=lambda t: t[1], default=None)
        out.append(f"Small test set: {n} images" + (f"; the widest 95% interval ({widest[0]}) spans {widest[1]:.3f}" if widest else "")
                   + ". Differences smaller than the intervals are not established.")
    out.append(f"Single data source ({data.get('source')}): one site/dataset, no external validation; performance on "
               "other scanners, populations or protocols is unknown.")
    net = model.get("network") or {}
    origin = ("initialised from pretrained weights" + (f" ({net.get('pretrained_path')})" if net.get("pretrained_path") else
              " (ImageNet, via timm)")) if net.get("pretrained") or net.get("pretrained_path") else "trained from scratch"
    out.append(f"The network was {origin}.")
    audit = data.get("audit") or {}
    if audit.get("leakage") or audit.get("label_conflict"):
        out.append(f"The data audit found {audit.get('leakage', 0)} leakage and {audit.get('label_conflict', 0)} label-conflict "
                   f"clusters (policy on_conflict: {audit.get('on_conflict')}).")
    return out


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python's and the installed packages' versions (a package that is not installed is left out)."""
    out = {"python": platform.python_version()}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def software_section(sweep: Path | None, run: Path | None) -> dict[str, Any]:
    config = sweep / "winner.yaml" if sweep is not None and (sweep / "winner.yaml").is_file() else (
        run / files.CONFIG if run is not None and (run / files.CONFIG).is_file() else None)
    return {"versions_when_card_written": versions(("torch", "lightning", "timm", "torchmetrics", "optuna", "onnx", "onnxruntime")),
            "reproduce": f"python cli.py fit --config {config}" if config else None,
            "config_file": config.name if config else None,
            "config": config.read_text() if config else None}


def card_data(path: str | Path) -> dict[str, Any]:
    """Everything the card says, read from the files of `path` (sweep folder, run directory or checkpoint)."""
    sweep, run = locate(path)
    evaluation = _json(run / files.EVALUATION) if run else None
    model = _json(run / files.MODEL_INFO) if run else None
    card: dict[str, Any] = {
        "card_format": "Model Cards for Model Reporting (Mitchell et al. 2019) with CLAIM items",
        "model": model,
        "intended_use": {"warning": WARNING,
                         "primary_use": "research: classifying images of the kind it was trained on into its classes",
                         "out_of_scope": "diagnosis, triage or any clinical decision; images from other modalities, "
                                         "body parts or classes than the training data"},
        "data": data_section(run) if run else None,
        "selection": selection_section(sweep) if sweep else None,
        "test": test_section(evaluation),
        "calibration": calibration_section(evaluation),
        "source": {"sweep": sweep.name if sweep else None, "run_dir": str(run) if run else None},
    }
    card["limitations"] = limitations(card)
    card["software"] = software_section(sweep, run)
    return card


def write_model_card(run_or_sweep_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write model_card.json and model_card.md into `out_dir`; returns their paths.

    Args:
        run_or_sweep_dir: a sweep folder (its winner is described, with how it was selected), a run directory,
            or a checkpoint file inside one.
        out_dir: where to write (an export folder, or the sweep folder itself).
    """
    card = card_data(run_or_sweep_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sw = card["software"]
    if sw["config"] is not None:  # the config travels with the card: the reproduce command names the copy
        copy = out / sw["config_file"]
        if not copy.exists() or copy.read_text() != sw["config"]:
            copy.write_text(sw["config"])
        sw["reproduce"] = f"python cli.py fit --config {copy}"
    (out / MODEL_CARD_JSON).write_text(json.dumps(card, indent=2, default=str))
    (out / MODEL_CARD_MD).write_text(render(card))
    return out / MODEL_CARD_JSON, out / MODEL_CARD_MD
