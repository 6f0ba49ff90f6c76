"""Trial overhead: what a sweep spends outside training steps.

    python benchmarks/bench_trials.py [--config configs/sweep_demo.yaml]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "sweep_demo.yaml"))
    ap.add_argument("-v", action="store_true", help="also print the sweep's own timeline")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = yaml.safe_load(Path(args.config).read_text())
        cfg.update({"name": "bench", "root": tmp, "storage": None, "wandb": cfg.get("wandb")})
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(path)], cwd=REPO,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit("sweep failed")
        storage = f"sqlite:///{Path(tmp) / 'bench' / 'optuna.db'}"
        trials = [t for k in (1, 2) for t in optuna.load_study(study_name=f"bench/stage{k}", storage=storage).get_trials()
                  if "train_seconds" in t.user_attrs]
        timeline = [line for line in proc.stdout.splitlines() if line.startswith("[sweep]")]
    train = sum(t.user_attrs["train_seconds"] for t in trials)
    in_trials = sum(t.user_attrs["seconds"] for t in trials)
    fixed = [t.user_attrs["seconds"] - t.user_attrs["train_seconds"] for t in trials]
    print(f"sweep {Path(args.config).name}: {len(trials)} trials (one worker), wall time {wall:.1f} s")
    print(f"  sum of trials' train+val loop time : {train:7.1f} s")
    print(f"  per-trial fixed cost               : mean {sum(fixed) / len(fixed):.2f} s, max {max(fixed):.2f} s, "
          f"total {sum(fixed):.1f} s   (target <= 2 s per trial)")
    print(f"  outside trials (interpreter start, imports, studies, final test, report, plots): {wall - in_trials:.1f} s")
    print(f"  wall / train+val                   : {wall / train:.3f}   (target <= 1.10)")
    if args.v:
        print("\n".join(timeline))


if __name__ == "__main__":
    main()
