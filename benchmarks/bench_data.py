"""Decode once: the cached data path against decoding every image every epoch, and its memory.

    python benchmarks/bench_data.py [--source ../shared/datasets/covid_ct/metadata.csv] [--size 224]
    python benchmarks/bench_data.py --smoke     # the same code path on tiny generated data, in seconds

Prints, measured in this run:
  1. images/s of one training epoch from the memory-mapped cache vs. the same epoch decoding every file
     (same augmentations, same loader settings), and the ratio (target >= 8x);
  2. cached images/s per CPU core with the augmentations on (target >= 1500 at 224x224);
  3. peak memory of a fit with 2 loader workers vs. the process baseline and the cache size
     (target: peak - baseline < 1.5 x cache size). Memory is PSS (proportional set size): a page shared
     by N processes counts 1/N in each, so the cache mapped by every worker is counted once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules import ImageDataModule  # noqa: E402
from datamodules.images import load_image  # noqa: E402


class DecodeEveryTime(Dataset):
    """The baseline: read, decode, convert and resize the file on every access, then augment."""

    def __init__(self, paths, labels, size, transform):
        self.paths, self.labels, self.size, self.transform = paths, labels, size, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = load_image(self.paths[i], self.size)
        image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.labels[i])


def epoch_rate(loader, epochs: int = 2) -> float:
    """Images per second over `epochs` full passes (after one warm-up batch)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _ in loader:
            n += len(images)
    return n / (time.perf_counter() - t0)


def _rollup(pids: list[int], fields: tuple[str, ...]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += sum(int(line.split()[1]) for line in fh if line.split(":")[0] in fields)
        except OSError:
            pass
    return total


def pss_kib(pids: list[int]) -> int:
    """Proportional set size: shared pages split between the processes sharing them (sums to the true total)."""
    return _rollup(pids, ("Pss",))


def uss_kib(pids: list[int]) -> int:
    """Unique set size: pages only these processes hold — what they cost beyond what they share."""
    return _rollup(pids, ("Private_Clean", "Private_Dirty"))


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in children(k)]


MEMORY_CHILD = r"""
import json, sys, threading, time, os
sys.path.insert(0, {repo!r})
from benchmarks.bench_data import pss_kib, uss_kib, children, hwm_kib
from runs.cli import MedselCLI
cfg = json.loads({cfg!r})
cli = MedselCLI(args=cfg, run=False)
cli.datamodule.prepare_data()              # the cache exists already: this only checks it
baseline = pss_kib([os.getpid()])          # imports, model, trainer: everything before the first batch
workers_peak = [0]
stop = threading.Event()
def watch():                               # workers' memory has no spikes: sampling their PSS is exact enough
    while not stop.is_set():
        workers_peak[0] = max(workers_peak[0], uss_kib(children(os.getpid())))
        time.sleep(0.1)
threading.Thread(target=watch, daemon=True).start()
cli.trainer.fit(cli.model, datamodule=cli.datamodule)
stop.set()
print("MEMORY", json.dumps({{"baseline_kib": baseline, "main_peak_kib": hwm_kib(os.getpid()), "workers_peak_kib": workers_peak[0]}}))
"""


def hwm_kib(pid: int) -> int:
    """The kernel's exact peak resident set size of one process (VmHWM), spikes included."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


LOADER_CHILD = r"""
import json, os, sys
sys.path.insert(0, {repo!r})
from benchmarks.bench_data import pss_kib, children
from datamodules import ImageDataModule
dm = ImageDataModule(**json.loads({kwargs!r}))
dm.setup("fit")                     # scans and opens the split; no image pixel has been read by this process
baseline = peak = pss_kib([os.getpid()])
for _ in range(2):
    for _batch in dm.train_dataloader():
        peak = max(peak, pss_kib([os.getpid(), *children(os.getpid())]))
print("LOADER", baseline, peak)
"""


def loader_memory(kwargs: dict) -> tuple[float, float]:
    """In a fresh process: PSS before a 2-worker loader starts, and the peak PSS of the process plus its workers
    over two epochs (MiB). No network runs, so the growth is the data pipeline's alone."""
    out = subprocess.run([sys.executable, "-c", LOADER_CHILD.format(repo=str(REPO), kwargs=json.dumps(kwargs))],
                         capture_output=True, text=True, cwd=REPO)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LOADER"))
    _, base, peak = line.split()
    return int(base) / 1024, int(peak) / 1024


