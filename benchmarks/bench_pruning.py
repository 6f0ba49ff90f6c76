"""Search cost: stage 1 on COVID-CT under k-fold cross-validation, exhaustive against the ways a sweep spends
fewer epochs: median pruning, successive halving, fold early stopping, and both of the last two together.

    python benchmarks/bench_pruning.py [--epochs 12] [--size 64] [--folds 5] [--seeds 3] [--min_epochs 2] [--eta 3]
    python benchmarks/bench_pruning.py --candidates 3 --seeds 1 --epochs 6 --variants exhaustive,both   # shrunk
    python benchmarks/bench_pruning.py --smoke     # tiny generated data: 2 candidates, 3 folds, exhaustive and both

Prints, per seed and variant, the epochs stage 1 trained (a continued rung counts only its new epochs; a fold
run stopped early or pruned counts what it trained), the sweep's wall time and its winner, and whether that
winner is the exhaustive run's or one that the exhaustive leaderboard marks indistinguishable from it (the
95% interval of the difference includes 0); then, over the seeds, each variant's share of the exhaustive
epochs and in how many seeds it reached such a winner. Stage 2 is adam + ce alone: the stage-1 winner's own
config, reused without training (`sweeps.reuse`); the fold models are kept as the final model (no refit).
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
VARIANTS = {  # name -> the sweep keys it adds to the exhaustive one
    "exhaustive": {},
    "median": {"pruner": "median"},
    "halving": {"halving": True},
    "fold_stop": {"fold_stop": True},
    "both": {"halving": True, "fold_stop": True},
}
TITLES = {"exhaustive": "exhaustive", "median": "median pruner", "halving": "successive halving",
          "fold_stop": "fold early stopping", "both": "both together"}


def sweep_config(tmp: Path, variant: str, seed: int, args) -> dict:
    keys = VARIANTS[variant]
    stage1 = {"candidates": [{"network": c} for c in args.candidates],
              "defaults": {"optimizer": "adam", "lr": 0.002, "loss": "ce", "batch_size": 32,
                           "max_epochs": args.epochs, "image_size": args.size}}
    if keys.get("halving"):
        stage1["schedule"] = {"kind": "successive_halving", "min_epochs": args.min_epochs, "eta": args.eta}
    cv = {"folds": args.folds, "final": "ensemble"}
    if keys.get("fold_stop"):
        cv["early_stop"] = {"enabled": True, "min_folds": 2, "test": "corrected_t", "alpha": args.alpha}
    return {
        "name": f"{variant}-s{seed}", "base_config": str(REPO / "configs" / "covid_ct.yaml"), "root": str(tmp),
        "overrides": {"data": {"source": args.source, "num_workers": args.num_workers, **args.data},
                      "model": {"network": {"pretrained": False, "pool": None, "hidden": None, "dropout": None},
                                **args.model},
                      "run": {"early_stopping_patience": None}},
        "stage1": stage1, "cv": cv, "seed": seed,
        # Stage 2 sets the optimizer with its default lr: carry stage 1's, so its one pair is stage 1's config, reused
        "stage2": {"optimizers": ["adam"], "losses": ["ce"], "overrides": {"lr": stage1["defaults"]["lr"]}},
        "selection": {"rule": "metric", "metric": "val/loss", "direction": "minimize"},
        "pruner": keys.get("pruner", "none"), "test_winner": False, "wandb": "disabled",
    }


def stage1_epochs(study: optuna.Study) -> int:
    """Epochs stage 1 trained: a continued rung its new epochs, a run stopped untrained none."""
    total = 0
    for t in study.get_trials():
        ua = t.user_attrs
        if ua.get("reused_from") or ua.get("stopped") or ua.get("budget_limited"):
            continue
        total += int(ua.get("trained_epochs") or ua.get("epochs_run") or 0)
    return total


def run(tmp: Path, variant: str, seed: int, args) -> dict:
    cfg = sweep_config(tmp, variant, seed, args)
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"sweep {cfg['name']} failed")
    out = tmp / cfg["name"]
    study = optuna.load_study(study_name=f"{cfg['name']}/stage1", storage=f"sqlite:///{out / 'optuna.db'}")
    board = pl.read_parquet(out / "stage1_leaderboard.parquet")
    close = board.filter(pl.col("indistinguishable").fill_null(False))["candidate"].to_list() if "indistinguishable" in board.columns else []
    return {"epochs": stage1_epochs(study), "winner": board["candidate"][0], "wall": wall, "close": close}


def verdict(result: dict, exhaustive: dict) -> str:
    if result["winner"] == exhaustive["winner"]:
        return "same"
    return "indistinguishable" if result["winner"] in exhaustive["close"] else "DIFFERENT"


def report(results: dict[int, dict[str, dict]], variants: list[str]) -> None:
    for seed, by in results.items():
        ex = by["exhaustive"]
        print(f"seed {seed}: exhaustive {ex['epochs']} epochs, winner {ex['winner']}, sweep wall {ex['wall']:.0f} s; "
              f"indistinguishable from it: {', '.join(ex['close']) or 'none'}")
        for v in variants[1:]:
            r = by[v]
            print(f"  {TITLES[v]:<20}: {r['epochs']:4d} epochs ({r['epochs'] / ex['epochs']:.0%} of exhaustive), winner "
                  f"{r['winner']} ({verdict(r, ex)}), sweep wall {r['wall']:.0f} s")
    print(f"over {len(results)} seed{'s' * (len(results) != 1)}:")
    for v in variants[1:]:
        share = sum(by[v]["epochs"] for by in results.values()) / sum(by["exhaustive"]["epochs"] for by in results.values())
        good = sum(verdict(by[v], by["exhaustive"]) != "DIFFERENT" for by in results.values())
        print(f"  {TITLES[v]}: {share:.0%} of exhaustive epochs; exhaustive winner or indistinguishable in "
              f"{good}/{len(results)} seeds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "covid_ct" / "metadata.csv"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first_seed", type=int, default=42, help="seeds first_seed .. first_seed + seeds - 1")
    ap.add_argument("--candidates", type=int, default=len(CANDIDATES), help="the first N of the six candidates")
    ap.add_argument("--min_epochs", type=int, default=2, help="successive halving's first rung")
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.05, help="fold early stopping's one-sided p threshold")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; exhaustive always runs")
    ap.add_argument("--num_workers", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny generated data, 2 candidates, 3 folds, 2 epochs at 32 px, "
                                                         "1 seed, exhaustive and both: checks the code path in minutes")
    args = ap.parse_args()
    args.candidates, args.data, args.model, dataset = CANDIDATES[: args.candidates], {}, {}, "COVID-CT"
    variants = ["exhaustive", *[v for v in args.variants.split(",") if v in VARIANTS and v != "exhaustive"]]
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from benchmarks._smoke import CLASSES, tiny_folder

            args.source, args.candidates, args.epochs, args.size = tiny_folder(Path(tmp) / "data"), CANDIDATES[:2], 2, 32
            args.folds, args.seeds, args.min_epochs, args.eta, args.num_workers = 3, 1, 1, 2, 0
            variants = ["exhaustive", "both"]  # each sweep has ~1 min of fixed cost; "both" runs every new path
            args.data = {"classes": list(CLASSES), "artifacts_dir": str(Path(tmp) / "artifacts")}
            args.model, dataset = {"positive_class": CLASSES[1]}, "tiny generated data (smoke)"
        print(f"stage 1 on {dataset}: {len(args.candidates)} candidates, {args.folds}-fold CV, {args.epochs} epochs at "
              f"{args.size}x{args.size}; successive halving min_epochs {args.min_epochs}, eta {args.eta}; fold early "
              f"stopping after 2 folds at p < {args.alpha}; seeds {args.first_seed}..{args.first_seed + args.seeds - 1}",
              flush=True)
        results = {}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            results[seed] = {}
            for v in variants:  # each sweep's line as it ends: a long run that is stopped still says something
                results[seed][v] = r = run(Path(tmp), v, seed, args)
                print(f"  seed {seed} {TITLES[v]}: {r['epochs']} epochs, winner {r['winner']}, sweep wall "
                      f"{r['wall']:.0f} s", flush=True)
    report(results, variants)


if __name__ == "__main__":
    main()
