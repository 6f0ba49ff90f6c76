"""Whole sweeps in-process with a fake trial runner (`tests/sweeps/fakes.py`) on a real SQLite storage:
stages, outputs, interrupted vs failed trials, exit codes and the progress display. Real end-to-end sweeps
(subprocesses, training, kill/resume, workers, PostgreSQL, pruning) are in test_e2e.py, marked slow."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

from runs import files
from sweeps import sweep as sweep_mod
from sweeps.config import Selection, Stage2
from tests.sweeps.fakes import FakeTrials, no_preflight, tiny_sweep


def studies(sweep):
    return [optuna.load_study(study_name=f"{sweep.name}/stage{k}", storage=sweep.storage_url) for k in (1, 2)]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """One complete fake sweep, shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep, fake = tiny_sweep(tmp), FakeTrials()
    summary = sweep_mod.run(sweep, execute=fake, preflight=no_preflight)
    return sweep, fake, summary


def test_two_stages_pick_the_winner_and_write_relative_paths(finished_sweep):
    sweep, fake, summary = finished_sweep
    assert sweep_mod.exit_code(sweep, summary) == 0 and not summary["incomplete"]
    # 2 candidates, then 2 optimizers x 2 losses on the winner, less adam + ce: the stage-1 winner's own config
    # (stage 1's defaults are adam + ce), whose result and run are reused
    assert len(fake.calls) == 2 + 3
    assert summary["base_architecture"] == "resnet10t" and (summary["optimizer"], summary["loss"]) == ("adam", "ce")
    assert all(call[0] == "resnet10t" for call in fake.calls[2:]) and ("resnet10t", "Adam", "ce") not in fake.calls[2:]
    out = sweep.out_dir
    winner = json.loads((out / files.WINNER).read_text())
    assert not winner["run_dir"].startswith("/") and winner["run_dir"].startswith("trials/stage1/000-resnet10t")
    assert "reused from stage1/resnet10t-r0" in (out / "stage2_leaderboard.md").read_text()
    assert "reused from stage1/resnet10t-r0" in (out / "report.md").read_text()
    assert files.winner_run_dir(out) == out / winner["run_dir"] and files.winner_run_dir(out).is_dir()
    s1, s2 = studies(sweep)
    assert all(not t.user_attrs["run_dir"].startswith("/") for t in s1.get_trials() + s2.get_trials())
    assert s2.user_attrs["base_candidate"] == "resnet10t"
    assert "# Reproduces" in (out / "winner.yaml").read_text() and (out / "report.md").exists()
    assert (out / "stage1.png").stat().st_size > 1000 and (out / "stage2_heatmap.png").stat().st_size > 1000
    card = json.loads((out / "model_card.json").read_text())  # every sweep folder carries its model card
    assert card["selection"]["winner"] == {k: winner[k] for k in card["selection"]["winner"]}
    assert card["selection"]["stages"]["stage2"]["leaderboard"]["winner"] == "adam + ce"
    assert "resnet10t" in (out / "model_card.md").read_text()


def test_a_rerun_of_a_finished_sweep_trains_nothing(finished_sweep, tmp_path, capsys, no_plots):
    # On a copy of the finished sweep (storage included): the shared one and its plots stay as they are.
    done, _, _ = finished_sweep
    sweep = replace(done, root=str(tmp_path / "sweeps"))
    shutil.copytree(done.out_dir, sweep.out_dir)
    fake = FakeTrials()
    summary = sweep_mod.run(sweep, execute=fake, preflight=no_preflight)
    assert fake.calls == [] and sweep_mod.exit_code(sweep, summary) == 0
    assert "0 newly enqueued (0 interrupted before), 2 finished before" in capsys.readouterr().out


def test_sigkilled_trial_is_interrupted_and_retried_on_rerun_without_flags(tmp_path, capsys, no_plots):
    sweep = tiny_sweep(tmp_path, stage2=Stage2(optimizers=["adam"], losses=["ce"]))
    first = sweep_mod.run(sweep, execute=FakeTrials({"ctnet10": ["interrupted"]}), preflight=no_preflight)
    out = capsys.readouterr().out
    assert sweep_mod.exit_code(sweep, first) == 1  # a grid point never finished: no winner from an incomplete grid
    assert [row["state"] for row in first["incomplete"]] == ["interrupted"] and "base_architecture" not in first
    assert "killed by signal 9" in out and "rerun the same command to retry them" in out
    killed = optuna.load_study(study_name="t/stage1", storage=sweep.storage_url).get_trials(states=(TrialState.FAIL,))
    assert len(killed) == 1 and killed[0].user_attrs["fail_reason"].startswith("interrupted: killed by signal 9")

    fake = FakeTrials()
    second = sweep_mod.run(sweep, execute=fake, preflight=no_preflight)  # no --retry_failed
    out = capsys.readouterr().out
    assert "1 newly enqueued (1 interrupted before), 1 finished before" in out  # interrupted is not finished
    assert fake.calls[0][0] == "ctnet10" and sweep_mod.exit_code(sweep, second) == 0
    assert second["base_architecture"] == "resnet10t"


