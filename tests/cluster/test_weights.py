"""Pretrained weights resolved on the login node: every missing candidate named, with how to fetch it."""

from __future__ import annotations

import pytest

from cluster.weights import missing_weights, require_weights
from errors import ConfigError
from lightning_modules.networks import factory
from lightning_modules.networks.factory import NetworkConfig


def test_candidates_without_weights_are_each_named(tmp_path, monkeypatch):
    monkeypatch.setattr(factory, "cached_weights", lambda name: str(tmp_path / "w") if name == "resnet18" else None)
    monkeypatch.setattr(factory, "hub_reachable", lambda: False)
    present = tmp_path / "mine.safetensors"
    present.write_bytes(b"x")
    candidates = {
        "scratch": NetworkConfig(name="resnet10t"),
        "cached": NetworkConfig(name="resnet18", pretrained=True),
        "local": NetworkConfig(name="resnet50", pretrained_path=str(present)),
        "gone": NetworkConfig(name="resnet50", pretrained_path=str(tmp_path / "nope.pth")),
        "uncached": NetworkConfig(name="densenet121", pretrained=True),
        "ctnet": NetworkConfig(name="ctnet10", pretrained=True),
        "attention": NetworkConfig(name="attention_vgg16", pretrained=True),
    }
    missing = missing_weights(candidates)
    assert [line.split(":")[0] for line in missing] == ["gone", "uncached", "ctnet", "attention"]
    assert "timm.create_model('densenet121', pretrained=True)" in missing[1]
    assert "'vgg16'" in missing[3]  # attention_vgg16 loads vgg16's weights
    with pytest.raises(ConfigError, match="compute nodes without internet"):
        require_weights(candidates)


def test_reachable_hub_fills_the_cache_before_submission(monkeypatch):
    fetched = []
    monkeypatch.setattr(factory, "cached_weights", lambda name: "/cache/w" if name in fetched else None)
    monkeypatch.setattr(factory, "hub_reachable", lambda: True)
    monkeypatch.setattr("timm.create_model", lambda name, **kw: fetched.append(name))
    assert missing_weights({"a": NetworkConfig(name="resnet18", pretrained=True)}) == []
    assert fetched == ["resnet18"]
    assert missing_weights({"b": NetworkConfig(name="resnet34", pretrained=True)}, download=False)
