"""Search cost: stage 1 on COVID-CT run exhaustively and with median pruning.

    python benchmarks/bench_pruning.py [--epochs 8] [--size 64]
    python benchmarks/bench_pruning.py --smoke     # the same code path on tiny generated data, 3 candidates

Prints the epochs each variant trained, the fraction pruning saved, and whether both pick the same
base architecture.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CANDIDATES = ["resnet10t", "mobilenetv4_conv_small", "ctnet10", "tf_efficientnetv2_b0", "resnet18", "densenet121"]


def run(tmp: Path, pruner: str, args) -> tuple[int, str, float, list]:
    cfg = {
        "name": f"prune-{pruner}", "base_config": str(REPO / "configs" / "covid_ct.yaml"), "root": str(tmp),
        "overrides": {"data": {"source": args.source, "num_workers": 2, **args.data},
                      "model": {"network": {"pretrained": False, "pool": None, "hidden": None, "dropout": None},
                                **args.model},
                      "run": {"early_stopping_patience": None}},
        "stage1": {"candidates": [{"network": c} for c in args.candidates],
                   "defaults": {"optimizer": "adam", "lr": 0.002, "loss": "ce", "batch_size": 32,
                                "max_epochs": args.epochs, "image_size": args.size}},
        "stage2": {"optimizers": ["adam"], "losses": ["ce"]},
        "selection": {"rule": "metric", "metric": "val/loss", "direction": "minimize"},
        "pruner": pruner, "test_winner": False, "wandb": "disabled",
    }
    path = tmp / f"{pruner}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        raise SystemExit(f"sweep with pruner={pruner} failed")
    study = optuna.load_study(study_name=f"prune-{pruner}/stage1", storage=f"sqlite:///{tmp / f'prune-{pruner}' / 'optuna.db'}")
    epochs = sum(t.user_attrs.get("epochs_run", 0) for t in study.get_trials())
    winner = pl.read_parquet(tmp / f"prune-{pruner}" / "stage1_leaderboard.parquet")["candidate"][0]
    pruned = [t.params["candidate"] for t in study.get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    return epochs, winner, wall, pruned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "covid_ct" / "metadata.csv"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny generated data, 3 candidates, 3 epochs at 32 px: "
                                                         "checks the code path in a minute")
    args = ap.parse_args()
    args.candidates, args.data, args.model, dataset = CANDIDATES, {}, {}, "COVID-CT"
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from benchmarks._smoke import CLASSES, tiny_folder

            args.source, args.candidates, args.epochs, args.size = tiny_folder(Path(tmp) / "data"), CANDIDATES[:3], 3, 32
            args.data = {"classes": list(CLASSES), "artifacts_dir": str(Path(tmp) / "artifacts"), "num_workers": 0}
            args.model, dataset = {"positive_class": CLASSES[1]}, "tiny generated data (smoke)"
        full = run(Path(tmp), "none", args)
        pruned = run(Path(tmp), "median", args)
    print(f"stage 1 on {dataset}: {len(args.candidates)} candidates, {args.epochs} epochs at {args.size}x{args.size}")
    print(f"  exhaustive   : {full[0]:3d} epochs trained, winner {full[1]}, sweep wall {full[2]:.0f} s")
    print(f"  median pruner: {pruned[0]:3d} epochs trained, winner {pruned[1]}, sweep wall {pruned[2]:.0f} s; "
          f"pruned: {', '.join(pruned[3]) or 'none'}")
    print(f"  epochs saved : {1 - pruned[0] / full[0]:.0%}; same winner: {'yes' if full[1] == pruned[1] else 'NO'}")


if __name__ == "__main__":
    main()
