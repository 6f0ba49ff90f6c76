"""What a sweep leaves behind in `artifacts/sweeps/<name>/`: leaderboards (parquet, CSV, Markdown), plots,
winner.yaml, report.md, and a W&B summary run with the leaderboards as tables."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from optuna.trial import TrialState

from evaluation.document import Document, fmt
from export.model_card import write_model_card
from runs import files
from runs.files import RunFiles
from runs.wandb_mode import wandb_mode
from sweeps import annotate, compare, crossval
from sweeps.config import SweepConfig
from sweeps.grid import GRID_KEYS
from sweeps.log import log
from sweeps.selection import StageResult, Winner

STUDY_TABLE = [("Accuracy", "acc"), ("Balanced acc.", "balanced_acc"), ("Precision", "precision"),
               ("Sensitivity", "sensitivity"), ("Specificity", "specificity"), ("F1", "f1"), ("MCC", "mcc"),
               ("AUROC", "auroc")]


def display_board(board: pl.DataFrame) -> pl.DataFrame:
    """Leaderboard for reading: `mean ± half-width` strings instead of two columns per metric."""
    cols = []
    for c in board.columns:
        if c.endswith(" ±95%") or (c.startswith("vs_winner_") and c != "vs_winner_folds"):  # vs_winner's numbers
            continue
        if f"{c} ±95%" in board.columns:
            cols.append(pl.struct(c, f"{c} ±95%").map_elements(
                lambda s, c=c: fmt(s[c]) + ("" if s[f"{c} ±95%"] is None or math.isnan(s[f"{c} ±95%"]) else f" ± {s[f'{c} ±95%']:.4f}"),
                return_dtype=pl.String).alias(c))
        else:
            cols.append(pl.col(c))
    return board.select(cols)


def write_table(frame: pl.DataFrame, stem: Path) -> None:
    frame.write_parquet(stem.with_suffix(".parquet"))
    frame.write_csv(stem.with_suffix(".csv"))
    doc = Document(stem.parent)
    doc.table(display_board(frame))
    stem.with_suffix(".md").write_text(doc.markdown())


def _score_column(board: pl.DataFrame, selection) -> tuple[str, str]:
    if selection.rule == "rank_score":
        return "rank_score", "study 002 overall score (higher is better)"
    return selection.metric, f"{selection.metric} ({selection.direction})"


def _figure(figsize: tuple[float, float]):
    """A pyplot-free (no global state, no GUI backend) figure; matplotlib is imported only when plotting."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def plot_stage1(board: pl.DataFrame, selection, path: Path, title: str = "Stage 1: base architecture") -> None:
    score, score_label = _score_column(board, selection)
    names = board["candidate"].to_list()[::-1]
    fig = _figure(figsize=(11, 0.5 * len(names) + 2))
    axes = fig.subplots(1, 2, sharey=True)
    axes[0].barh(names, board[score].to_list()[::-1], color="#4C72B0")
    axes[0].set_xlabel(score_label)
    acc = board["val/acc"].to_list()[::-1]
    err = [0 if e is None or math.isnan(e) else e for e in board["val/acc ±95%"].to_list()[::-1]] if "val/acc ±95%" in board.columns else None
    axes[1].barh(names, acc, xerr=err, color="#55A868", capsize=3)
    axes[1].set_xlabel("validation accuracy (± 95% over repeats)")
    axes[1].set_xlim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_stage2(board: pl.DataFrame, selection, path: Path, title: str = "Stage 2: optimizer x loss") -> None:
    score, score_label = _score_column(board, selection)
    opts = list(dict.fromkeys(board.sort("optimizer")["optimizer"].to_list()))
    losses = list(dict.fromkeys(board.sort("loss")["loss"].to_list()))
    grid = [[math.nan] * len(losses) for _ in opts]
    for row in board.iter_rows(named=True):
        grid[opts.index(row["optimizer"])][losses.index(row["loss"])] = row[score]
    fig = _figure(figsize=(1.6 * len(losses) + 2.5, 1.1 * len(opts) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(losses)), losses)
    ax.set_yticks(range(len(opts)), opts)
    ax.set_xlabel("loss")
    ax.set_ylabel("optimizer")
    for i in range(len(opts)):
        for j in range(len(losses)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.3g}", ha="center", va="center", color="white", fontsize=10)
    fig.colorbar(im, ax=ax, label=score_label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_winner_config(trial_config: Path, path: Path, run_name: str) -> None:
    """A fit config that reproduces the winner: the trial's resolved config without sweep-only settings."""
    cfg = yaml.safe_load(trial_config.read_text())
    run = cfg.get("run") or {}
    run.update({"dir": None, "name": run_name, "wandb_group": None, "wandb_job_type": None, "wandb_tags": []})
    cfg["run"] = run
    trainer = cfg.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    trainer["callbacks"] = [c for c in callbacks if not str(c.get("class_path", "")).startswith("sweeps.")] or None
    trainer["enable_progress_bar"] = True
    path.write_text("# Reproduces the sweep's winner: python cli.py fit --config " + str(path) + "\n"
                    + yaml.safe_dump(cfg, sort_keys=False))


def status_counts(study) -> dict[str, int]:
    counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("duplicate_of") is not None:
            counts["duplicates"] = counts.get("duplicates", 0) + 1
        elif t.state.name.lower() in counts:
            counts[t.state.name.lower()] += 1
    return counts


def val_test_table(winner: Winner) -> pl.DataFrame:
    """Study 002, 3.2: each metric on validation and test and the absolute difference."""
    test = (winner.test or {}).get("metrics", {})
    rows = []
    for title, key in STUDY_TABLE:
        v, t = winner.val.get(f"val/{key}"), test.get(key)
        rows.append({"metric": title, "validation": v, "test": t,
                     "|difference|": abs(v - t) if v is not None and t is not None else None})
    return pl.DataFrame(rows)


def study_table(winner: Winner) -> pl.DataFrame:
    """The winner's test results laid out like the studies' result tables."""
    test = (winner.test or {}).get("metrics", {})
    model = f"{winner.base_architecture} ({winner.optimizer}, {winner.loss})"
    return pl.DataFrame([{"Model": model, **{title: test.get(key) for title, key in STUDY_TABLE}}])


def write_boards(sweep: SweepConfig, out: Path, results: list[StageResult]) -> None:
    """Leaderboards (parquet, CSV, Markdown), the trials' tables and the stage plots: everything that does
    not need the winner's test results, so it can be written while the winner is tested."""
    for r in results:
        write_table(r.board, out / f"{r.stage.name}_leaderboard")
        r.trials.write_parquet(out / f"{r.stage.name}_trials.parquet")
        plot = plot_stage1 if r.stage.chooses_architecture else plot_stage2
        plot(r.board, sweep.selection, out / r.stage.plot, r.stage.title)


def write(sweep: SweepConfig, results: list[StageResult], winner: Winner,
          test_winner: Callable[[], dict[str, Any]] | None) -> None:
    """Leaderboards, plots, W&B summary, winner.json and report; the winner's test (`test_winner`), winner.yaml
    and winner.ckpt when its run directory is reachable (`test_winner` None: it is not)."""
    out = sweep.out_dir
    run = RunFiles(out / winner.run_dir)  # run_dir is relative to the sweep folder
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The winner is tested in its own process; meanwhile this one writes what does not depend on the test.
        test = pool.submit(test_winner) if sweep.test_winner and test_winner is not None else None
        if run.config.exists():
            write_winner_config(run.config, out / "winner.yaml", f"{sweep.name}-winner")
        if run.best_checkpoint.exists():
            shutil.copy2(run.best_checkpoint, out / files.WINNER_CKPT)
            shutil.copy2(run.model_info, out / "winner_model.json")
        write_boards(sweep, out, results)
        wandb_run = start_wandb_summary(sweep, out, results)
        try:
            if test is not None:
                winner.test = test.result()
                if winner.test.get("checkpoint"):  # paths in winner.json are relative to the sweep folder
                    winner.test["checkpoint"] = os.path.relpath(winner.test["checkpoint"], out)
        finally:
            finish_wandb_summary(wandb_run, winner)
    RunFiles(out).write_json(files.WINNER, winner.to_json())
    write_report(sweep, out, results, winner)
    write_model_card(out, out)  # read back from the files just written: the card never retypes a number
    log.info(f"[sweep] done: {out}/report.md, model card {out}/model_card.md, winner config {out}/winner.yaml")


def _selection_text(sweep: SweepConfig, winner: Winner) -> str:
    """How the winner was selected: the rule, and under cross-validation the folds and the final model."""
    rule = (f"{sweep.selection.metric} ({sweep.selection.direction})" if sweep.selection.rule == "metric" else
            "study 002 overall score: " + ", ".join(f"{t.weight:g} x {t.metric}" for t in sweep.selection.terms))
    folds = sweep.cv.k
    if not folds:
        return (f"Selection: **{sweep.selection.rule}** ({rule}); ties go to fewer parameters; {sweep.repeats} repeat(s) "
                "per grid point (mean ± 95% interval over repeats; `first_in_repeats`: how often it ranked first).")
    final = winner.cv or {}
    if winner.winner_elsewhere:
        how = "trained by a sweep command on another machine, which writes its final model and test"
    elif sweep.cv.final == "refit":
        how = (f"then trained once more on every non-test image for {final.get('refit_epochs')} epoch(s) (the median "
               "best epoch of its folds; `cv.final: refit`) and tested once")
    else:
        how = (f"kept as its {folds * sweep.repeats} fold models (`cv.final: ensemble`), each tested once, their "
               "averaged test probabilities scored")
    runs = f"{folds * sweep.repeats} times ({folds} folds x {sweep.repeats} repeats)" if sweep.repeats > 1 else f"{folds} times"
    return (f"Selection: **{sweep.selection.rule}** ({rule}) on **{folds}-fold cross-validation**: the test split is "
            f"held out once and every grid point trains {runs}, validating on each stratified, patient-grouped fold "
            f"in turn. Leaderboards show fold means ± 95% t-interval over the {folds} folds"
            + (" (a fold's repeats averaged first)" if sweep.repeats > 1 else "")
            + " (`repeats` counts the folds; `first_in_repeats`: on how many folds the point ranked first); the rank "
            f"score ranks the means; ties go to fewer parameters. The winner was {how}. "
            "Out-of-fold probabilities of every grid point: `oof/<stage>/<point>.parquet`.")


def _stage_section(doc: Document, sweep: SweepConfig, out: Path, result: StageResult) -> dict | None:
    """A stage's leaderboard, notes, plot and failed trials; returns its parsimonious choice (or None)."""
    counts = status_counts(result.study)
    doc.h2(result.stage.title)
    doc.p("Trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".")
    doc.table(display_board(result.board))
    keys = [k for k in GRID_KEYS if k in result.board.columns]
    samples = crossval.as_samples(result.trials, keys, sweep.cv.k, sweep.repeats)
    notes, parsimonious = compare.stage_notes(sweep.selection, samples, result.board, out, sweep.cv.k)
    for sentence in notes:  # which loss/overfit terms were ranked, incomplete points, the comparisons
        doc.p(sentence)
    for sentence in annotate.report_notes(result.board, keys, result.budget_limited):  # stopped, reused, rungs
        doc.p(sentence)
    doc.image(out / result.stage.plot, f"{result.stage.name} comparison")
    failed = result.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    if failed:
        doc.h3("Failed trials")
        doc.table(pl.DataFrame([{"trial": t.number, "grid point": str(t.system_attrs.get("fixed_params") or t.params),
                                 "reason": str(t.user_attrs.get("fail_reason"))} for t in failed]))
    return parsimonious


def _winner_section(doc: Document, out: Path, winner: Winner, parsimonious: dict[str, dict | None], folds: int) -> None:
    doc.h2("Winner")
    if winner.winner_elsewhere:
        reproduce = (f"Its run `{winner.run_dir}` was trained by a sweep command on another machine, which tests "
                     "it and writes its winner.yaml.")
    elif winner.ensemble:
        reproduce = (f"The final model is the ensemble of its {len(winner.cv['members'])} fold models "
                     "(`winner.json`: `cv.members`); `winner.yaml`, `winner.ckpt` and the evaluation below are its best "
                     f"fold model, `{winner.run_dir}`, alone (`python cli.py fit --config {out / 'winner.yaml'}` "
                     "retrains that fold).")
    else:
        reproduce = f"Reproduce it with `python cli.py fit --config {out / 'winner.yaml'}`."
    trial = f"best fold run: trial {winner.trial}" if folds else f"trial {winner.trial}"
    doc.p(f"**{winner.base_architecture}** with **{winner.optimizer}** and **{winner.loss}** ({trial}, "
          f"{winner.params:,} parameters). {reproduce}")
    for name, simplest in parsimonious.items():
        if simplest is not None:
            what = simplest.get("candidate") or f"{simplest.get('optimizer')} + {simplest.get('loss')}"
            doc.p(f"Parsimonious choice ({name}): **{what}**, {simplest['params']:,} parameters, which the validation data "
                  "cannot tell apart from that stage's winner (see its leaderboard).")


def _test_section(doc: Document, winner: Winner) -> None:
    if not winner.test:
        return
    doc.h3("Validation vs test (study 002, 3.2)")
    doc.table(val_test_table(winner))
    doc.h3("Test results, laid out like the studies' tables")
    doc.table(study_table(winner))
    if winner.test.get("intervals"):  # the k-fold ensemble's own bootstrap intervals
        doc.p(f"The k-fold ensemble on {winner.test['n_images']} test images, with 95% bootstrap intervals "
              "(stratified by class, patients drawn whole); `final/ensemble/test_predictions.parquet` per image.")
        doc.table(pl.DataFrame([{"metric": k, "value": v, "95% interval": "{:.3f} – {:.3f}".format(*winner.test["intervals"][k])}
                                for k, v in winner.test["metrics"].items()]))


def write_report(sweep: SweepConfig, out: Path, results: list[StageResult], winner: Winner) -> None:
    """report.md/.html: the stages' leaderboards and plots (see `write_boards`), the winner, and the winner's
    evaluation report."""
    doc = Document(out)
    doc.h1(f"Sweep {sweep.name}")
    doc.p(f"Storage `{sweep.storage_url}` — browse it with `optuna-dashboard {sweep.storage_url}`.")
    doc.p(_selection_text(sweep, winner))
    parsimonious = {r.stage.name: _stage_section(doc, sweep, out, r) for r in results}
    if winner.incomplete:  # only with allow_failures: otherwise the sweep stops before a winner
        doc.h2("Grid points without a finished trial")
        doc.table(pl.DataFrame(winner.incomplete))
    _winner_section(doc, out, winner, parsimonious, sweep.cv.k)
    _test_section(doc, winner)
    winner_report = out / winner.run_dir / "report.json"  # run_dir is relative to the sweep folder
    if winner_report.exists():
        doc.h2("Evaluation of the winner" + (" (its best fold model alone)" if winner.ensemble else ""))
        doc.extend(Document.load_json(winner_report))
    from audit.report import (
        add_audit_section,  # the data audit of the winner's run: summary here, all in audit/
    )

    add_audit_section(doc, out / winner.run_dir, out / "audit")
    doc.write(out / "report", f"Sweep {sweep.name}")


def start_wandb_summary(sweep: SweepConfig, out: Path, results: list[StageResult]):
    """The sweep's W&B summary run with the leaderboards as tables and the stage plots (None when W&B is
    disabled); `finish_wandb_summary` adds the winner's test metrics and closes it."""
    mode = wandb_mode(sweep.wandb)
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(project="medsel", group=sweep.name, job_type="summary", name=f"{sweep.name}-leaderboard",
                     dir=str(out), mode=mode, config={"sweep": sweep.name, "selection": sweep.selection.rule},
                     reinit="finish_previous")
    for r in results:
        shown = display_board(r.board)
        run.log({f"{r.stage.name}_leaderboard": wandb.Table(columns=shown.columns, data=[list(map(fmt, row)) for row in shown.iter_rows()])})
        image = out / r.stage.plot
        if image.exists():
            run.log({f"{r.stage.name}_plot": wandb.Image(str(image))})
    return run


def finish_wandb_summary(run, winner: Winner) -> None:
    if run is None:
        return
    if winner.test:
        run.summary.update({f"test/{k}": v for k, v in winner.test["metrics"].items()})
    run.finish()
