"""End-to-end sweeps through `cli.py sweep` on the embedded data (slow: they train): stages, outputs, NaN trials,
kill/resume, a SIGKILLed trial, parallel workers, PostgreSQL, pruning, fail-fast on bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import polars as pl
import pytest
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState

from tests.conftest import REPO, run_cli
from tests.sweeps.verdicts import assert_verdicts

FAST = {"run": {"early_stopping_patience": None}, "data": {"num_workers": 0}, "trainer": {"enable_model_summary": False}}
pytestmark = pytest.mark.slow


def write_sweep(tmp_path: Path, artifacts: Path, name: str = "t", **changes) -> Path:
    """A tiny sweep config: 32x32 phantoms, 2 epochs, two candidates, a 2x2 stage-2 grid."""
    overrides = {**FAST, "data": {**FAST["data"], "artifacts_dir": str(artifacts)}}
    cfg = {
        "name": name,
        "base_config": str(REPO / "configs" / "demo.yaml"),
        "overrides": overrides,
        "root": str(tmp_path / "sweeps"),
        "stage1": {
            "candidates": [{"network": "resnet10t"}, {"network": "ctnet10"}],
            "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": 2, "image_size": 32},
        },
        "stage2": {"optimizers": ["rmsprop", "adam"], "losses": ["ce", "mse"]},
        "wandb": "disabled",
        "heartbeat_seconds": 1.0,
    }
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def studies(tmp_path: Path, name: str = "t", storage: str | None = None):
    url = storage or f"sqlite:///{tmp_path / 'sweeps' / name / 'optuna.db'}"
    return [optuna.load_study(study_name=f"{name}/stage{k}", storage=url) for k in (1, 2)]


def grid_key(t) -> tuple:
    p = t.system_attrs.get("fixed_params") or t.params
    return tuple(sorted(p.items()))


def assert_each_grid_point_once(study, expected: int) -> None:
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    keys = Counter(grid_key(t) for t in complete)
    assert len(keys) == expected, keys
    assert set(keys.values()) == {1}, keys
    trained = [t for t in study.get_trials() if t.user_attrs.get("duplicate_of") is None and t.user_attrs.get("run_dir")]
    assert len({t.user_attrs["run_dir"] for t in trained}) == len(trained)


def test_two_stage_sweep_end_to_end(tmp_path, shared_artifacts):
    cfg = write_sweep(tmp_path, shared_artifacts, repeats=2, stage2={"optimizers": ["rmsprop", "adam"], "losses": ["ce"]},
                      wandb="offline")
    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout[-4000:]
    s1, s2 = studies(tmp_path)
    assert_each_grid_point_once(s1, 2 * 2)  # 2 candidates x 2 repeats
    assert_each_grid_point_once(s2, 2 * 2)  # 2 optimizers x 1 loss x 2 repeats
    out = tmp_path / "sweeps" / "t"
    board1 = pl.read_parquet(out / "stage1_leaderboard.parquet")
    winner1 = board1["candidate"][0]
    assert s2.user_attrs["base_candidate"] == winner1
    for t in s2.get_trials(states=(TrialState.COMPLETE,)):
        trial_cfg = yaml.safe_load((out / t.user_attrs["run_dir"] / "config.yaml").read_text())
        assert trial_cfg["model"]["network"]["name"] == winner1
    assert set(board1["first_in_repeats"]) <= {"0/2", "1/2", "2/2"} and "val/acc ±95%" in board1.columns
    for t in s1.get_trials(states=(TrialState.COMPLETE,)) + s2.get_trials(states=(TrialState.COMPLETE,)):
        # a finished offline W&B run per trial (an unfinished run file holds only its 7-byte header); the
        # winner's has a second part with the same run id: its test and report, resumed into that run
        runs = list((out / t.user_attrs["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
        assert runs and len({r.name for r in runs}) == 1 and all(r.stat().st_size > 1000 for r in runs), runs
    assert list((tmp_path / "sweeps" / "t" / "wandb").glob("offline-run-*"))  # the leaderboard summary run
    for name in ("stage1_leaderboard.csv", "stage1_leaderboard.md", "stage2_leaderboard.parquet", "stage2_leaderboard.md",
                 "stage1.png", "stage2_heatmap.png", "report.md", "winner.yaml", "winner.ckpt", "optuna.db"):
        assert (out / name).exists(), name
    winner = json.loads((out / "winner.json").read_text())
    assert winner["base_architecture"] == winner1 and "acc" in winner["test"]["metrics"]
    assert (out / winner["run_dir"] / "checkpoints" / "best.ckpt").exists() and not Path(winner["run_dir"]).is_absolute()
    report = (out / "report.md").read_text()
    assert "Validation vs test" in report and "optuna-dashboard sqlite:///" in report

    proc = run_cli("fit", "--config", str(out / "winner.yaml"), "--trainer.max_epochs=1", f"--run.root={tmp_path / 'refit'}",
                   "--run.wandb=disabled", "--trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert list((tmp_path / "refit").rglob("best.ckpt"))

    # Rerunning a finished sweep trains nothing again.
    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode == 0 and "trial 0 " not in proc.stdout and "0 newly enqueued" in proc.stdout


def test_nan_trial_fails_and_the_sweep_still_picks_a_winner(tmp_path, shared_artifacts):
    exploding = {"network": "resnet10t", "label": "exploding",
                 "overrides": {"model": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0e30}}}}}
    cfg = write_sweep(tmp_path, shared_artifacts, stage1={
        "candidates": [{"network": "ctnet10"}, exploding],
        "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": 2, "image_size": 32}},
        stage2={"optimizers": ["adam"], "losses": ["ce"]})
    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode == 1 and "stopping after stage1" in proc.stdout, proc.stdout[-4000:]
    proc = run_cli("sweep", "--config", str(cfg), "--allow_failures", "true")
    assert proc.returncode == 0, proc.stdout[-4000:]
    s1, _ = studies(tmp_path)
    failed = s1.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and "NonFiniteLossError" in failed[0].user_attrs["fail_reason"]
    assert json.loads((tmp_path / "sweeps" / "t" / "winner.json").read_text())["base_architecture"] == "ctnet10"
    assert "exploding" in (tmp_path / "sweeps" / "t" / "report.md").read_text()


def test_killed_sweep_resumes_with_each_grid_point_finished_once(tmp_path, shared_artifacts):
    cfg = write_sweep(tmp_path, shared_artifacts, stage1={
        "candidates": [{"network": "resnet10t"}, {"network": "ctnet10"}],
        "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 16, "max_epochs": 4, "image_size": 32}},
        stage2={"optimizers": ["adam"], "losses": ["ce", "mse"]})
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    db = tmp_path / "sweeps" / "t" / "optuna.db"
    killed_trial = None
    deadline = time.time() + 240
    while time.time() < deadline and killed_trial is None:
        time.sleep(0.5)
        if not db.exists():
            continue
        try:  # the sweep may be creating the database's tables or writing to it right now: look again later
            study = optuna.load_study(study_name="t/stage1", storage=f"sqlite:///{db}")
            running = study.get_trials(states=(TrialState.RUNNING,))
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):
            continue
        if running and running[0].user_attrs.get("pid"):
            run_dir = tmp_path / "sweeps" / "t" / running[0].user_attrs.get("run_dir", "/nonexistent")
            if (run_dir / "fit.log").exists() and time.time() - running[0].datetime_start.timestamp() > 3:
                killed_trial = running[0].number
                os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep: workers, forkserver, trial processes
    proc.wait(timeout=60)
    assert killed_trial is not None, "no trial was seen running"

    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert f"trial {killed_trial} was interrupted" in proc.stdout
    s1, s2 = studies(tmp_path)
    interrupted = s1.get_trials()[killed_trial]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["fail_reason"].startswith("interrupted")
    assert_each_grid_point_once(s1, 2)
    assert_each_grid_point_once(s2, 2)


def test_two_workers_on_one_sqlite_study(tmp_path, shared_artifacts):
    cfg = write_sweep(tmp_path, shared_artifacts, workers=2, stage1={
        "candidates": [{"network": "resnet10t"}, {"network": "ctnet10"}, {"network": "mobilenetv4_conv_small"}],
        "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": 1, "image_size": 32}})
    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout[-4000:]
    s1, s2 = studies(tmp_path)
    assert_each_grid_point_once(s1, 3)
    assert_each_grid_point_once(s2, 4)
    # (stage 2's adam + ce is stage 1's winner's own config: reused, trained by no worker)
    per_stage = [{t.user_attrs["pid"] for t in s.get_trials(states=(TrialState.COMPLETE,)) if not t.user_attrs.get("reused_from")}
                 for s in (s1, s2)]
    assert all(len(p) <= 2 for p in per_stage) and max(map(len, per_stage)) == 2, per_stage  # both workers trained


def test_two_machines_on_one_postgresql_storage(tmp_path, shared_artifacts):
    url = os.environ.get("MEDSEL_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("MEDSEL_TEST_POSTGRES_URL is not set (.ci/run starts a local PostgreSQL and sets it)")
    name = f"pg{os.getpid()}{int(time.time())}"
    procs = []
    for machine in ("a", "b"):  # two sweep commands with separate output folders, as on two machines
        cfg = write_sweep(tmp_path / machine, shared_artifacts, name=name, storage=url, stage1={
            "candidates": [{"network": "resnet10t"}, {"network": "ctnet10"}, {"network": "mobilenetv4_conv_small"}],
            "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": 1, "image_size": 32}})
        procs.append(subprocess.Popen([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(cfg)], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    s1, s2 = studies(tmp_path, name, storage=url)
    assert_each_grid_point_once(s1, 3)
    assert_each_grid_point_once(s2, 4)
    winners = {json.loads((tmp_path / m / "sweeps" / name / "winner.json").read_text())["optimizer"] for m in ("a", "b")
               if (tmp_path / m / "sweeps" / name / "winner.json").exists()}
    assert len(winners) == 1


def test_pruning_stops_hopeless_trials(tmp_path, shared_artifacts):
    cfg = write_sweep(tmp_path, shared_artifacts, pruner="median", stage1={
        "candidates": [{"network": "ctnet10"}, {"network": "resnet10t"}, {"network": "ctnet10", "label": "ctnet_lr0",
                       "overrides": {"model": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}}}}],
        "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": 4, "image_size": 32}},
        stage2={"optimizers": ["adam"], "losses": ["ce"]})
    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout[-4000:]
    s1, _ = studies(tmp_path)
    pruned = s1.get_trials(states=(TrialState.PRUNED,))
    assert [t.params["candidate"] for t in pruned] == ["ctnet_lr0"]  # learns nothing, so it is stopped early
    assert pruned[0].user_attrs["epochs_run"] < 4


def test_bad_sweep_config_is_a_clear_error_before_any_training(tmp_path, shared_artifacts):
    cfg = write_sweep(tmp_path, shared_artifacts, stage1={
        "candidates": [{"network": "resnet10tt"}, {"network": "ctnet10", "overrides": {"model": {"lossy": "ce"}}}],
        "defaults": {"optimizer": "adam", "max_epochs": 1, "image_size": 32}})
    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "unknown network 'resnet10tt'" in proc.stdout and "lossy" in proc.stdout
    assert not list((tmp_path / "sweeps" / "t").glob("trials/*/*"))  # nothing trained
    proc = run_cli("sweep", "--config", str(cfg), "--stage2.optimizers", "[adamm]")
    assert proc.returncode == 2 and "unknown optimizer 'adamm'" in proc.stdout
    bad = yaml.safe_load(cfg.read_text())
    bad["stage1"]["candidatess"] = []
    cfg.write_text(yaml.safe_dump(bad))
    proc = run_cli("sweep", "--config", str(cfg))
    assert proc.returncode != 0 and "candidatess" in proc.stdout


def test_sigkilled_trial_is_retried_on_rerun_without_flags(tmp_path, shared_artifacts):
    """The trial process alone is killed (as by the OOM killer); its worker survives and records it."""
    cfg = write_sweep(tmp_path, shared_artifacts, stage1={
        "candidates": [{"network": "ctnet10"}],
        "defaults": {"optimizer": "adam", "batch_size": 16, "max_epochs": 30, "image_size": 32}},
        stage2={"optimizers": ["adam"], "losses": ["ce"]}, test_winner=False)
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = tmp_path / "sweeps" / "t" / "trials" / "stage1" / "000-ctnet10-r0" / "progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not progress.exists():
        time.sleep(0.5)
    assert progress.exists(), "the trial never reported an epoch"
    trial_pid = _trial_pid(progress.parent / "fit.log")
    os.kill(trial_pid, signal.SIGKILL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "INTERRUPTED" in out and "rerun the same command" in out, out[-3000:]
    cfg_values = yaml.safe_load(cfg.read_text())
    cfg_values["stage1"]["defaults"]["max_epochs"] = 1
    cfg.write_text(yaml.safe_dump(cfg_values))
    proc = run_cli("sweep", "--config", str(cfg))  # no --retry_failed
    assert proc.returncode == 0 and "(1 interrupted before), 0 finished before" in proc.stdout, proc.stdout[-3000:]


def _trial_pid(log: Path) -> int:
    """The trial process: the one whose stdout is the trial's fit.log."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "fd" / "1") == str(log):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no process writes {log}")


