"""Framework overhead: an epoch through Lightning (the tool's real fit path: ImageClassifier, metrics,
logging, checkpointing) against a hand-written PyTorch loop on the same network, loss, optimizer, data
and batch size. The hand-written loop exists only here, as the baseline.

    python benchmarks/bench_framework.py [--network resnet18] [--size 224] [--epochs 2]
    python benchmarks/bench_framework.py --smoke     # the same code path on tiny generated data, in seconds

The two variants run alternately, `--runs` times each, and the fastest run of each is compared: on a
shared machine the minimum is the least noisy estimate of what the code itself costs. Prints both epoch
times and their ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_modules.losses import build_loss  # noqa: E402
from lightning_modules.networks import NetworkConfig, build_network  # noqa: E402
from runs import files  # noqa: E402
from runs.cli import MedselCLI  # noqa: E402
from runs.files import RunFiles  # noqa: E402


def config(args, root: str) -> dict:
    return {
        "seed_everything": 0,
        "data": {"source": args.source, "classes": args.classes.split(","), "image_size": args.size,
                 "augmentation": "ct", "batch_size": args.batch_size, "num_workers": 2,
                 "split": {"ratios": "80/10/10"}, "artifacts_dir": args.artifacts,
                 "on_conflict": "keep"},  # COVID-CT stores 2 slices under both classes (as configs/covid_ct.yaml)
        "model": {"network": {"name": args.network}, "loss": "ce",
                  "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}},
        "trainer": {"max_epochs": args.epochs, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0},
        "run": {"root": root, "wandb": "disabled"}, "report": {"enabled": False},
    }


def lightning_epochs(args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cli = MedselCLI(args=config(args, tmp), run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        timing = RunFiles(cli.run_dir).read_json(files.TIMING)
    return timing["train_seconds"] / args.epochs


def hand_written_epochs(args) -> float:
    """The baseline: train and validate with nothing but PyTorch."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = MedselCLI(args=config(args, tmp), run=False)  # only for the identical data module
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    k = len(dm.classes)
    net = build_network(NetworkConfig(name=args.network), k, dm.image_size)
    loss_fn = build_loss("ce", k)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        net.train()
        for images, target in train:
            loss = loss_fn(net(net.normalize(images).contiguous()), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for images, target in val:
                logits = net(net.normalize(images).contiguous())
                loss_fn(logits, target)
                correct += int((logits.argmax(1) == target).sum())
                total += len(target)
    return (time.perf_counter() - t0) / args.epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "covid_ct" / "metadata.csv"))
    ap.add_argument("--classes", default="NonCOVID,COVID")
    ap.add_argument("--network", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--artifacts", default=str(REPO / "artifacts"))
    ap.add_argument("--smoke", action="store_true", help="tiny generated data, resnet10t at 32 px, "
                                                         "one run of one epoch: checks the code path in seconds")
    args = ap.parse_args()
    if args.smoke:
        from benchmarks._smoke import CLASSES, tiny_folder

        tmp = Path(tempfile.mkdtemp(prefix="bench_framework_smoke"))
        args.source, args.classes, args.artifacts = tiny_folder(tmp / "data"), ",".join(CLASSES), str(tmp / "artifacts")
        args.network, args.size, args.batch_size, args.epochs, args.runs = "resnet10t", 32, 8, 1, 1
    hand, light = [], []
    for _ in range(args.runs):
        hand.append(hand_written_epochs(args))
        light.append(lightning_epochs(args))
    print(f"{args.network} at {args.size}x{args.size}, batch {args.batch_size}, {args.epochs} epochs of train + val, "
          f"2 loader workers, {args.runs} alternating runs each:")
    print(f"  hand-written PyTorch loop: {min(hand):7.2f} s/epoch (runs: {', '.join(f'{x:.2f}' for x in hand)})")
    print(f"  Lightning (medsel fit)   : {min(light):7.2f} s/epoch (runs: {', '.join(f'{x:.2f}' for x in light)}; "
          "includes writing the best and last checkpoints every epoch)")
    print(f"  ratio of the fastest runs: {min(light) / min(hand):7.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