def test_failed_trial_is_retried_only_with_retry_failed_and_allow_failures_exits_zero(tmp_path, capsys, no_plots):
    sweep = tiny_sweep(tmp_path, stage2=Stage2(optimizers=["adam"], losses=["ce"]))
    first = sweep_mod.run(sweep, execute=FakeTrials({"ctnet10": ["failed", "failed"]}), preflight=no_preflight)
    assert sweep_mod.exit_code(sweep, first) == 1
    assert first["incomplete"][0]["state"] == "failed" and "always fails" in first["incomplete"][0]["reason"]

    fake = FakeTrials({"ctnet10": ["failed"]})
    again = sweep_mod.run(sweep, execute=fake, preflight=no_preflight)
    out = capsys.readouterr().out
    assert fake.calls == [] and sweep_mod.exit_code(sweep, again) == 1  # not retried without the flag
    assert "1 trials failed with an error; rerun with --retry_failed true to retry them" in out

    sweep.allow_failures = True
    allowed = sweep_mod.run(sweep, execute=FakeTrials(), preflight=no_preflight)
    assert sweep_mod.exit_code(sweep, allowed) == 0 and allowed["base_architecture"] == "resnet10t"
    assert "Grid points without a finished trial" in (sweep.out_dir / "report.md").read_text()

    sweep.allow_failures, sweep.retry_failed = False, True
    fake = FakeTrials()
    retried = sweep_mod.run(sweep, execute=fake, preflight=no_preflight)
    assert fake.calls == [("ctnet10", "Adam", "ce")] and sweep_mod.exit_code(sweep, retried) == 0


def test_cli_returns_the_sweep_exit_code(tmp_path, monkeypatch):
    import cli
    from sweeps import isolation

    monkeypatch.setattr(isolation, "share_wandb_service", lambda mode: None)
    monkeypatch.setattr(isolation, "start_forkserver", lambda preload: None)
    codes = iter([{"sweep": "t", "incomplete": [{"stage": "stage1"}]}, {"sweep": "t", "incomplete": []}])
    monkeypatch.setattr(sweep_mod, "run", lambda sweep: next(codes))
    args = ["sweep", "--name", "t", "--base_config", "configs/demo.yaml", "--root", str(tmp_path)]
    assert cli.main(args) == 1
    assert cli.main(args) == 0


def test_a_sweep_command_with_another_folder_reaches_or_names_the_winner(tmp_path, capsys, no_plots):
    """Two sweep commands on one storage with their own output folders (as on two machines): the one that
    trained nothing finds the winner's run in the other folder when it can reach it (same machine or shared
    file system) and otherwise says where it is, still writing its leaderboards and report (exit 0)."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    first = tiny_sweep(tmp_path / "a", storage=storage)
    sweep_mod.run(first, execute=FakeTrials(), preflight=no_preflight)
    second = tiny_sweep(tmp_path / "b", storage=storage)
    idle = FakeTrials()
    summary = sweep_mod.run(second, execute=idle, preflight=no_preflight)
    assert idle.calls == [] and summary["run_dir"] == str(first.out_dir.resolve() / json.loads(
        (first.out_dir / files.WINNER).read_text())["run_dir"])
    assert (second.out_dir / "winner.yaml").exists()
    (tmp_path / "a").rename(tmp_path / "gone")  # the first machine's disk is out of reach
    third = tiny_sweep(tmp_path / "c", storage=storage)
    summary = sweep_mod.run(third, execute=FakeTrials(), preflight=no_preflight)
    assert summary["winner_elsewhere"] and sweep_mod.exit_code(third, summary) == 0
    assert "trained by another machine" in capsys.readouterr().out
    assert (third.out_dir / "report.md").exists() and not (third.out_dir / "winner.yaml").exists()


def test_the_live_best_so_far_ranks_by_the_stage_s_selection_rule(tmp_path, capsys, no_plots):
    """Under the rank score the live line names the rank score, not the trained loss (which differs across
    losses), and its last leader of each stage is that stage's winner."""
    sweep = tiny_sweep(tmp_path, selection=Selection(rule="rank_score", loss_term="trained"))  # the fakes log no NLL
    summary = sweep_mod.run(sweep, execute=FakeTrials(), preflight=no_preflight)
    lines = [line for line in capsys.readouterr().out.splitlines() if "| best " in line]
    assert lines and all("| best rank_score=" in line for line in lines)
    stage2 = [line for line in lines if line.startswith("[sweep] stage2:")]
    assert stage2[-1].endswith(f"({summary['optimizer']}-{summary['loss']})")


def test_the_sweep_s_lines_come_from_the_medsel_sweep_logger(capsys):
    import logging

    logger = logging.getLogger("medsel.sweep")
    logger.info("[sweep] a line")
    logger.setLevel(logging.WARNING)  # what a user who wants only the warnings does
    try:
        logger.info("[sweep] hidden")
        logger.warning("[sweep] a warning")
    finally:
        logger.setLevel(logging.INFO)
    assert capsys.readouterr().out.splitlines() == ["[sweep] a line", "[sweep] a warning"]


def test_the_coordinator_never_imports_torch():
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys; import sweeps.cli, sweeps.sweep, sweeps.worker, sweeps.selection, sweeps.outputs, sweeps.jobs; "
            "from sweeps.worker import visible_gpus; visible_gpus(); "
            "print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_each_worker_gets_its_own_gpus_of_those_visible(monkeypatch):
    from sweeps.worker import gpu_env, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    gpus = visible_gpus()
    assert gpus == ["4", "5", "6", "7"]
    assert [gpu_env(w, 2, gpus) for w in range(2)] == [{"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    assert gpu_env(0, 1, []) == {}
