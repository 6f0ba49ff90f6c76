"""Trial overhead: what a sweep spends outside training steps.

    python benchmarks/bench_trials.py [--config configs/sweep_demo.yaml]
    python benchmarks/bench_trials.py --num_workers 2   # with loader workers, as the study configs have
    python benchmarks/bench_trials.py --smoke     # that sweep shrunk: tiny generated data, 4 trials of 1 epoch

Runs the sweep from scratch (a fresh name and storage) and prints, from the trials' own timing records:
  - per-trial fixed cost = trial wall time (claim to result, process start included) - its train+val
    loop time: mean and max (target <= 2 s);
  - the sweep's wall time against the sum of its trials' train+val time (target <= 1.10x), with the
    rest broken down into start-up, per-trial fixed costs, and the final test/report/outputs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shrink(cfg: dict, tmp: Path) -> None:
    """The sweep config on tiny generated data: 2 candidates, 2 stage-2 pairs, 1 epoch at 32 px."""
    from benchmarks._smoke import CLASSES, tiny_folder

    data = cfg.setdefault("overrides", {}).setdefault("data", {})
    data.update(source=tiny_folder(tmp / "data"), classes=list(CLASSES), artifacts_dir=str(tmp / "artifacts"),
                num_workers=0)
    cfg["stage1"]["candidates"] = cfg["stage1"]["candidates"][:2]
    cfg["stage1"]["defaults"] = {**cfg["stage1"].get("defaults", {}), "max_epochs": 1, "image_size": 32}
    cfg["stage2"] = {**cfg.get("stage2", {}), "optimizers": ["adam"], "losses": ["ce", "mse"]}
    cfg["wandb"] = "disabled"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "sweep_demo.yaml"))
    ap.add_argument("-v", action="store_true", help="also print the sweep's own timeline")
    ap.add_argument("--smoke", action="store_true", help="the sweep on tiny generated data, 2 candidates and 2 "
                                                         "stage-2 pairs of 1 epoch: checks the code path")
    ap.add_argument("--num_workers", type=int, help="data.num_workers of every trial (the demo sweep sets 0; "
                                                    "the study configs 2-4)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = yaml.safe_load(Path(args.config).read_text())
        cfg.update({"name": "bench", "root": tmp, "storage": None, "wandb": cfg.get("wandb")})
        if args.num_workers is not None:
            cfg.setdefault("overrides", {}).setdefault("data", {})["num_workers"] = args.num_workers
        if args.smoke:
            shrink(cfg, Path(tmp))
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(path)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [(time.perf_counter() - t0, line.rstrip()) for line in proc.stdout]  # stamped as they arrive
        wall = time.perf_counter() - t0
        if proc.wait() != 0:
            print("\n".join(line for _, line in lines[-60:]))
            raise SystemExit("sweep failed")
        storage = f"sqlite:///{Path(tmp) / 'bench' / 'optuna.db'}"
        trials = [t for k in (1, 2) for t in optuna.load_study(study_name=f"bench/stage{k}", storage=storage).get_trials()
                  if "train_seconds" in t.user_attrs]
        timeline = [(t, line) for t, line in lines if line.startswith("[sweep]")]
    train = sum(t.user_attrs["train_seconds"] for t in trials)
    in_trials = sum(t.user_attrs["seconds"] for t in trials)
    fixed = [t.user_attrs["seconds"] - t.user_attrs["train_seconds"] for t in trials]
    print(f"sweep {Path(args.config).name}: {len(trials)} trials (one worker), wall time {wall:.1f} s")
    print(f"  sum of trials' train+val loop time : {train:7.1f} s")
    print(f"  per-trial fixed cost               : mean {sum(fixed) / len(fixed):.2f} s, max {max(fixed):.2f} s, "
          f"total {sum(fixed):.1f} s   (target <= 2 s per trial)")
    launches = [t for t, line in timeline if " -> " in line]
    stage2_winner = next(t for t, line in timeline if "stage 2 winner" in line)
    start_up, tail = launches[0], wall - stage2_winner
    print(f"  outside trials                     : {wall - in_trials:7.1f} s, of which")
    print(f"    start-up (interpreter, imports, W&B service, storage, split) until trial 1 : {start_up:5.1f} s")
    print(f"    after the last trial (winner's test and evaluation report, plots, outputs) : {tail:5.1f} s")
    print(f"    between trials (sampling, claims, leaderboards)                             : "
          f"{wall - in_trials - start_up - tail:5.1f} s")
    print(f"  wall / train+val                   : {wall / train:.3f}   (target <= 1.10)")
    print(f"  wall / train+val, leaving out the winner's final test and report: {(wall - tail) / train:.3f}")
    if args.v:
        print("\n".join(f"{t:7.1f}s {line}" for t, line in timeline))


if __name__ == "__main__":
    main()
