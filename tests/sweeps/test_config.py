"""The sweep vocabulary: aliases, dotted and nested fit keys compose one trial config; the base YAML is read once."""

from __future__ import annotations

import pytest

from errors import ConfigError
from sweeps import trials
from sweeps.config import STUDY002_DEFAULTS, Stage1, Stage2, SweepConfig, fit_overrides
from tests.conftest import REPO
from tests.sweeps.fakes import tiny_sweep


def test_aliases_dotted_and_nested_keys_mean_the_same_fit_keys():
    by_alias = fit_overrides({"lr": 1e-4, "optimizer": "adam", "image_size": 64, "max_epochs": 3, "network": "vgg16"}, "x")
    dotted = fit_overrides({"model.optimizer": "adam", "model.optimizer.init_args.lr": 1e-4, "data.image_size": 64,
                            "trainer.max_epochs": 3, "model.network.name": "vgg16"}, "x")
    nested = fit_overrides({"model": {"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-4}},
                                      "network": {"name": "vgg16"}},
                            "data": {"image_size": 64}, "trainer": {"max_epochs": 3}}, "x")
    assert by_alias == dotted
    assert by_alias["model"]["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-4}}
    assert nested == by_alias
    with pytest.raises(ConfigError, match=r"stage1.candidates\[2\]: unknown key 'image_sise'.*alias"):
        fit_overrides({"image_sise": 64}, "stage1.candidates[2]")


def test_trial_configs_layer_base_defaults_candidate_and_grid_point(tmp_path, monkeypatch):
    reads = []
    original = trials.load_yaml
    monkeypatch.setattr(trials, "load_yaml", lambda path: reads.append(path) or original(path))
    sweep = tiny_sweep(tmp_path, stage1=Stage1(
        candidates=[{"network": "resnet10t"}, {"network": "ctnet10", "data.image_size": 48, "label": "ct",
                                               "overrides": {"model": {"loss_kwargs": {"alpha": 2}}}}],
        defaults={"optimizer": "adam", "lr": 5e-4, "batch_size": 8, "max_epochs": 2, "image_size": 32}),
        stage2=Stage2(optimizers=["rmsprop"], losses=["mse"], overrides={"lr": 1e-5}))
    configs = trials.TrialConfigs(sweep)
    first, second = configs.candidate("resnet10t"), configs.candidate("ct")
    assert first["data"]["image_size"] == 32 and second["data"]["image_size"] == 48
    assert first["data"]["num_workers"] == 0 and first["data"]["batch_size"] == 8  # sweep overrides + defaults
    assert first["model"]["optimizer"]["init_args"]["lr"] == 5e-4 and first["trainer"]["max_epochs"] == 2
    assert second["model"]["network"]["name"] == "ctnet10" and second["model"]["loss_kwargs"] == {"alpha": 2}
    assert first["model"]["network"]["dropout"] == 0.2  # head settings of the base config are kept
    point = configs.stage2("ct", "rmsprop", "mse")
    assert point["model"]["optimizer"]["class_path"] == "torch.optim.RMSprop"
    assert point["model"]["optimizer"]["init_args"]["lr"] == 1e-5 and point["model"]["loss"] == "mse"
    assert point["data"]["image_size"] == 48
    assert len(reads) == 1  # the base YAML is read once per sweep


def test_study002_defaults_are_the_default():
    assert Stage1().defaults == STUDY002_DEFAULTS
    assert fit_overrides(STUDY002_DEFAULTS, "d")["trainer"]["max_epochs"] == 15


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("sweep_*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_sweep_config_composes_its_trial_configs(path):
    sweep = SweepConfig.from_args(["--config", str(path)])
    assert sweep.problems() == []
    configs = trials.TrialConfigs(sweep)
    for name in configs.candidates:
        cfg = configs.candidate(name)
        assert cfg["model"]["network"]["name"] and cfg["model"]["optimizer"]["class_path"].startswith("torch.optim.")
    point = configs.stage2(name, sweep.stage2.optimizers[-1], sweep.stage2.losses[-1])
    assert point["model"]["loss"] == sweep.stage2.losses[-1]
    lr = fit_overrides(sweep.stage2.overrides, "stage2.overrides").get("model", {}).get("optimizer", {}).get("init_args", {}).get("lr")
    if lr is not None:  # the studies' stage-2 learning rate reaches every optimizer
        assert point["model"]["optimizer"]["init_args"]["lr"] == lr


def test_a_section_given_as_a_plain_value_is_one_clear_error(tmp_path, capsys):
    """`cv: 3` instead of `cv: {folds: 3}`: an `error:` line naming the mapping form, exit code 2."""
    from tests.conftest import cli_in_process

    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nbase_config: {REPO / 'configs' / 'demo.yaml'}\nroot: {tmp_path}\ncv: 3\n"
                    "stage1: {candidates: [{network: resnet10t}]}\n")
    assert cli_in_process("sweep", "--config", str(path)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "cv: {folds: 5}" in err and "Traceback" not in err
