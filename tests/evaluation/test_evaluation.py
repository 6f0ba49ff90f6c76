"""Evaluation: intervals, calibration, heat maps, and the report as a person sees it (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil

import cv2
import numpy as np
import polars as pl
import pytest
import torch

from datamodules.phantoms import render
from evaluation import calibration
from evaluation.heatmaps import heatmaps, target_layer
from evaluation.intervals import bootstrap
from lightning_modules.metrics import METRIC_NAMES
from lightning_modules.networks import NetworkConfig, build_network
from runs.open import open_run
from tests.conftest import REPO, cli_in_process, run_dirs, small_fit_args
from tests.datamodules.test_inputs import make_folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def synthetic(n: int, k: int = 2, skill: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), targets] += skill
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs.astype(np.float32), targets


@pytest.mark.parametrize("k", [2, 4])
def test_intervals_contain_the_estimate_and_shrink_with_more_samples(k):
    widths = []
    for n in (100, 1600):
        probs, targets = synthetic(n, k)
        overall, per_class = bootstrap(probs, targets, n_resamples=300, seed=1)
        assert set(overall) == set(METRIC_NAMES)
        for m, iv in overall.items():
            assert iv.low <= iv.value <= iv.high, (m, iv)
        widths.append(np.mean([overall[m].width for m in METRIC_NAMES]))
        if k > 2:
            assert len(per_class["sensitivity"]) == k
            assert all(iv.low <= iv.value <= iv.high for iv in per_class["f1"])
        else:
            assert per_class == {}
    assert widths[1] < widths[0] / 2.5  # 16x the data: about 4x narrower


def test_patient_level_resampling_widens_intervals_for_clustered_images():
    probs, targets = synthetic(60)
    # every patient contributes 5 identical images: 60 patients are not 300 independent images
    probs5, targets5 = np.repeat(probs, 5, 0), np.repeat(targets, 5)
    groups = np.repeat(np.arange(60), 5)
    by_image, _ = bootstrap(probs5, targets5, n_resamples=400, seed=2)
    by_patient, _ = bootstrap(probs5, targets5, groups=groups, n_resamples=400, seed=2)
    assert by_patient["acc"].value == by_image["acc"].value
    assert by_patient["acc"].width > 1.7 * by_image["acc"].width


def test_ece_is_near_zero_for_a_calibrated_predictor_and_not_for_an_overconfident_one():
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    targets = rng.integers(0, 2, n)
    correct = rng.random(n) < conf  # right exactly as often as it claims
    predicted = np.where(correct, targets, 1 - targets)
    probs = np.zeros((n, 2))
    probs[np.arange(n), predicted] = conf
    probs[np.arange(n), 1 - predicted] = 1 - conf
    assert calibration.expected_calibration_error(probs, targets) < 0.02
    over = np.zeros((n, 2))
    correct = rng.random(n) < 0.7  # right 70% of the time, claims 99%
    predicted = np.where(correct, targets, 1 - targets)
    over[np.arange(n), predicted] = 0.99
    over[np.arange(n), 1 - predicted] = 0.01
    assert calibration.expected_calibration_error(over, targets) > 0.25
    bins = calibration.reliability(over, targets)
    assert bins.count.sum() == n and abs(np.nansum(bins.accuracy * bins.count) / n - 0.7) < 0.02


def test_temperature_scaling_recovers_the_overconfidence():
    rng = np.random.default_rng(3)
    n = 5000
    logits = rng.normal(0, 1.5, (n, 3))
    calibrated = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(3, p=p) for p in calibrated])  # softmax(logits) is the true posterior
    sharp = logits * 3.0  # the same model, 3x over-confident: the right temperature is 3
    probs = np.exp(sharp) / np.exp(sharp).sum(1, keepdims=True)
    t = calibration.fit_temperature(probs, targets)
    assert 2.6 < t < 3.4
    scaled = calibration.apply_temperature(probs, t)
    assert (scaled.argmax(1) == probs.argmax(1)).all()
    assert calibration.expected_calibration_error(scaled, targets) < calibration.expected_calibration_error(probs, targets) / 3
    assert calibration.nll(scaled, targets) < calibration.nll(probs, targets)


def test_heatmaps_work_inside_inference_mode_for_every_custom_net():
    for name, size in (("ctnet10", 64), ("attention_vgg16", 64), ("resnet10t", 64)):
        net = build_network(NetworkConfig(name=name, freeze_backbone=True), 4, (size, size))
        images = torch.randint(0, 255, (2, size, size, 3), dtype=torch.uint8)
        with torch.inference_mode():  # as inside Lightning's test loop
            cams, attention = heatmaps(net, images, [0, 3], "gradcam++")
        assert cams.shape == (2, size, size) and np.isfinite(cams).all()
        assert (attention is not None) == (name == "attention_vgg16")
        if attention is not None:
            assert attention.shape == (2, size, size) and 0 <= attention.min() and attention.max() <= 1
    assert target_layer(build_network(NetworkConfig(name="resnet10t"), 2, (64, 64)), (64, 64)).__class__.__name__ == "Sequential"


def test_gradcam_points_at_the_class_defining_region(trained_run):
    opened = open_run(trained_run, overrides={"data": {"num_workers": 0}})
    model, dm = opened.model, opened.datamodule
    dm.setup()
    rows = dm.resolve().frame.filter(pl.col("split") == "test")
    images = torch.stack([dm.datasets["test"][i][0] for i in range(rows.height)])
    with torch.no_grad():
        pred = model(model.net.normalize(images)).argmax(1)
    for method in ("gradcam", "gradcam++"):
        cams, _ = heatmaps(model.net, images, pred.tolist(), method)
        heart_density, background_density = [], []
        for k, path in enumerate(rows["path"].to_list()):
            label, index = re.match(r".*/(\w+)_(\d+)\.png$", path).groups()
            phantom, heart = render(label, int(index))  # the phantom's heart (and aortic knob) mask
            heart = cv2.resize(heart.astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST).astype(bool)
            background = cv2.resize((phantom < 30).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST).astype(bool)
            heart_density.append(cams[k][heart].mean())
            background_density.append(cams[k][background & ~heart].mean())
        heart_density, background_density = np.array(heart_density), np.array(background_density)
        per_image = float(np.mean(heart_density > background_density))
        print(f"{method}: heat per pixel on the heart {heart_density.mean():.3f}, on the background "
              f"{background_density.mean():.3f}; heart > background on {per_image:.0%} of images")
        assert heart_density.mean() > 1.5 * background_density.mean(), method
        if method == "gradcam++":
            assert per_image >= 0.8


def test_report_files_and_numbers(trained_run):
    ev = json.loads((trained_run / "evaluation.json").read_text())
    assert ev["n_images"] == 24 and ev["bootstrap"] == 200
    for m in METRIC_NAMES:
        assert ev["metrics"][m]["low"] <= ev["metrics"][m]["value"] <= ev["metrics"][m]["high"]
    assert set(ev["per_class"]["sensitivity"]) == {"normal", "ASD", "VSD", "PDA"}
    assert ev["calibration"]["temperature"] > 0 and len(ev["calibration"]["ece"]) == 2
    test_metrics = json.loads((trained_run / "test_metrics.json").read_text())["metrics"]
    assert ev["metrics"]["acc"]["value"] == pytest.approx(test_metrics["acc"], abs=1e-6)  # same model, same images
    files = {p.name for p in (trained_run / "report_files").iterdir()}
    assert {"confusion_matrix.png", "roc.png", "precision_recall.png", "reliability.png", "training_curves.png"} <= files
    assert sum(f.startswith("heatmap_") for f in files) >= 8
    md = (trained_run / "report.md").read_text()
    assert "95% interval" in md and "Where the model looks" in md and "T = " in md
    preds = pl.read_parquet(trained_run / "test_predictions.parquet")
    assert preds.height == 24 and {"path", "label", "predicted", "p_normal"} <= set(preds.columns)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_shows_every_image_in_headless_chromium(trained_run):
    from playwright.sync_api import sync_playwright

    page_file = trained_run / "report.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt}))")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        browser.close()
    assert len(images) >= 13
    assert all(i["ok"] for i in images), [i["alt"] for i in images if not i["ok"]]
    assert {"Test metrics", "Calibration", "Plots", "Where the model looks"} <= set(headings)


def test_report_command_rebuilds_without_retraining(trained_run, capsys, monkeypatch):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    before = ckpt.stat().st_mtime_ns
    (trained_run / "report.html").unlink()
    fits = []
    monkeypatch.setattr("lightning.pytorch.Trainer.fit", lambda *a, **k: fits.append(a))
    assert cli_in_process("report", str(trained_run), "--report.heatmap=gradcam++", "--report.bootstrap=100") == 0
    assert (trained_run / "report.html").exists() and ckpt.stat().st_mtime_ns == before
    assert not fits  # no training loop ran
    ev = json.loads((trained_run / "evaluation.json").read_text())
    assert ev["bootstrap"] == 100
    capsys.readouterr()
    assert cli_in_process("report", str(REPO / "nonexistent")) == 2
    assert "not a sweep folder" in capsys.readouterr().err


def test_report_with_partial_patient_ids_resamples_missing_ids_as_single_patients(tmp_path):
    """Manifests may give a patient id for some rows only (the split code supports it); so must the report."""
    root = make_folder(tmp_path / "data", per_class=20)
    paths = sorted(root.rglob("*.png"))
    ids = [f"p{i // 2}" if i % 3 else None for i in range(len(paths))]  # pairs of images per patient, gaps
    pl.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths], "patient_id": ids}).write_csv(
        tmp_path / "manifest.csv")
    args = small_fit_args(tmp_path / "a", tmp_path / "runs", f"--data.source={tmp_path / 'manifest.csv'}",
                          "--data.classes=[benign, malignant]", "--data.augmentation=none", "--report.heatmap=none",
                          "--report.bootstrap=50")
    assert cli_in_process("fit", *args) == 0
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert cli_in_process("test", "--config", str(run_dir / "config.yaml"), "--trainer.enable_progress_bar=false") == 0
    ev = json.loads((run_dir / "evaluation.json").read_text())
    test_ids = pl.read_parquet(run_dir / "test_predictions.parquet")["patient_id"]
    assert 0 < test_ids.null_count() < len(test_ids)  # the test split really mixes known and missing ids
    assert ev["resampled"] == "patients" and "without a patient id counts as a patient of its own" in ev["resampling"]
    assert ev["n_groups"] == test_ids.n_unique() - 1 + test_ids.null_count()
    assert "stratified by class" in (run_dir / "report.md").read_text()


@pytest.mark.slow  # the test job in its own process (forkserver start, torch import): ~10 s on 2 cores
def test_a_copied_run_is_tested_into_its_own_folder(trained_run, tmp_path):
    """A sweep folder moved or copied elsewhere: its winner's test writes into the copy, never into the run
    directory that the copied config.yaml recorded."""
    import shutil

    from runs import files
    from sweeps.jobs import evaluate_on_test

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    for name in (files.TEST_METRICS, files.EVALUATION):
        (copy / name).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir() if p.is_file()}
    result = evaluate_on_test(copy)
    assert (copy / files.TEST_METRICS).exists() and (copy / files.EVALUATION).exists()
    assert result["n_images"] > 0
    assert {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir() if p.is_file()} == before


def test_test_with_wandb_offline_by_default_writes_its_report(trained_run, tmp_path, monkeypatch):
    """No run.wandb and no $WANDB_MODE (a new user's sweep): W&B logs offline, and Lightning's logger then
    sets $WANDB_MODE=dryrun in the process, which the report written after `test` must read as offline."""
    import shutil

    from tests.conftest import cli_in_process

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    (copy / "evaluation.json").unlink()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert cli_in_process("test", "--config", str(copy / "config.yaml"), f"--run.dir={copy}", "--run.wandb=null",
                          "--trainer.enable_progress_bar=false") == 0
    assert (copy / "evaluation.json").exists()
