"""Decode once: the cached data path against decoding every image every epoch, and its memory.

    python benchmarks/bench_data.py [--source ../shared/datasets/covid_ct/metadata.csv] [--size 224]

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
import os
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


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in children(k)]


MEMORY_CHILD = r"""
import json, sys, threading, time, os
sys.path.insert(0, {repo!r})
from benchmarks.bench_data import pss_kib, children
from lightning_modules.cli import MedselCLI
cfg = json.loads({cfg!r})
cli = MedselCLI(args=cfg, run=False)
cli.datamodule.prepare_data()              # the cache exists already: this only checks it
time.sleep(0.5)
baseline = pss_kib([os.getpid()])          # imports, model, trainer: everything but the data pipeline
peak = [baseline]
stop = threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], pss_kib([os.getpid(), *children(os.getpid())]))
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
cli.trainer.fit(cli.model, datamodule=cli.datamodule)
stop.set()
print("MEMORY", json.dumps({{"baseline_kib": baseline, "peak_kib": peak[0]}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "covid_ct" / "metadata.csv"))
    ap.add_argument("--classes", default="NonCOVID,COVID")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--augmentation", default="ct")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--artifacts", default=str(REPO / "artifacts"))
    args = ap.parse_args()
    classes = args.classes.split(",")
    torch.set_num_threads(1)

    dm = ImageDataModule(source=args.source, classes=classes, image_size=args.size, augmentation=args.augmentation,
                         batch_size=args.batch_size, num_workers=0, artifacts_dir=args.artifacts, split={"ratios": "80/10/10"})
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
    cached_loader = dm.train_dataloader()
    baseline_loader = DataLoader(baseline_ds, batch_size=args.batch_size, shuffle=True, num_workers=0)
    cached = epoch_rate(cached_loader, epochs=3)
    decoded = epoch_rate(baseline_loader, epochs=1)
    print("\n1. one core (num_workers=0, torch threads=1), same augmentations:")
    print(f"   decode every epoch : {decoded:8.1f} images/s")
    print(f"   memory-mapped cache: {cached:8.1f} images/s")
    print(f"   ratio              : {cached / decoded:8.1f}x   (target >= 8x)")

    dm2 = ImageDataModule(source=args.source, classes=classes, image_size=args.size, augmentation=args.augmentation,
                          batch_size=args.batch_size, num_workers=2, artifacts_dir=args.artifacts, split={"ratios": "80/10/10"},
                          persistent_workers=True)
    dm2.setup("fit")
    two = epoch_rate(dm2.train_dataloader(), epochs=4)
    print(f"\n2. cached path per CPU core: {cached:.0f} images/s with 1 core; {two:.0f} images/s with 2 loader "
          f"workers = {two / 2:.0f} per core   (target >= 1500 per core at 224x224)")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "data": {"source": args.source, "classes": classes, "image_size": args.size, "augmentation": args.augmentation,
                     "batch_size": args.batch_size, "num_workers": 2, "artifacts_dir": args.artifacts, "split": {"ratios": "80/10/10"}},
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
        mem = json.loads(line.split(" ", 1)[1])
    base, peak = mem["baseline_kib"] / 1024, mem["peak_kib"] / 1024
    print(f"\n3. fit with 2 loader workers (resnet10t, 1 epoch): baseline {base:.0f} MiB, peak {peak:.0f} MiB (PSS, "
          f"main + workers); growth {peak - base:.0f} MiB = {(peak - base) / cache_mb:.2f} x the {cache_mb:.0f} MiB cache "
          "(target < 1.5x)")


if __name__ == "__main__":
    main()
