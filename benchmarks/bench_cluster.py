"""A sweep on SLURM against the same sweep run locally: launch latency and per-trial overhead in a worker.

    python benchmarks/bench_cluster.py [--partition debug] [--epochs 4] [--size 64]
    python benchmarks/bench_cluster.py --smoke     # tiny generated data, 2 trials of 1 epoch: checks the code path

Needs a SLURM whose jobs see this folder (`.ci/start_slurm.sh` starts one on this machine). Runs the sweep
(2 candidates, then 2 optimizer x loss pairs) twice from scratch: locally on SQLite, then with
`--launcher slurm` (1 worker, so its trials run one after another as the local ones do) on a journal file, and
prints from the trials' own timing records:
  - submission -> the first trial's first epoch (the first line of its progress file), against the same
    for the local sweep (command start -> first epoch);
  - per-trial wall time (claim to result) in the SLURM worker / locally: the ratio of the means (target <= 1.10
    on real-length trials), and the per-trial fixed cost (wall - train+val loop) on each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sweep_config(tmp: Path, name: str, epochs: int, size: int, smoke: bool) -> dict:
    data = {"num_workers": 0, "artifacts_dir": str(tmp / "artifacts")}
    if smoke:
        from benchmarks._smoke import CLASSES, tiny_folder

        data.update(source=tiny_folder(tmp / "data"), classes=list(CLASSES))
    candidates = [{"network": "resnet10t"}] if smoke else [{"network": "resnet10t"}, {"network": "ctnet10"}]
    optimizers = ["adam"] if smoke else ["rmsprop", "adam"]
    return {
        "name": name, "base_config": str(REPO / "configs" / "demo.yaml"), "root": str(tmp / "sweeps"),
        "overrides": {"run": {"early_stopping_patience": None}, "data": data,
                      "trainer": {"enable_model_summary": False}},
        "stage1": {"candidates": candidates,
                   "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": epochs,
                                "image_size": size}},
        "stage2": {"optimizers": optimizers, "losses": ["ce"]}, "wandb": "disabled",
    }


def trials_of(storage, name: str) -> list:
    from optuna.trial import TrialState

    return [t for k in (1, 2) for t in optuna.load_study(study_name=f"{name}/stage{k}", storage=storage).get_trials()
            if t.state == TrialState.COMPLETE and t.user_attrs.get("duplicate_of") is None]


def first_epoch_at(out: Path) -> float:
    """When the first line of any trial's progress file was written (its file's first modification)."""
    files = list(out.glob("trials/stage1/*/progress.jsonl"))
    return min(f.stat().st_mtime for f in files) if files else float("nan")


def run(cfg: dict, tmp: Path, extra: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(path), *extra], cwd=REPO,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"the {cfg['name']} sweep failed:\n{proc.stdout[-3000:]}")
    return started, proc


def summary(trials: list) -> tuple[float, float]:
    walls = [t.user_attrs["seconds"] for t in trials]
    fixed = [t.user_attrs["seconds"] - t.user_attrs.get("train_seconds", 0) for t in trials]
    return statistics.mean(walls), statistics.mean(fixed)


def default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    return next((p.rstrip("*") for p in out if p.endswith("*")), out[0] if out else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partition", default=os.environ.get("MEDSEL_TEST_SLURM_PARTITION"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny generated data, 1 epoch at 32 px")
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.size = 1, 32
    partition = args.partition or default_partition()
    from sweeps import coordinator as coord

    with tempfile.TemporaryDirectory(dir=REPO / "artifacts" if (REPO / "artifacts").is_dir() else None) as tmp_name:
        tmp = Path(tmp_name)
        local_cfg = sweep_config(tmp, "local", args.epochs, args.size, args.smoke)
        local_start, _ = run(local_cfg, tmp, [])
        local_first = first_epoch_at(tmp / "sweeps" / "local") - local_start
        local = trials_of(coord.make_storage(f"sqlite:///{tmp / 'sweeps' / 'local' / 'optuna.db'}"), "local")

        slurm_cfg = sweep_config(tmp, "slurm", args.epochs, args.size, args.smoke)
        slurm_cfg.update(storage=f"journal://{tmp / 'shared' / 'slurm.log'}",
                         launcher={"kind": "slurm", "workers": 1, "partition": partition, "time": "01:00:00",
                                   "cpus_per_worker": 1})
        run(slurm_cfg, tmp, [])
        record = json.loads((tmp / "sweeps" / "slurm" / "launch.json").read_text())
        slurm_first = first_epoch_at(tmp / "sweeps" / "slurm") - record["submitted_at"]
        slurm = trials_of(coord.make_storage(slurm_cfg["storage"]), "slurm")

    (lw, lf), (sw, sf) = summary(local), summary(slurm)
    print(f"{len(local)} trials each, {args.epochs} epoch(s) at {args.size} px, partition {partition}")
    print(f"submission -> first trial's first epoch: {slurm_first:.1f} s (local sweep start -> first epoch: "
          f"{local_first:.1f} s)")
    print(f"per-trial wall: SLURM worker {sw:.1f} s, local {lw:.1f} s; fixed cost (wall - train+val): "
          f"{sf:.1f} s vs {lf:.1f} s")
    print(f"per-trial wall in a SLURM worker / local: {sw / lw:.2f}")


if __name__ == "__main__":
    main()
