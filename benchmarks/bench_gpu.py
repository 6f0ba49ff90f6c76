"""GPU path: training images/s for the studies' backbones at their input sizes, fp32 vs the fast path
(bf16 mixed precision + channels_last, optionally torch.compile), and whether the cached loader keeps up.

    python benchmarks/bench_gpu.py [--steps 30] [--compile]
    python benchmarks/bench_gpu.py --smoke     # the same code path on the CPU: one small network, 2 steps

On a machine without a GPU it says so and exits 0 (`--smoke` runs there: bf16 autocast on the CPU, tiny sizes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (network, input size, batch) as the studies used them
BACKBONES = [
    ("tf_efficientnetv2_s", 224, 32),  # study 000
    ("resnest50d", 224, 32),  # study 000
    ("mobilenetv4_conv_medium", 224, 32),  # study 000
    ("vgg19", 224, 32),  # study 001
    ("densenet169", 224, 32),  # study 001
    ("ctnet10", 128, 32),  # study 001
    ("legacy_xception", 128, 32),  # study 002
    ("attention_vgg16", 128, 32),  # study 003
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_rate(name: str, size: int, batch: int, steps: int, fast: bool, compile_: bool, device: str = "cuda") -> float:
    from lightning_modules.classifier import ImageClassifier
    from lightning_modules.networks import NetworkConfig

    model = ImageClassifier(NetworkConfig(name=name), classes=["a", "b"], image_size=size).to(device)
    if fast:
        model.net.to(memory_format=torch.channels_last)
    net = torch.compile(model.net) if compile_ else model.net
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    images = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=device)
    target = torch.randint(0, 2, (batch,), device=device)

    def step():
        x = model.net.normalize(images)
        x = x.contiguous(memory_format=torch.channels_last if fast else torch.contiguous_format)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=fast):
            loss = model.loss_fn(net(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(min(steps, 5) if not compile_ else 10):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def loader_rate(size: int, batch: int, workers: int, artifacts: str = str(REPO / "artifacts")) -> float:
    from datamodules import ImageDataModule

    dm = ImageDataModule(image_size=size, batch_size=batch, num_workers=workers, augmentation="chd",
                         artifacts_dir=artifacts, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    dm.setup("fit")
    loader = dm.train_dataloader()
    n, t0 = 0, None
    for _epoch in range(4):
        for images, _ in loader:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += len(images)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to warm up)")
    ap.add_argument("--smoke", action="store_true", help="on the CPU: resnet10t at 32 px, batch 4, 2 steps, the "
                                                         "embedded data in a temporary folder; checks the code path")
    args = ap.parse_args()
    backbones, device, artifacts = BACKBONES, "cuda", str(REPO / "artifacts")
    if args.smoke:
        import tempfile

        backbones, device, artifacts = [("resnet10t", 32, 4)], "cpu", tempfile.mkdtemp(prefix="bench_gpu_smoke")
        args.steps, args.workers = 2, 0
        print("smoke: on the CPU, one small network; the figures only show that the code path runs")
    elif not torch.cuda.is_available():
        print("No GPU on this machine: the GPU benchmark has nothing to measure. Run it where `nvidia-smi` shows a GPU.")
        return 0
    else:
        print(f"GPU: {torch.cuda.get_device_name(0)}; bf16 supported: {torch.cuda.is_bf16_supported()}")
    loaders: dict[int, float] = {}
    speedups = []
    print(f"{'network':26s} {'size':>4s} {'fp32 img/s':>11s} {'bf16+CL img/s':>14s}" + (f" {'+compile':>9s}" if args.compile else "")
          + f" {'loader img/s':>13s}  loader keeps up?")
    for name, size, batch in backbones:
        fp32 = train_rate(name, size, batch, args.steps, False, False, device)
        fast = train_rate(name, size, batch, args.steps, True, False, device)
        comp = train_rate(name, size, batch, args.steps, True, True, device) if args.compile else None
        speedups.append(fast / fp32)
        if size not in loaders:
            loaders[size] = loader_rate(size, batch, args.workers, artifacts)
        best = max(x for x in (fp32, fast, comp) if x is not None)
        print(f"{name:26s} {size:4d} {fp32:11.0f} {fast:14.0f}" + (f" {comp:9.0f}" if comp else "")
              + f" {loaders[size]:13.0f}  {'yes' if loaders[size] >= best else 'NO: add workers'}")
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"bf16 + channels_last vs fp32: {min(speedups):.2f}x to {max(speedups):.2f}x the images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
