"""`python cli.py audit --config <fit config> [--label-issues]`: the data audit on its own, with its report.

It resolves the data exactly as `fit` would (same scan, decode cache, split and duplicate audit) but never
stops on label conflicts (`data.on_conflict` is set to `keep` so that the report can show them), then writes
the report of `audit.report` and prints the one-screen summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl
import yaml

from audit.label_issues import find_issues, out_of_fold_probabilities
from audit.report import HTML, write_audit_report
from datamodules import ImageDataModule
from datamodules.duplicate_audit import summary_text
from errors import ConfigError

OOF = "oof_probabilities.parquet"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cli.py audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a fit config YAML (its data: section is audited)")
    p.add_argument("--out", help="report folder (default: <data.artifacts_dir>/audit/<dataset>)")
    p.add_argument("--label-issues", action="store_true",
                   help="train a quick k-fold model and list suspected label errors (cleanlab)")
    p.add_argument("--probabilities", help="out-of-fold probabilities instead of training: parquet/CSV with "
                                           "a path column and one column per class (or p_<class>), e.g. a "
                                           "cross-validated sweep's oof/stage2/<point>.parquet")
    p.add_argument("--folds", type=int, default=5, help="folds of the quick model (default 5)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per fold (default 4)")
    p.add_argument("--image-size", type=int, default=64, help="input size of the quick model (default 64)")
    p.add_argument("--network", default="resnet10t", help="timm network of the quick model, from scratch")
    p.add_argument("--fold-arg", action="append", default=[],
                   help="extra CLI argument for every fold run, e.g. --fold-arg=--trainer.accelerator=cpu")
    p.add_argument("--limit", type=int, default=60, help="clusters / label issues shown with thumbnails")
    return p


def _data_section(config: Path) -> dict:
    if not config.is_file():
        raise ConfigError(f"--config: '{config}' does not exist; pass a fit config such as configs/demo.yaml")
    data = (yaml.safe_load(config.read_text()) or {}).get("data")
    if not isinstance(data, dict):
        raise ConfigError(f"--config: '{config}' has no data: section; pass a fit config such as configs/demo.yaml")
    return data


def _read_probabilities(path: Path, frame: pl.DataFrame, classes: list[str]):
    """Out-of-fold probabilities per image: a path column and one column per class, named by the class or
    `p_<class>` (a cross-validated sweep's `oof/<stage>/<point>.parquet`; its repeats are averaged)."""
    table = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    table = table.rename({f"p_{c}": c for c in classes if f"p_{c}" in table.columns and c not in table.columns})
    if "path" in table.columns and all(c in table.columns for c in classes) and table["path"].is_duplicated().any():
        table = table.group_by("path", maintain_order=True).agg(pl.col(c).mean() for c in classes)
    missing = [c for c in ["path", *classes] if c not in table.columns]
    if missing:
        raise ConfigError(f"--probabilities: '{path}' lacks column(s) {missing}; it needs path and one column per class")
    joined = frame.select("path").join(table.select("path", *classes), on="path", how="left")
    known = joined[classes[0]].is_not_null().to_numpy()
    if not known.any():
        raise ConfigError(f"--probabilities: '{path}' has a row for none of the {frame.height} images; its path "
                          "column must hold the images' paths as the data section resolves them. Pass the config "
                          "the probabilities were made with (for a sweep: its final/refit/config.yaml or a trial's "
                          "config.yaml under trials/).")
    return joined.select(classes).to_numpy(), known


def main(argv: list[str]) -> int:
    """Run the audit; returns the exit code (errors.DataError / ConfigError propagate to `cli.py`)."""
    args = _parser().parse_args(argv)
    data_cfg = {**_data_section(Path(args.config)), "on_conflict": "keep"}
    data_cfg.setdefault("audit", {})
    if isinstance(data_cfg["audit"], dict):
        data_cfg["audit"] = {**data_cfg["audit"], "enabled": True}
    dm = ImageDataModule(**data_cfg)
    data = dm.resolve()
    source = dm._source_path()
    out = Path(args.out) if args.out else dm.artifacts / "audit" / (source.stem if source.is_file() else source.name)
    issues = None
    if args.label_issues or args.probabilities:
        judged = data.frame
        if args.probabilities:
            probs, known = _read_probabilities(Path(args.probabilities), data.frame, dm.classes)
            if not known.all():  # e.g. a cross-validated sweep's OOF file: the test split has no OOF prediction
                print(f"[audit] label issues judged on {int(known.sum())} of {data.frame.height} images: "
                      f"{int((~known).sum())} have no probability in {args.probabilities} (a sweep's out-of-fold "
                      "file leaves out the held-out test split); run --label-issues to judge every image")
                judged, probs = data.frame.filter(pl.Series(known)), probs[known]
        else:
            probs = out_of_fold_probabilities(args.config, data.frame, dm.classes, out / "folds", args.folds,
                                              args.epochs, args.image_size, args.network, extra=args.fold_arg)
            oof = pl.DataFrame({"path": data.frame["path"], **{c: probs[:, k] for k, c in enumerate(dm.classes)}})
            oof.write_parquet(out / OOF)  # reusable: --probabilities <out>/oof_probabilities.parquet
        issues = find_issues(judged, probs, dm.classes)
        data.audit["label_issues"] = issues.height
    images = data.frame.select("relpath", "label", "patient_id", "split", "cluster_id", "exact_id", "phash")
    page = write_audit_report(out, data.audit, data.clusters, images, issues,
                              title=f"Data audit: {source.name}", limit=args.limit)
    print(summary_text(data.audit, str(page), data.clusters, dm.split_cfg.use_manifest_split))
    if issues is not None:
        print(f"[audit] suspected label issues: {issues.height} (ranked in {out / HTML})")
    return 0