def covid_sweep(tmp_path: Path, covid_ct: Path, artifacts: Path, name: str, epochs: int, size: int, data: dict,
                stage2: dict, report: dict | None = None, **changes) -> Path:
    """A sweep config on COVID-CT: three small backbones from scratch (Adam, CE), `epochs` at `size` px."""
    cfg = {
        "name": name, "base_config": str(REPO / "configs" / "covid_ct.yaml"), "root": str(tmp_path / "sweeps"),
        "overrides": {"data": {"source": str(covid_ct / "metadata.csv"), "artifacts_dir": str(artifacts), **data},
                      "model": {"network": {"pretrained": False, "pool": None, "hidden": None, "dropout": None}},
                      "run": {"early_stopping_patience": None}, **({"report": report} if report else {})},
        "stage1": {"candidates": [{"network": "resnet10t"}, {"network": "mobilenetv4_conv_small"}, {"network": "ctnet10"}],
                   "defaults": {"optimizer": "adam", "lr": 0.002, "loss": "ce", "batch_size": 32, "max_epochs": epochs,
                                "image_size": size}},
        "stage2": stage2, "wandb": "disabled", **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_on_covid_ct(tmp_path, covid_ct, shared_artifacts):
    """Study 002's two stages on real data: small backbones, 64x64, few epochs. Prints both leaderboards."""
    path = covid_sweep(tmp_path, covid_ct, shared_artifacts, "covid", epochs=6, size=64, data={"num_workers": 2},
                       stage2={"optimizers": ["rmsprop", "adam"], "losses": ["ce", "mse"]})
    proc = run_cli("sweep", "--config", str(path), timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = tmp_path / "sweeps" / "covid"
    print((out / "report.md").read_text())
    s1, s2 = studies(tmp_path, "covid")
    assert_each_grid_point_once(s1, 3)
    assert_each_grid_point_once(s2, 4)
    winner = json.loads((out / "winner.json").read_text())
    # 75 test images: one accuracy figure moves by about +-0.11 between runs, and after 6 epochs at 64 px the
    # winner's AUROC interval is about +-0.17 wide: it excluded chance in earlier runs and not in one (0.622
    # [0.423, 0.764], mobilenetv4 + rmsprop + mse). What the test split can always show: the winner ranks a
    # COVID image above a NonCOVID one more often than chance, inside an interval around that estimate.
    evaluation = json.loads((out / winner["run_dir"] / "evaluation.json").read_text())
    auroc = evaluation["metrics"]["auroc"]
    print(f"winner test AUROC {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}]")
    assert auroc["value"] > 0.55 and auroc["low"] < auroc["value"] < auroc["high"]
    assert "Evaluation of the winner" in (out / "report.md").read_text()


def test_pruning_under_ddp(tmp_path, shared_artifacts):
    """Trials that are themselves 2-process DDP runs (gloo on CPU): rank 0 asks the pruner, all ranks stop."""
    cfg = write_sweep(tmp_path, shared_artifacts, pruner="median",
                      overrides={**FAST, "data": {"num_workers": 0, "artifacts_dir": str(shared_artifacts)},
                                 "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "enable_model_summary": False}},
                      stage1={"candidates": [{"network": "ctnet10"}, {"network": "resnet10t"}, {"network": "ctnet10", "label": "ctnet_lr0",
                              "overrides": {"model": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}}}}],
                              "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 16, "max_epochs": 4, "image_size": 32}},
                      stage2={"optimizers": ["adam"], "losses": ["ce"]})
    proc = run_cli("sweep", "--config", str(cfg), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:]
    s1, s2 = studies(tmp_path)
    pruned = s1.get_trials(states=(TrialState.PRUNED,))
    assert [t.params["candidate"] for t in pruned] == ["ctnet_lr0"]
    assert pruned[0].user_attrs["epochs_run"] < 4
    log = (tmp_path / "sweeps" / "t" / pruned[0].user_attrs["run_dir"] / "fit.log").read_text()
    assert "MEMBER: 2/2" in log  # it really ran as two processes
    assert_each_grid_point_once(s2, 1)


def test_cross_validated_sweep_on_covid_ct(tmp_path, covid_ct, shared_artifacts):
    """Issue 11's k-fold selection on real data: 3 stage-1 candidates x 5 folds with COVID-CT's official test
    split held out, a 1x2 stage 2, the winner refit on every non-test image and tested once."""
    path = covid_sweep(tmp_path, covid_ct, shared_artifacts, "covid_cv", epochs=3, size=32,
                       data={"num_workers": 0, "columns": {"split": "official_split"}, "split": {"use_manifest_split": True}},
                       stage2={"optimizers": ["adam"], "losses": ["ce", "mse"]}, cv={"folds": 5},
                       report={"bootstrap": 200, "heatmaps_per_class": 1})
    proc = run_cli("sweep", "--config", str(path), timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = tmp_path / "sweeps" / "covid_cv"
    report = (out / "report.md").read_text()
    print(report)
    s1, s2 = studies(tmp_path, "covid_cv")
    assert_each_grid_point_once(s1, 15)  # 3 candidates x 5 folds
    assert_each_grid_point_once(s2, 10)
    board = pl.read_parquet(out / "stage1_leaderboard.parquet")
    assert board["repeats"].to_list() == [5, 5, 5] and board["val/acc ±95%"].is_not_null().all()
    assert board.slice(1)["vs_winner"].is_not_null().all() and board.slice(1)["vs_winner_folds"].is_not_null().all()
    assert board["indistinguishable"].slice(1).is_not_null().all()
    # Out-of-fold: every non-test image of the official split once per candidate, never a test image.
    manifest = pl.read_csv(covid_ct / "metadata.csv")
    n_non_test = manifest.filter(pl.col("official_split") != "test").height
    for oof in (out / "oof" / "stage1").glob("*.parquet"):
        frame = pl.read_parquet(oof)
        assert frame["path"].n_unique() == frame.height == n_non_test, oof
    winner = json.loads((out / "winner.json").read_text())
    assert winner["run_dir"] == "final/refit" and winner["cv"]["refit_epochs"] >= 1
    refit_counts = pl.read_csv(out / "final" / "refit" / "split_counts.csv").filter(pl.col("class") == "total").row(0, named=True)
    assert refit_counts["train"] == n_non_test and refit_counts["val"] == 0
    assert refit_counts["test"] == manifest.filter(pl.col("official_split") == "test").height
    assert winner["test"]["n_images"] == refit_counts["test"]
    assert "5-fold cross-validation" in report and "Evaluation of the winner" in report
    assert_verdicts(out, report)


def test_halving_and_fold_stopping_with_two_workers_on_covid_ct(tmp_path, covid_ct, shared_artifacts):
    """Issue 20 on real data with 2 workers: 3 candidates x 3 folds breadth-first at rung 1 (1 epoch), the best
    by fold means continued from its checkpoints to 3 epochs; fold early stopping on; stage 2's adam + ce (with
    stage 1's lr: the `adam` preset alone would reset it to 1e-3, another config) is the stage-1 winner's own
    config and is reused, not trained."""
    path = covid_sweep(tmp_path, covid_ct, shared_artifacts, "covid_sh", epochs=3, size=32, data={"num_workers": 0},
                       stage2={"optimizers": ["adam"], "losses": ["ce"], "overrides": {"lr": 0.002}},  # = stage 1's
                       cv={"folds": 3, "final": "ensemble",
                       "early_stop": {"enabled": True, "min_folds": 2, "alpha": 0.05}}, workers=2, test_winner=False,
                       selection={"rule": "metric", "metric": "val/loss", "direction": "minimize"})
    cfg = yaml.safe_load(path.read_text())
    cfg["stage1"]["schedule"] = {"kind": "successive_halving", "min_epochs": 1, "eta": 3}
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("sweep", "--config", str(path), timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "[plan] stage1: 3 grid points x 3 runs; successive halving (eta 3): 9 runs to epoch 1, 3 runs to epoch 3" in proc.stdout
    s1, s2 = studies(tmp_path, "covid_sh")
    done = [t for t in s1.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.user_attrs.get("duplicate_of") is None]
    assert Counter(grid_key(t) for t in done).most_common(1)[0][1] == 1  # every (point, fold, rung) once
    promoted = s1.user_attrs["rung1_promoted"]
    assert len(promoted) == 1
    last = [t for t in s1.get_trials(states=(TrialState.COMPLETE,)) if t.params["rung"] == 1]
    assert len(last) == 3 and {t.params["candidate"] for t in last} == {promoted[0][0]}
    for t in last:  # continued from the rung-1 checkpoint: 2 new epochs, metrics.csv covering all 3
        assert t.user_attrs["trained_epochs"] == 2 and t.user_attrs["epochs_run"] == 3
        log = (tmp_path / "sweeps" / "covid_sh" / t.user_attrs["run_dir"] / "fit.log").read_text()
        assert "continuing from the checkpoint of epoch" in log
    pids = {r: {t.user_attrs["pid"] for t in s1.get_trials() if t.user_attrs.get("pid") and t.params["rung"] == r} for r in (0, 1)}
    assert [len(p) for p in pids.values()] == [2, 2]  # each rung's 2 workers (started per rung) both trained
    board = pl.read_parquet(tmp_path / "sweeps" / "covid_sh" / "stage1_leaderboard.parquet")
    assert board["candidate"][0] == promoted[0][0] and board["rung"].to_list()[0] == 2
    assert all(n.startswith(("rung 1/2", "stopped")) or "rung 1/2" in n for n in board["note"].to_list()[1:])
    assert [t.user_attrs.get("reused_from") for t in s2.get_trials(states=(TrialState.COMPLETE,))] == \
        [f"stage1/{promoted[0][0]}-r0-f{k}" for k in range(3)]
