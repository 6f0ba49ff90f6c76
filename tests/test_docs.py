"""Every command the README and `docs/*.md` show in a ```bash fence runs, on the embedded demo data and a
generated `my_data/` folder, with shrunk settings (one epoch of two batches, two grid points a stage).

Commands that cannot run here (pip install, a cluster, external data, a server left running) are in ```console
or ```text fences. A ```yaml fence whose first line is `# <name>.yaml` is that file: it is written into the
working folder (shrunk like the project's configs) before the commands run.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# Appended to every run of a command (later arguments win): one epoch of two batches, no loader workers.
FIT_SHRINK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
              "--data.num_workers=0", "--run.wandb=disabled", "--report.bootstrap=50"]
SHRINK = {
    **{c: FIT_SHRINK for c in ("fit", "validate", "test", "predict")},
    "audit": ["--data.num_workers=0", "--folds=3", "--epochs=1", "--image_size=32",
              "--fold_arg+=--trainer.limit_train_batches=2"],
    "report": ["--report.bootstrap=50"],
    "sweep": [],  # its config files are shrunk instead (see shrink_sweep)
    "serve": ["--device=cpu"],
    "export": ["--parity_images=8"],
}


def fences(path: Path) -> list[tuple[str, int, str]]:
    """(language, line number, body) of every fenced block of a markdown file."""
    text = path.read_text()
    return [(m[1], text[:m.start()].count("\n") + 1, m[2]) for m in FENCE.finditer(text)]


def commands(body: str) -> list[list[str]]:
    """The shell commands of a bash fence as argument lists (comments dropped, `\\` continuations joined)."""
    return [args for line in body.replace("\\\n", " ").splitlines() if (args := shlex.split(line, comments=True))]


def documented() -> list[tuple[Path, int, list[str]]]:
    return [(path, line, args) for path in DOCS for lang, line, body in fences(path) if lang == "bash"
            for args in commands(body)]


def test_every_bash_fence_is_a_command_this_test_can_run():
    """Cheap guard of the slow runner below: it finds the documented commands, and each is one it knows."""
    found = documented()
    assert {p.name for p, _, _ in found} >= {"README.md", "data.md", "sweeps.md", "audit.md", "serving.md"}
    for path, line, args in found:
        where = f"{path.relative_to(REPO)}:{line}: {shlex.join(args)}"
        assert args[0] == "python", where
        assert (args[1] == "cli.py" and args[2] in SHRINK) or re.fullmatch(r"benchmarks/bench_\w+\.py", args[1]), where
        if args[1].startswith("benchmarks/"):
            assert "--smoke" in args, f"{where}: a benchmark in a bash fence runs with --smoke"


def shrink_fit(cfg: dict) -> dict:
    cfg.setdefault("trainer", {}).update(max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    cfg.setdefault("data", {})["num_workers"] = 0
    cfg.setdefault("run", {})["wandb"] = "disabled"
    return cfg


def shrink_sweep(cfg: dict) -> dict:
    """Two candidates, two stage-2 pairs, two folds, one epoch of two batches at 32 px."""
    over = cfg.setdefault("overrides", {})
    over.setdefault("trainer", {}).update(limit_train_batches=2, limit_val_batches=2)
    over.setdefault("data", {})["num_workers"] = 0
    over.setdefault("report", {})["bootstrap"] = 50
    stage1 = cfg.setdefault("stage1", {})
    stage1["candidates"] = stage1.get("candidates", [{"network": "resnet10t"}])[:2]
    stage1["defaults"] = {"optimizer": "rmsprop", "loss": "ce", "batch_size": 32,  # study 002's, shrunk
                          **stage1.get("defaults", {}), "max_epochs": 1, "image_size": 32}
    stage2 = cfg.setdefault("stage2", {})
    stage2["optimizers"] = stage2.get("optimizers", ["rmsprop"])[:1]
    stage2["losses"] = stage2.get("losses", ["ce", "mse"])[:2]
    if cfg.get("cv", {}).get("folds"):
        cfg["cv"]["folds"] = 2
    cfg["wandb"] = "disabled"
    return cfg


def write_config(path: Path, text: str) -> None:
    cfg = yaml.safe_load(text) or {}
    path.write_text(yaml.safe_dump(shrink_sweep(cfg) if "base_config" in cfg else shrink_fit(cfg)))


def make_my_data(root: Path, per_class: int = 20) -> None:
    """Two easy classes (horizontal vs vertical stripes) with noise, so no two images are duplicates."""
    rng = np.random.default_rng(0)
    for c in ("normal", "pneumonia"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            stripes = np.tile((np.arange(48) // rng.integers(2, 6) % 2 * 150 + 50)[:, None], (1, 48))
            image = (stripes if c == "normal" else stripes.T) + rng.normal(0, 25, (48, 48))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / c / f"{i:03d}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A working folder like the repository root: shrunk copies of configs/, my_data/, the docs' config files."""
    root = tmp_path_factory.mktemp("docs")
    (root / "configs").mkdir()
    for config in sorted((REPO / "configs").glob("*.yaml")):
        write_config(root / "configs" / config.name, config.read_text())
    make_my_data(root / "my_data")
    for path in DOCS:
        for lang, _, body in fences(path):
            if lang == "yaml" and (name := re.match(r"# ([\w.-]+\.yaml)\b", body)):
                write_config(root / name[1], body)
    return root


def _latest(root: Path, arg: str) -> str:
    """`artifacts/runs/demo/<version>/config.yaml` -> the newest such version folder the commands made."""
    head, tail = arg.split("<version>", 1)
    found = sorted((root / head).glob("*"), key=lambda p: p.stat().st_mtime)
    assert found, f"{arg}: no run under {root / head} (the doc must show the command that makes it first)"
    return str(found[-1]) + tail


def _serve(args: list[str], cwd: Path) -> tuple[int, str]:
    """Start the server, wait for /health, stop it: 0 when it answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*args, f"--port={port}"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    return (0 if answer.status == 200 else 1), ""
            except OSError:
                time.sleep(0.5)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    return 1, out


def run_documented(args: list[str], cwd: Path) -> tuple[int, str]:
    args = [_latest(cwd, a) if "<version>" in a else a for a in args]
    argv = [sys.executable, str(REPO / args[1]), *args[2:]]
    if args[1] == "cli.py":
        argv += SHRINK[args[2]]
        if args[2] == "serve":
            return _serve(argv, cwd)
    try:  # shrunk, each command takes seconds on an idle machine; the limit is for an overloaded one
        proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {e.timeout} s\n{e.output or ''}"
    return proc.returncode, proc.stdout


@pytest.mark.slow
def test_every_documented_command_runs(workspace):
    """In document order (a doc's `test` follows its `fit`; serving.md serves the sweep of sweeps.md)."""
    order = sorted(documented(), key=lambda d: (d[0].name == "serving.md", DOCS.index(d[0]), d[1]))
    failed = []
    for path, line, args in order:
        code, out = run_documented(args, workspace)
        if code != 0:
            failed.append(f"{path.relative_to(REPO)}:{line}: {shlex.join(args)} -> exit {code}\n{out[-1500:]}")
    assert not failed, "\n\n".join(failed)
