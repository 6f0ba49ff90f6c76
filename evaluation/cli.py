"""`EvaluationCLI`: the run CLI with the evaluation report attached, behind `cli.py fit/validate/test/predict`;
and `python cli.py report RUN_DIR [--report.heatmap gradcam++ ...]`, which rebuilds a finished run's report.

The report is built from the outputs of the test itself (the module's test step: one pass over the test
split), plus one pass over the validation split for temperature scaling; nothing is predicted twice.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import WandbLogger

from errors import ConfigError
from evaluation.report import build_report
from runs import files
from runs.cli import MedselCLI, ReportConfig, RunConfig, wandb_mode
from runs.files import RunFiles
from runs.open import find_checkpoint


class EvaluationCLI(MedselCLI):
    """`MedselCLI` that, after `test`, writes the evaluation report its `report` config section describes."""

    def after_test(self) -> None:
        report = ReportConfig(**_fields(self._cfg().report))
        results = self.model.test_results
        if not report.enabled or not results or not self.trainer.is_global_zero:
            return
        if self.trainer.world_size > 1:  # DistributedSampler interleaves images: rows would not match paths
            print(f"[report] skipped on {self.trainer.world_size} devices; build it with: python cli.py report {self.run_dir}")
            return
        val_probs = None
        if report.temperature_scaling and self.datamodule.has_split("val"):
            val_probs, _ = self.model.predict_loader(self.datamodule.val_dataloader())
        wandb_run = next((lg.experiment for lg in self.trainer.loggers if isinstance(lg, WandbLogger)), None)
        run = RunConfig(**_fields(self._cfg().run))
        page = build_report(self.run_dir, self.model, self.datamodule, report, results["probs"], results["targets"],
                            val_probs, wandb_mode(run.wandb), wandb_run=wandb_run)
        print(f"[report] {page}")


def _fields(namespace) -> dict:
    return {k: v for k, v in vars(namespace).items() if not k.startswith("__")}


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="cli.py report", description=__doc__)
    parser.add_argument("run_dir", type=str, help="a run directory (artifacts/runs/<name>/<version>)")
    parser.add_argument("--checkpoint", type=str, default=None, help="checkpoint to evaluate (default: best)")
    parser.add_class_arguments(ReportConfig, "report")
    args = parser.parse_args(argv)
    checkpoint, run_dir = find_checkpoint(args.checkpoint or args.run_dir)
    run_dir = run_dir or Path(args.run_dir)
    if not RunFiles(run_dir).config.exists():
        raise ConfigError(f"'{run_dir}' is not a run directory (no {files.CONFIG}); pass artifacts/runs/<name>/<version>")
    given = [f"--report.{k}={v}" for k, v in _fields(args.report).items() if v != getattr(ReportConfig(), k)]
    # Same path as `cli.py test`: one device (an ordered pass), the run's own config and W&B run.
    EvaluationCLI(args=["test", "--config", str(RunFiles(run_dir).config), f"--ckpt_path={checkpoint}",
                        "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.num_nodes=1",
                        "--trainer.enable_progress_bar=false", *given])
    return 0
