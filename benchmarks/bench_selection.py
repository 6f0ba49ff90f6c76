"""Selection stability: one train/val split vs k-fold cross-validation, on COVID-CT.

    python benchmarks/bench_selection.py [--seeds 5] [--folds 5] [--epochs 6] [--size 64]
    python benchmarks/bench_selection.py --smoke     # the same code path on a tiny generated manifest

For every seed the same stage-1 candidates are trained with the same settings and epochs, and a winner is
chosen by validation accuracy in two ways:

- **single split**: one train/val split of the non-test images (fold 0 of that seed's k-fold assignment:
  80/20 of the non-test images, patient-grouped), the winner being the best validation accuracy;
- **k-fold CV**: all k folds of the same assignment, the winner being the best mean over folds (fold 0's
  runs are shared, so the comparison is paired).

The test split is COVID-CT's official one for every seed and both procedures, so test accuracies compare
models, not test sets; the seed changes the fold assignment and training's randomness. The chosen model is
then tested once: the single-split winner's own run, and the CV winner refit on every non-test image for
the median best epoch of its folds (what `cv.final: refit` does). Everything trains through the sweep's
own trial path (`sweeps.jobs`, the fit parser, the data layer's folds).

Prints, for each procedure, the winner per seed, how often the most frequent winner came out, and the
mean, standard deviation and range of the chosen models' test accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CANDIDATES = ["resnet10t", "mobilenetv4_conv_small", "ctnet10"]


def fit_config(args, seed: int, network: str, fold: int | str, run_dir: Path, epochs: int) -> dict:
    from sweeps.config import merge
    from sweeps.trials import load_yaml

    base = load_yaml(REPO / "configs" / "covid_ct.yaml")
    return merge(base, {
        "seed_everything": seed,
        "data": {"source": args.source, "artifacts_dir": args.artifacts, "num_workers": 0, "image_size": args.size,
                 "batch_size": 32, "columns": {"split": "official_split"},
                 "split": {"use_manifest_split": True, "folds": args.folds, "fold": fold, "seed": seed}},
        "model": {"network": {"name": network, "pretrained": False, "pool": None, "hidden": None, "dropout": None},
                  "loss": "ce", "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.002}}},
        "trainer": {"max_epochs": epochs, "enable_progress_bar": False, "enable_model_summary": False},
        "run": {"dir": str(run_dir), "early_stopping_patience": None, "wandb": "disabled"},
        "report": {"enabled": False},
    })


def train(cfg: dict, run_dir: Path) -> dict:
    from sweeps import jobs, trials

    outcome = jobs.execute(cfg, run_dir)
    if outcome.status != "ok":
        raise SystemExit(f"fit failed in {run_dir}: {outcome.reason}")
    return trials.summarize(run_dir, "best", "val/loss", "min")


def test_acc(run_dir: Path) -> float:
    from sweeps.jobs import evaluate_on_test

    return float(evaluate_on_test(run_dir)["metrics"]["acc"])


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"mean {statistics.mean(values):.3f}, sd {sd:.3f}, range {min(values):.3f}-{max(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "covid_ct" / "metadata.csv"))
    ap.add_argument("--artifacts", default=str(REPO / "artifacts"), help="data cache folder (reused across runs)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES)
    ap.add_argument("--smoke", action="store_true", help="a tiny generated manifest, 1 seed x 2 folds x 2 candidates "
                                                         "of 1 epoch at 32 px: checks the code path")
    args = ap.parse_args()
    if args.smoke:
        from benchmarks._smoke import tiny_manifest

        tmp = Path(tempfile.mkdtemp(prefix="bench_selection_smoke"))
        args.source, args.artifacts = tiny_manifest(tmp / "data"), str(tmp / "artifacts")
        args.seeds, args.folds, args.epochs, args.size, args.candidates = 1, 2, 1, 32, args.candidates[:2]
    if not Path(args.source).exists():
        raise SystemExit(f"data not found: {args.source} (pass --source)")
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    from sweeps import jobs
    from sweeps.crossval import refit_epochs

    jobs.start_forkserver()
    import polars as pl

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            val = {c: [] for c in args.candidates}
            best_epochs = {c: [] for c in args.candidates}
            dirs = {}
            for network in args.candidates:
                for fold in range(args.folds):
                    run_dir = Path(tmp) / f"s{seed}" / f"{network}-f{fold}"
                    summary = train(fit_config(args, seed, network, fold, run_dir, args.epochs), run_dir)
                    val[network].append(summary["metrics"]["val/acc"])
                    best_epochs[network].append(summary["epoch"])
                    dirs[network, fold] = run_dir
            single = max(args.candidates, key=lambda c: (val[c][0], -args.candidates.index(c)))
            cv = max(args.candidates, key=lambda c: (statistics.mean(val[c]), -args.candidates.index(c)))
            refit_dir = Path(tmp) / f"s{seed}" / f"{cv}-refit"
            epochs = refit_epochs(pl.DataFrame({"epoch": best_epochs[cv]}))
            outcome = jobs.execute(fit_config(args, seed, cv, "all", refit_dir, epochs), refit_dir)
            if outcome.status != "ok":
                raise SystemExit(f"refit failed in {refit_dir}: {outcome.reason}")
            row = {"seed": seed, "single": single, "single_test_acc": test_acc(dirs[single, 0]),
                   "cv": cv, "cv_test_acc": test_acc(refit_dir), "refit_epochs": epochs,
                   **{f"val_f0/{c}": val[c][0] for c in args.candidates},
                   **{f"val_cv/{c}": statistics.mean(val[c]) for c in args.candidates}}
            rows.append(row)
            print(f"seed {seed}: single split -> {single} (test acc {row['single_test_acc']:.3f}); "
                  f"{args.folds}-fold CV -> {cv} (refit {epochs} epochs, test acc {row['cv_test_acc']:.3f})  "
                  f"[{time.perf_counter() - started:.0f} s]", flush=True)
    frame = pl.DataFrame(rows)
    with pl.Config(tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=30):
        print("\n" + str(frame.select("seed", "single", "single_test_acc", "cv", "cv_test_acc", "refit_epochs")) + "\n")
    n = len(rows)
    for name, col in (("single train/val split", "single"), (f"{args.folds}-fold cross-validation", "cv")):
        counts = Counter(frame[col].to_list())
        top, k = counts.most_common(1)[0]
        print(f"{name}: winners {dict(counts)}; the most frequent ({top}) came out in {k}/{n} seeds; "
              f"test accuracy of the chosen models: {spread(frame[f'{col}_test_acc'].to_list())}")
    print(f"\n{len(args.candidates)} candidates, {args.epochs} epochs at {args.size} px, {n} seeds; "
          f"{(time.perf_counter() - started) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
