"""Selection within a budget, with the fake trial runner on a real SQLite study (stage 1 alone where the
rest of the sweep is not what is tested): fold early stopping, the plan and its cost, the budget's refusal
and its budget-limited finish. Identical-config reuse is asserted by test_sweep.py and test_crossval.py
(stage 2's default pair); the real end-to-end sweep is in test_e2e.py (slow)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from errors import ConfigError
from sweeps import annotate, budget, fold_stopping, grid, selection, trials, worker
from sweeps import coordinator as coord
from sweeps.config import Budget, CrossValidation, FoldStopping, Schedule, Stage1
from tests.sweeps.fakes import FakeTrials, tiny_sweep


def run_stage1(sweep, fake):
    sweep.out_dir.mkdir(parents=True)
    configs = trials.TrialConfigs(sweep)
    stage = grid.stage1(sweep, list(configs.candidates), configs.shared)
    ss = worker.run_stage(sweep, stage, None, configs, fake)
    return ss, selection.stage_result(sweep, ss)


def test_a_clearly_worse_candidate_stops_after_min_folds_and_never_wins(tmp_path, no_plots):
    stop = FoldStopping(enabled=True, min_folds=2, alpha=0.05)
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=3, early_stop=stop))
    fake = FakeTrials()
    ss, result = run_stage1(sweep, fake)
    # breadth-first: fold 0 of both, fold 1 of both; then ctnet10 (val/loss 0.6 against 0.3 on both folds) stops
    folds = [(call[0], cfg["data"]["split"]["fold"]) for call, cfg in zip(fake.calls, fake.configs, strict=True)]
    assert folds == [("resnet10t", 0), ("ctnet10", 0), ("resnet10t", 1), ("ctnet10", 1), ("resnet10t", 2)]
    board = result.board
    assert board["candidate"].to_list() == ["resnet10t", "ctnet10"] and board["complete"].to_list() == [True, False]
    note = board.row(1, named=True)["note"]
    assert note.startswith("stopped after 2 folds: worse than resnet10t (p = ") and "corrected t-test" in note
    assert len(fold_stopping.stopped_points(ss)) == 1


def test_the_paired_tests_stop_only_what_the_folds_can_tell_apart():
    clear = fold_stopping.p_worse([0.80, 0.82, 0.79], [0.60, 0.63, 0.61], "corrected_t", 1 / 4, True)
    mixed = fold_stopping.p_worse([0.80, 0.62], [0.70, 0.71], "corrected_t", 1 / 4, True)
    assert clear < 0.01 and mixed > 0.3
    # the exact signed-rank test cannot go below 1/2^n: 0.25 on two folds, whatever the gap
    assert fold_stopping.p_worse([0.9, 0.9], [0.1, 0.2], "wilcoxon", 1 / 4, True) == pytest.approx(0.25)
    assert fold_stopping.p_worse([0.3, 0.3], [0.6, 0.6], "corrected_t", 1 / 4, False) == 0.0  # loss: lower is better
    assert fold_stopping.p_worse([0.5, 0.5], [0.5, 0.5], "corrected_t", 1 / 4, True) == 1.0


def configs_of(candidates: int, epochs: int):
    names = {f"net{i}": (i, {}) for i in range(candidates)}
    return SimpleNamespace(candidates=names, shared={"trainer": {"max_epochs": epochs}},
                           candidate=lambda name: {"trainer": {"max_epochs": epochs}})


def test_the_plan_counts_epochs_per_rung_and_the_budget_chooses_min_epochs(tmp_path, capsys):
    halving = Schedule(kind="successive_halving", min_epochs=None, eta=3)
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=5), budget=Budget(hours=1.0, epoch_seconds=10.0),
                       stage1=Stage1(candidates=[{"network": "resnet10t"}], schedule=halving))
    configs = configs_of(6, 12)
    s1 = budget.StagePlan("stage1", 6, 5, budget.rungs(replace(halving, min_epochs=2), 12), 3, continues=True)
    assert s1.rungs == [2, 6, 12] and [s1.runs_at(r) for r in range(3)] == [30, 10, 5]
    assert s1.epochs == 30 * 2 + 10 * 4 + 5 * 6 and s1.exhaustive_epochs == 360
    assert budget.StagePlan("s", 6, 5, [2, 6, 12], 3, continues=False).epochs == 30 * 2 + 10 * 6 + 5 * 12
    # 1 h at 10 s/epoch = 360 epochs for both stages (stage 2: 4 pairs x 5 folds x 12 epochs = 240 exhaustive)
    cost = budget.Cost(10.0, 0.0, "budget.epoch_seconds")
    chosen = budget.fit_budget(sweep, configs, cost, continues=True)
    plans = budget.plan(chosen, configs, True)
    assert cost.of(plans) <= 3600 and chosen.stage1.schedule.min_epochs is not None
    assert cost.of(budget.plan(replace(chosen, stage1=replace(chosen.stage1, schedule=replace(
        chosen.stage1.schedule, min_epochs=chosen.stage1.schedule.min_epochs + 1))), configs, True)) > 3600
    announced = budget.announce(sweep, configs, coord.make_storage(f"sqlite:///{tmp_path / 'plan.db'}"), True)
    lines = capsys.readouterr().out
    assert announced.stage1.schedule == chosen.stage1.schedule and "[plan] stage1: 6 grid points x 5 runs" in lines
    assert "[plan] expected cost" in lines and "budget 3600 s (1.00 h)" in lines
    with pytest.raises(ConfigError) as refused:  # not even 1 epoch per first rung fits in 0.05 h
        budget.fit_budget(replace(sweep, budget=Budget(hours=0.05, epoch_seconds=10.0)), configs, cost, continues=True)
    assert "budget.hours 0.05 = 180 s (0.05 h) cannot fit" in str(refused.value) and "epochs x 10.0 s" in str(refused.value)
    assert "\n" not in str(refused.value)


class Clock:
    """Stands in for `time` in the worker: each fake epoch takes 100 s of device time."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


