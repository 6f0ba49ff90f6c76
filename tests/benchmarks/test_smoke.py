"""Benchmarks that cannot rot: every `benchmarks/*.py` script runs with `--smoke` (its own code path on tiny
generated or embedded data, on the CPU) and prints its ratio lines. The figures mean nothing at that size;
that the script completes and reports them is what is checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Each script's result lines, as regular expressions; a new benchmark adds its own here.
RATIO_LINES = {
    "bench_cluster.py": [r"submission -> first trial's first epoch: [\d.]+ s", r"per-trial wall in a SLURM worker / local: [\d.]+"],
    "bench_audit.py": [r"ratio new/today [\d.]+", r"^crop\+rescale\+marks\+jpeg +[\d.]+%", r"candidate search, [\d,]+ images"],
    "bench_data.py": [r"ratio\s+:\s+[\d.]+x", r"growth -?\d+ MiB = [\d.]+ x the", r"network's training .* MiB"],
    "bench_framework.py": [r"ratio of the fastest runs:\s+[\d.]+"],
    "bench_gpu.py": [r"bf16 \+ channels_last vs fp32: [\d.]+x"],
    "bench_pruning.py": [r"both together: \d+% of exhaustive epochs; exhaustive winner or indistinguishable in \d+/\d+ seeds"],
    "bench_selection.py": [r"single train/val split: winners .* test accuracy of the chosen models: mean [\d.]+",
                           r"2-fold cross-validation: winners .* test accuracy of the chosen models: mean [\d.]+"],
    "bench_serve.py": [r"/predict\s+: +[\d.]+ requests/s", r"/predict\?heatmap=true: +[\d.]+ requests/s",
                       r"parallel uploads .* peak \d+ MB"],
    "bench_trials.py": [r"per-trial fixed cost\s+: mean [\d.]+ s", r"wall / train\+val\s+: [\d.]+"],
}
# Scripts that need a service this machine may lack: the environment variable CI sets when it started it.
NEEDS = {"bench_cluster.py": ("MEDSEL_TEST_SLURM_PARTITION", "no SLURM here (.ci/start_slurm.sh starts one)")}
# Scripts whose --smoke another change adds; strict: once it is there, this entry must go.
PENDING: dict[str, str] = {}
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_has_a_smoke_mode_and_known_ratio_lines():
    assert SCRIPTS and set(SCRIPTS) == set(RATIO_LINES), "register each benchmark's ratio lines in RATIO_LINES"
    for name in set(SCRIPTS) - set(PENDING):
        assert '"--smoke"' in (REPO / "benchmarks" / name).read_text(), f"{name} has no --smoke mode"


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke_completes_and_prints_its_ratio_lines(name, request):
    if name in NEEDS and not os.environ.get(NEEDS[name][0]):
        pytest.skip(NEEDS[name][1])
    if name in PENDING:
        request.applymarker(pytest.mark.xfail(reason=PENDING[name], strict=True))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--smoke"], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for pattern in RATIO_LINES[name]:
        assert re.search(pattern, proc.stdout, re.MULTILINE), f"{name} --smoke printed no line matching {pattern!r}:\n{proc.stdout[-3000:]}"
