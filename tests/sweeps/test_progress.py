"""The progress display: n/N, elapsed, ETA, the running trial's epoch and metrics, the best so far."""

from __future__ import annotations

import io
import json

from sweeps.progress import StageProgress, clock, follow


def test_plain_lines_show_n_of_n_eta_epoch_and_best_when_not_a_tty():
    out = io.StringIO()  # not a TTY, as under CI or nohup
    progress = StageProgress("stage1", total=4, done=1, workers=2, out=out)
    progress.trial_started("trial 1 resnet10t r0")
    progress.epoch_done({"epoch": 2, "max_epochs": 6, "metrics": {"val/loss": 0.51234, "val/acc": 0.8, "lr": 1.0}})
    progress.trial_finished(120.0, done=2, best="val/loss=0.5123 (resnet10t)")
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[sweep] stage1: 1/4 trials | elapsed 0:00:00 | ETA --")
    assert lines[1] == "[sweep] stage1 trial 1 resnet10t r0: epoch 3/6 val/loss=0.5123 val/acc=0.8000"
    assert lines[2].startswith("[sweep] stage1: 2/4 trials | elapsed ")
    assert "ETA 0:02:00" in lines[2]  # 120 s per trial x 2 remaining / 2 workers
    assert lines[2].endswith("| best val/loss=0.5123 (resnet10t)")
    assert "\x1b[" not in out.getvalue()  # no terminal control codes in a log file


def test_live_display_on_a_terminal_renders_the_same_facts():
    out = io.StringIO()
    progress = StageProgress("stage2", total=9, workers=1, tty=True, out=out)
    progress.trial_started("trial 0 adam-ce r0")
    progress.epoch_done({"epoch": 0, "max_epochs": 2, "metrics": {"val/loss": 1.0}})
    progress.close()
    text = out.getvalue()
    assert "0/9 trials" in text and "trial 0 adam-ce r0: epoch 1/2 val/loss=1.0000" in text


def test_follow_reads_each_complete_line_once(tmp_path):
    path = tmp_path / "progress.jsonl"
    seen = []
    with follow(path, seen.append, every=0.01):
        path.write_text(json.dumps({"epoch": 0}) + "\n" + '{"epoch": 1')  # the second line is half written
        with open(path, "a") as fh:
            fh.write("}\n")
    assert seen == [{"epoch": 0}, {"epoch": 1}]
    assert clock(3725) == "1:02:05" and clock(None) == "--"


def test_trial_callback_appends_one_line_per_validation_epoch(tmp_path):
    from types import SimpleNamespace

    import torch

    from sweeps.epoch_progress import EpochProgress

    callback = EpochProgress()
    trainer = SimpleNamespace(sanity_checking=True, is_global_zero=True, current_epoch=0, max_epochs=3,
                              default_root_dir=str(tmp_path), callback_metrics={"val/loss": torch.tensor(0.7)})
    callback.on_validation_end(trainer, None)  # the sanity check is not an epoch
    trainer.sanity_checking = False
    for epoch, loss in ((0, 0.7), (1, 0.5)):
        trainer.current_epoch, trainer.callback_metrics = epoch, {"val/loss": torch.tensor(loss), "val/cm": torch.eye(2)}
        callback.on_validation_end(trainer, None)
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["max_epochs"] == 3
    assert records[1]["metrics"] == {"val/loss": 0.5}  # scalars only
