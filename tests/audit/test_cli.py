"""`audit.cli.main` (what `python cli.py audit` runs), in-process."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import yaml

from audit.cli import main
from audit.report import CLUSTERS, HTML, LABEL_ISSUES, SUMMARY


def _config(tmp_path, source, **data):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": str(source), "classes": ["normal", "covid"], "image_size": 16,
                                            "num_workers": 0, "artifacts_dir": str(tmp_path / "a"), **data}}))
    return cfg


def test_audit_reports_every_cluster_with_thumbnails_and_never_stops_on_conflicts(folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--config", str(_config(tmp_path, folder)), "--out", str(out)]) == 0
    clusters = pl.read_parquet(out / CLUSTERS)
    assert clusters.height == 3 and clusters["label_conflict"].sum() == 1
    conflict = clusters.filter(pl.col("label_conflict")).row(0, named=True)
    assert conflict["files"] == ["covid/copy_of_normal_0.png", "normal/normal_0.png"]
    assert json.loads((out / SUMMARY).read_text())["label_conflict"] == 1
    page = (out / HTML).read_text()
    assert page.count("<img src='data:image/png;base64,iVBOR") == 7  # 2 + 2 + 3 cluster members
    assert "label conflict" in page and "normal/normal_0.png" in page
    assert "[audit] label conflicts 1" in capsys.readouterr().out


def test_label_issues_from_given_probabilities_are_ranked(folder, tmp_path):
    out = tmp_path / "report"
    cfg = _config(tmp_path, folder)
    suspicious = {"covid_3.png": 0.97, "covid_5.png": 0.9}  # p(normal) of two covid images
    rows = []
    for c in ("normal", "covid"):
        for p in sorted((folder / c).glob("*.png")) + sorted((folder / c).glob("*.jpg")):
            normal = suspicious.get(p.name, 0.9 if c == "normal" else 0.1)
            rows.append({"path": str(p.resolve()), "normal": normal, "covid": 1 - normal})
    probs = pl.DataFrame(rows)
    probs.write_parquet(tmp_path / "probs.parquet")
    assert main(["--config", str(cfg), "--out", str(out), "--probabilities", str(tmp_path / "probs.parquet")]) == 0
    issues = pl.read_parquet(out / LABEL_ISSUES)
    assert issues["relpath"].to_list() == ["covid/covid_3.png", "covid/covid_5.png"]
    assert issues["suggested"].to_list() == ["normal", "normal"]
    assert "Suspected label issues" in (out / HTML).read_text()


@pytest.mark.slow
def test_quick_kfold_model_flags_flipped_labels(tmp_path):
    """Two easy classes (horizontal vs vertical stripes), 5 labels flipped: the k-fold model trained by
    `--label_issues true` puts them at the top of its list."""
    import cv2

    rng = np.random.default_rng(0)
    rows = []
    for c in ("horizontal", "vertical"):
        for i in range(40):
            stripes = np.tile((np.arange(32) // rng.integers(2, 5) % 2 * 160 + 40)[:, None], (1, 32))
            image = (stripes if c == "horizontal" else stripes.T) + rng.normal(0, 20, (32, 32))
            path = tmp_path / "d" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8))
            rows.append((str(path), c))
    flipped = {rows[i][0] for i in (3, 17, 41, 55, 70)}
    rows = [(p, ({"horizontal": "vertical", "vertical": "horizontal"}[c]) if p in flipped else c) for p, c in rows]
    manifest = tmp_path / "m.csv"
    pl.DataFrame(rows, schema=["path", "label"], orient="row").write_csv(manifest)
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"source": str(manifest), "classes": ["horizontal", "vertical"], "image_size": 32, "num_workers": 0,
                 "artifacts_dir": str(tmp_path / "a"), "batch_size": 16},
        "model": {"network": {"name": "resnet10t"}, "loss": "ce",
                  "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.003}}},
        "trainer": {"accelerator": "cpu"},
    }))
    out = tmp_path / "report"
    assert main(["--config", str(cfg), "--out", str(out), "--label_issues", "true", "--folds", "3", "--epochs", "4",
                 "--image_size", "32"]) == 0
    issues = pl.read_parquet(out / LABEL_ISSUES)
    assert set(issues["path"].head(5).to_list()) == flipped, issues
    assert issues.height <= 8  # and hardly anything else
    assert pl.read_parquet(out / "oof_probabilities.parquet").columns == ["path", "horizontal", "vertical"]


def test_label_issues_from_a_sweeps_out_of_fold_file(folder, tmp_path, capsys):
    """A cross-validated sweep's oof/<stage>/<point>.parquet (p_<class> columns, one row per repeat, no test
    images) is accepted: repeats averaged, images without a probability named in a line, not an error."""
    out = tmp_path / "report"
    cfg = _config(tmp_path, folder)
    rows = []
    paths = [p for c in ("normal", "covid") for p in sorted((folder / c).glob("*.png")) + sorted((folder / c).glob("*.jpg"))]
    for repeat in range(2):
        for p in paths[:-2]:  # the last two stand for a held-out test split
            normal = 0.97 if p.name == "covid_3.png" else (0.9 if p.parent.name == "normal" else 0.1)
            rows.append({"path": str(p.resolve()), "p_normal": normal, "p_covid": 1 - normal, "repeat": repeat, "fold": 0})
    pl.DataFrame(rows).write_parquet(tmp_path / "oof.parquet")
    assert main(["--config", str(cfg), "--out", str(out), "--probabilities", str(tmp_path / "oof.parquet")]) == 0
    assert pl.read_parquet(out / LABEL_ISSUES)["relpath"].to_list()[:1] == ["covid/covid_3.png"]
    assert f"judged on {len(paths) - 2} of" in capsys.readouterr().out


def test_a_fit_config_with_dotted_overrides_audits_another_folder(folder, tmp_path, capsys):
    """`cli.py audit` takes `fit`'s vocabulary: the demo config, pointed at a user's folder from the command line."""
    from tests.conftest import REPO, cli_in_process

    out = tmp_path / "report"
    assert cli_in_process("audit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.source", str(folder),
                          "--data.classes", "[normal,covid]", "--data.image_size", "16", "--data.num_workers", "0",
                          f"--data.artifacts_dir={tmp_path / 'a'}", "--out", str(out), "--limit", "5") == 0
    assert pl.read_parquet(out / CLUSTERS).height == 3
    assert "[audit] label conflicts 1" in capsys.readouterr().out


def test_an_unknown_or_hyphenated_option_is_refused_naming_it(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(_config(tmp_path, folder)), "--label-issues"])
    assert stop.value.code == 2
    assert "--label-issues" in capsys.readouterr().err


def test_console_names_the_files_of_every_conflict_cluster(folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--config", str(_config(tmp_path, folder)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[audit] label conflict c" in printed
    assert "covid/copy_of_normal_0.png (covid), normal/normal_0.png (normal)" in printed


def test_cluster_lines_name_the_first_20_then_count_and_point_to_the_report():
    from datamodules.duplicate_audit import cluster_lines

    rows = [{"cluster_id": f"c{k}", "files": [f"a/{k}.png", f"b/{k}.png"], "labels": ["a", "b"],
             "split_of": ["train", "test"], "label_conflict": True, "leakage": k % 2 == 0} for k in range(25)]
    clusters = pl.DataFrame(rows)
    lines = cluster_lines(clusters, "out/audit.html")
    assert len(lines) == 21 and lines[0] == "[audit] label conflict c0: a/0.png (a), b/0.png (b)"
    assert lines[-1] == "[audit] ... and 5 more label conflict cluster(s), all in out/audit.html"
    assert not any("leakage" in line for line in lines)  # a computed split groups clusters: no leakage to name
    with_leaks = cluster_lines(clusters, "out/audit.html", manifest_split=True)
    assert "[audit] leakage c0: a/0.png (train), b/0.png (test)" in with_leaks
    assert with_leaks[-1] == "[audit] leakage c24: a/24.png (train), b/24.png (test)"  # 13 leaks: all named


def test_a_runs_saved_config_is_accepted(folder, tmp_path):
    """The run and sweep reports say `cli.py audit --config <run>/config.yaml`; fit saves `ckpt_path` in it."""
    cfg = _config(tmp_path, folder)
    cfg.write_text(cfg.read_text() + "ckpt_path: null\nseed_everything: 3\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "report")]) == 0
    assert pl.read_parquet(tmp_path / "report" / CLUSTERS).height == 3
