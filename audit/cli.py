"""`python cli.py audit --config <fit config> [--data.source DIR] [--label_issues true]`: the data audit on its own.

It takes `fit`'s command line (the same `--config` and dotted overrides such as `--data.source`,
`--data.classes`, parsed by the same LightningCLI parser) plus the audit's own options below, resolves the
data exactly as `fit` would (same scan, decode cache, split and duplicate audit) but never stops on label
conflicts (`data.on_conflict` is set to `keep` so that the report can show them), then writes the report of
`audit.report` and prints the one-screen summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import polars as pl

from audit.label_issues import find_issues, out_of_fold_probabilities
from audit.report import HTML, write_audit_report
from datamodules import ImageDataModule
from datamodules.duplicate_audit import summary_text
from errors import ConfigError

OOF = "oof_probabilities.parquet"
FIT_CONFIG = "config.yaml"  # the audited fit config, as resolved; the fold runs of --label_issues read it


@dataclass
class AuditConfig:
    """Attributes:
        out: report folder (default: <data.artifacts_dir>/audit/<dataset>).
        label_issues: train a quick k-fold model and list suspected label errors (cleanlab).
        probabilities: out-of-fold probabilities instead of training: parquet/CSV with a path column and one
            column per class (or p_<class>), e.g. a cross-validated sweep's oof/stage2/<point>.parquet.
        folds: folds of the quick model.
        epochs: epochs per fold.
        image_size: input size of the quick model.
        network: timm network of the quick model, trained from scratch.
        fold_arg: extra fit argument for every fold run, e.g. --fold_arg+=--trainer.max_epochs=2
            (every --data/--model/--trainer override of this command reaches the fold runs already).
        limit: clusters / label issues shown with thumbnails.
    """

    out: str | None = None
    label_issues: bool = False
    probabilities: str | None = None
    folds: int = 5
    epochs: int = 4
    image_size: int = 64
    network: str = "resnet10t"
    fold_arg: list[str] = field(default_factory=list)
    limit: int = 60


def _parse(argv: list[str]) -> tuple[AuditConfig, dict, str]:
    """The audit options, the data section and the fit config (YAML) of `argv`, parsed by `fit`'s parser."""
    from runs.cli import MedselCLI  # the fit parser: one vocabulary for every command

    class AuditCLI(MedselCLI):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_class_arguments(AuditConfig, None)
            # A run's saved config.yaml (what the run and sweep reports tell users to audit) records fit's ckpt_path.
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="ignored (a run's config.yaml has it)")

        def before_instantiate_classes(self) -> None:  # parse only: no run directory, no model
            return None

        def instantiate_classes(self) -> None:
            return None

    cli = AuditCLI(args=argv, run=False, parser_kwargs={"prog": "cli.py audit", "description": __doc__})
    names = [f.name for f in fields(AuditConfig)]
    audit = AuditConfig(**{name: cli.config[name] for name in names})
    fit = cli.config.clone()
    for name in [*names, "ckpt_path"]:
        del fit[name]
    return audit, fit.data.as_dict(), cli.parser.dump(fit, skip_validation=True)


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
    args, data_cfg, fit_config = _parse(argv)
    data_cfg = {**data_cfg, "on_conflict": "keep", "audit": {**(data_cfg.get("audit") or {}), "enabled": True}}
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
                      "file leaves out the held-out test split); run --label_issues true to judge every image")
                judged, probs = data.frame.filter(pl.Series(known)), probs[known]
        else:
            (out / "folds").mkdir(parents=True, exist_ok=True)
            (out / "folds" / FIT_CONFIG).write_text(fit_config)
            probs = out_of_fold_probabilities(str(out / "folds" / FIT_CONFIG), data.frame, dm.classes, out / "folds", args.folds,
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