class SlowTrials(FakeTrials):
    def __call__(self, cfg, run_dir):
        Clock.now += 100.0 * cfg["trainer"]["max_epochs"]
        return super().__call__(cfg, run_dir)


def test_a_budget_that_runs_out_mid_stage_finishes_with_the_best_so_far(tmp_path, monkeypatch, no_plots):
    monkeypatch.setattr(worker, "time", Clock)
    # 2 candidates x 3 folds x 2 epochs of 100 s: 1200 s exhaustive, 900 s budget (no estimate before the first run)
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=3), budget=Budget(hours=0.25))
    fake = SlowTrials()
    ss, result = run_stage1(sweep, fake)
    assert len(fake.calls) == 4 and result.budget_limited  # folds 0 and 1 of both, breadth-first
    board = result.board
    assert board["candidate"].to_list() == ["resnet10t", "ctnet10"] and board["repeats"].to_list() == [2, 2]
    assert all("budget-limited: 1 run not trained" in n for n in board["note"].to_list())
    spent = budget.spent_seconds(ss.study.get_trials())
    assert spent == pytest.approx(800.0) and spent <= 900
    assert annotate.report_notes(board, ["candidate"], True)[0].startswith("**Budget-limited**")
    winner = selection.Winner("t", [], "resnet10t", "adam", "ce", 0, "x", 1, "metric", {}, budget_limited=True)
    assert winner.to_json()["budget_limited"] is True
    assert math.isclose(sweep.budget.hours * 3600, 900.0)


def test_successive_halving_promotes_by_fold_means_and_resumes_a_killed_rung(tmp_path, no_plots):
    # ctnet10 is best on fold 0 alone (0.2 against 0.3) but worse on the mean of both folds (0.55)
    halving = Stage1(candidates=[{"network": "resnet10t"}, {"network": "ctnet10"}],
                     defaults={"optimizer": "adam", "loss": "ce", "max_epochs": 2, "image_size": 32},
                     schedule=Schedule(kind="successive_halving", min_epochs=1, eta=2))
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=2), stage1=halving)
    offsets = {("ctnet10", 0): -0.4, ("ctnet10", 1): 0.3}
    fake = FakeTrials({"resnet10t": ["ok", "ok", "interrupted"]}, fold_loss=offsets)  # its first rung-2 run: kill -9
    ss, _ = run_stage1(sweep, fake)
    def epochs(cfg):  # (until_epoch: where it stops, None at the last rung; whether it continues a checkpoint)
        return cfg["run"].get("until_epoch"), "ckpt_path" in cfg

    runs = [(call[0], *epochs(cfg)) for call, cfg in zip(fake.calls, fake.configs, strict=True)]
    assert runs[:4] == [("resnet10t", 1, False), ("ctnet10", 1, False)] * 2
    assert runs[4:] == [("resnet10t", None, True)] * 2 and ss.study.user_attrs["rung1_promoted"] == [["resnet10t"]]
    assert all(c["trainer"]["max_epochs"] == 2 for c in fake.configs)  # the schedule is defined over max_epochs
    # the rerun retrains the killed rung-2 run alone, from the recorded promotion
    again = FakeTrials(fold_loss=offsets)
    configs = trials.TrialConfigs(sweep)
    ss = worker.run_stage(sweep, grid.stage1(sweep, list(configs.candidates), configs.shared), None, configs, again)
    assert [(c[0], *epochs(cfg), cfg["data"]["split"]["fold"]) for c, cfg in zip(again.calls, again.configs, strict=True)] \
        == [("resnet10t", None, True, 0)]
    board = selection.stage_result(sweep, ss).board
    assert board["candidate"].to_list()[0] == "resnet10t" and board["rung"].to_list() == [2, 1]
    assert board["note"].to_list()[0] == "rung 2/2 (2 epochs)" and board["complete"].to_list() == [True, False]
    assert all(n.startswith("rung 1/2 (1 epoch): not promoted") for n in board["note"].to_list()[1:])