def fit_memory(args, classes, workers: int) -> dict:
    """Baseline PSS before the first batch, the main process's exact peak RSS and the workers' peak unique
    memory (MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "data": {"source": args.source, "classes": classes, "image_size": args.size, "augmentation": args.augmentation,
                     "batch_size": args.batch_size, "num_workers": workers, "artifacts_dir": args.artifacts,
                     "split": {"ratios": "80/10/10"}, "on_conflict": args.on_conflict},
            "model": {"network": {"name": "resnet10t"}},
            "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "limit_val_batches": 2},
            "run": {"root": tmp, "wandb": "disabled"}, "report": {"enabled": False},
        }
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(repo=str(REPO), cfg=json.dumps(cfg))],
                             capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("MEMORY")), None)
    if line is None:
        print(out.stdout[-2000:], out.stderr[-2000:])
        raise SystemExit("memory measurement failed")
    return {k: v / 1024 for k, v in json.loads(line.split(" ", 1)[1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "covid_ct" / "metadata.csv"))
    ap.add_argument("--classes", default="NonCOVID,COVID")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--augmentation", default="ct")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--artifacts", default=str(REPO / "artifacts"))
    ap.add_argument("--on-conflict", default="keep", choices=["error", "drop", "keep"],
                    help="data.on_conflict (COVID-CT stores 2 slices under both classes: keep, as configs/covid_ct.yaml)")
    ap.add_argument("--smoke", action="store_true", help="tiny generated data at 32 px: checks the code path in seconds")
    args = ap.parse_args()
    if args.smoke:
        from benchmarks._smoke import CLASSES, tiny_folder

        tmp = Path(tempfile.mkdtemp(prefix="bench_data_smoke"))
        args.source, args.classes, args.artifacts = tiny_folder(tmp / "data"), ",".join(CLASSES), str(tmp / "artifacts")
        args.size, args.batch_size = 32, 8
    classes = args.classes.split(",")
    common = {"source": args.source, "classes": classes, "image_size": args.size, "augmentation": args.augmentation,
              "batch_size": args.batch_size, "artifacts_dir": args.artifacts, "split": {"ratios": "80/10/10"},
              "on_conflict": args.on_conflict}
    torch.set_num_threads(1)

    dm = ImageDataModule(**common, num_workers=0)
    t0 = time.perf_counter()
    dm.prepare_data()
    first = time.perf_counter() - t0
    dm.setup("fit")
    train = dm.datasets["train"]
    view = dm.resolve().view
    cache_mb = view.shape[0] * int(np.prod(view.shape[1:])) / 2**20
    print(f"dataset: {len(train)} training images at {args.size}x{args.size}, augmentation '{args.augmentation}'; "
          f"cache {cache_mb:.0f} MiB ({view.shape[0]} images), prepared in {first:.1f}s (a second run only checks it)")

    frame = dm.resolve().frame.filter(dm.resolve().frame["split"] == "train")
    baseline_ds = DecodeEveryTime(frame["path"].to_list(), frame["target"].to_numpy(), dm.image_size, dm.train_transform)
    cached = epoch_rate(dm.train_dataloader(), epochs=3)
    decoded = epoch_rate(DataLoader(baseline_ds, batch_size=args.batch_size, shuffle=True, num_workers=0), epochs=1)
    print("\n1. one core (num_workers=0, torch threads=1), same augmentations:")
    print(f"   decode every epoch : {decoded:8.1f} images/s")
    print(f"   memory-mapped cache: {cached:8.1f} images/s")
    print(f"   ratio              : {cached / decoded:8.1f}x   (target >= 8x)")

    dm2 = ImageDataModule(**common, num_workers=2, persistent_workers=True)
    dm2.setup("fit")
    two_rate = epoch_rate(dm2.train_dataloader(), epochs=4)
    print(f"\n2. cached path: {cached:.0f} images/s on one core (target >= 1500 per core at 224x224); with 2 loader "
          f"workers {two_rate:.0f} images/s in all (the main process, which collates and receives the batches, shares "
          "the same 2 cores)")

    base, peak = loader_memory({**common, "num_workers": 2, "persistent_workers": True})
    print("\n3. memory of the data pipeline with 2 loader workers, in a fresh process (PSS of it and its workers, MiB):")
    print(f"   baseline {base:.0f}, peak {peak:.0f}: growth {peak - base:.0f} MiB = {(peak - base) / cache_mb:.2f} x the "
          f"{cache_mb:.0f} MiB cache   (target < 1.5x; a copy of the cache per worker alone would be 2x)")
    zero, two = fit_memory(args, classes, 0), fit_memory(args, classes, 2)
    print("   in a real fit (resnet10t, batch 32, one epoch), MiB: main process peak RSS (VmHWM, exact) and the "
          "workers' unique memory")
    print(f"     0 workers: baseline {zero['baseline_kib']:.0f}, main peak {zero['main_peak_kib']:.0f}")
    print(f"     2 workers: baseline {two['baseline_kib']:.0f}, main peak {two['main_peak_kib']:.0f}, workers' unique "
          f"memory {two['workers_peak_kib']:.0f}")
    print(f"     the network's training (activations, gradients, optimizer state) is "
          f"{zero['main_peak_kib'] - zero['baseline_kib']:.0f} MiB of each fit's peak")


if __name__ == "__main__":
    main()
