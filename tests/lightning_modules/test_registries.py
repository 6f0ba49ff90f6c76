"""Every registered network, loss and optimizer builds and trains one step; study backbones too."""

from __future__ import annotations

import math

import pytest
import torch

from errors import ConfigError
from lightning_modules import ImageClassifier, NetworkConfig
from lightning_modules.losses import LOSSES
from lightning_modules.networks import CUSTOM_NETWORKS, build_network
from lightning_modules.optimizers import (
    OPTIMIZERS,
    SCHEDULERS,
    build_optimizer,
    build_scheduler,
    optimizer_config,
)

# The backbones the four studies compared, as timm names (small variants where a family has several). The
# large ones build and step in the slow suite; the default suite keeps one of each study-000 family.
_slow = pytest.mark.slow
STUDY_BACKBONES = [
    ("tf_efficientnetv2_b0", 64),  # study 000 EfficientNetV2
    ("resnest14d", 64),  # study 000 ResNeSt
    ("mobilenetv4_conv_small", 64),  # study 000 MobileNetV4
    pytest.param("vgg16", 64, marks=_slow),  # studies 001, 003
    pytest.param("vgg19", 64, marks=_slow),  # study 001
    pytest.param("densenet121", 64, marks=_slow),  # studies 001, 002
    pytest.param("resnet50", 64, marks=_slow),  # studies 001, 002
    pytest.param("inception_v3", 96, marks=_slow),  # studies 001, 002 (needs >= 75 px)
    pytest.param("xception41", 64, marks=_slow),  # study 002
]


def one_step(module: ImageClassifier, size: int, batch: int = 4) -> tuple[torch.Tensor, float]:
    """One optimizer step on a random uint8 batch; returns the logits and how much the weights moved."""
    torch.manual_seed(0)
    images = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8)
    target = torch.arange(batch) % len(module.classes)
    optimizer = module.optimizer([p for p in module.parameters() if p.requires_grad])
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    module.train()
    loss, probs, _ = module._step((images, target))
    assert torch.isfinite(loss), loss
    loss.backward()
    optimizer.step()
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(
        [p for p in module.parameters() if p.requires_grad], before, strict=True))
    assert probs.shape == (batch, len(module.classes))
    torch.testing.assert_close(probs.sum(1), torch.ones(batch))
    return probs, moved


def make(name="resnet10t", size=64, classes=("a", "b", "c"), loss="ce", optimizer=torch.optim.Adam, **net):
    return ImageClassifier(NetworkConfig(name=name, **net), loss=loss, optimizer=optimizer, classes=list(classes), image_size=size)


@pytest.mark.parametrize("name", CUSTOM_NETWORKS.available())
def test_custom_networks_train_one_step(name):
    size = 128 if name == "ctnet10" else 64
    _, moved = one_step(make(name, size), size)
    assert moved > 0


@pytest.mark.parametrize("name, size", STUDY_BACKBONES)
def test_study_backbones_train_one_step(name, size):
    module = make(name, size, pool="flatten", dropout=0.5)  # study 002's head
    _, moved = one_step(module, size, batch=2)
    assert moved > 0


def test_ctnet10_matches_the_paper_shapes():
    net = build_network(NetworkConfig(name="ctnet10"), 1, (128, 128))
    feats = net.backbone.forward_features(torch.zeros(1, 3, 128, 128))
    assert feats.shape == (1, 32, 29, 29)  # Fig. 2: 29x29x32, flattened to 26912
    assert [m.out_features for m in net.head if isinstance(m, torch.nn.Linear)] == [256, 1]
    assert [m.p for m in net.head if isinstance(m, torch.nn.Dropout)] == [0.3]


def test_attention_vgg16_exposes_its_attention_map():
    net = build_network(NetworkConfig(name="attention_vgg16"), 2, (128, 128))
    net(torch.randn(2, 3, 128, 128))
    alpha = net.backbone.last_attention
    assert alpha.shape == (2, 1, 16, 16) and float(alpha.min()) >= 0 and float(alpha.max()) <= 1


def test_heads_follow_the_studies():
    with torch.device("meta"):  # shapes only: study 001's 25088x4096 head would cost ~0.5 GB and seconds to build
        vgg19 = build_network(NetworkConfig(name="vgg19", pool="flatten", hidden=[4096, 4096], dropout=0.3), 1, (224, 224))
    linears = [m for m in vgg19.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 1)]
    assert not hasattr(vgg19.backbone.pre_logits, "fc1")  # timm's unused classifier layers are dropped


@pytest.mark.parametrize("loss", LOSSES.available())
def test_every_loss_trains_one_step(loss):
    classes = ("neg", "pos") if loss == "bce" else ("a", "b", "c")
    _, moved = one_step(make(loss=loss, classes=classes), 64)
    assert moved > 0


@pytest.mark.parametrize("name", OPTIMIZERS.available())
def test_every_optimizer_trains_one_step(name):
    preset = OPTIMIZERS.get(name)
    _, moved = one_step(make(optimizer=lambda params: build_optimizer(name, params)), 64)
    assert moved > 0
    assert optimizer_config(name, lr=0.5)["init_args"]["lr"] == 0.5 and preset.resolve().__module__.startswith("torch.optim")


@pytest.mark.parametrize("name", SCHEDULERS.available())
def test_every_scheduler_lowers_the_learning_rate_as_its_preset_says(name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(name, opt)
    lrs = []
    for _ in range(12):  # a plateau: the monitored value never improves
        opt.step()
        sched.step(1.0) if name == "plateau" else sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    if name == "plateau":  # patience 3, factor 0.1: cut after 4 and again after 8 steps without improvement
        assert lrs[3] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.01) and lrs[8] == pytest.approx(0.001)
    elif name == "cosine":  # T_max 15
        assert lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 12 / 15)))
    else:  # step_size 10, gamma 0.1
        assert lrs[8] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.01)


def test_loss_values_match_their_definitions():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    p = logits.softmax(1)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    from lightning_modules.losses import build_loss

    torch.testing.assert_close(build_loss("mse", 2)(logits, target), ((p - y) ** 2).mean())
    torch.testing.assert_close(build_loss("mae", 2)(logits, target), (p - y).abs().mean())
    lc = torch.log(torch.cosh(p - y)).mean()
    torch.testing.assert_close(build_loss("logcosh", 2)(logits, target), lc)
    ce = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(build_loss("focal", 2, gamma=0.0)(logits, target), ce)
    bce = build_loss("bce", 2)
    torch.testing.assert_close(bce(torch.tensor([[0.3], [-1.0]]), torch.tensor([1, 0])),
                               torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.0])))


def test_class_weights_reweight_samples():
    from lightning_modules.losses import build_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    weighted = build_loss("ce", 2, class_weights=[1.0, 3.0])(logits, target)
    torch.testing.assert_close(weighted, torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor([1.0, 3.0])))
    mse = build_loss("mse", 2, class_weights=[1.0, 3.0])
    per = ((logits.softmax(1) - torch.eye(2)) ** 2).mean(1)
    torch.testing.assert_close(mse(logits, target), (per[0] * 1 + per[1] * 3) / 4)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="unknown loss 'cee'. Did you mean 'ce'"):
        make(loss="cee")
    with pytest.raises(ConfigError, match="unknown network 'ctnet'.*ctnet10"):
        make(name="ctnet")
    with pytest.raises(ConfigError, match="'bce' needs exactly 2 classes"):
        make(loss="bce")
    with pytest.raises(ConfigError, match="unknown optimizer"):
        optimizer_config("adamm")


def test_freeze_backbone_keeps_batchnorm_trainable():
    module = make(freeze_backbone=True)
    bn = [m for m in module.net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in module.net.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert bn and all(p.requires_grad for m in bn for p in m.parameters())
    assert all(not p.requires_grad for m in convs for p in m.parameters())
    assert all(p.requires_grad for p in module.net.head.parameters())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_path_loads_local_weights(tmp_path, suffix):
    import timm

    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    module = make(pretrained=True, pretrained_path=str(path))
    torch.testing.assert_close(module.net.backbone.conv1[0].weight, source.conv1[0].weight)


def test_unreachable_hub_says_to_use_pretrained_path(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(ConfigError, match="pretrained_path") as err:
        make(pretrained=True)
    assert "pretrained: false" in str(err.value)


def test_grayscale_input_uses_one_channel():
    module = ImageClassifier(NetworkConfig(name="resnet10t"), classes=["a", "b"], image_size=32, in_chans=1)
    x = module.net.normalize(torch.zeros(2, 32, 32, 1, dtype=torch.uint8))
    assert module(x).shape == (2, 2)


def test_ce_logcosh_is_study_003_equation_5_by_hand():
    # Study 003, eq. 3-5: L = alpha * (-sum_i y_i log p_i) + beta * sum_i log(cosh(p_i - y_i)), summed over
    # the classes i (not averaged), then averaged over the batch. Three classes, one sample, by hand:
    # logits (1, 0, -1) -> p = e^(1,0,-1) / (e + 1 + 1/e); target class 1.
    from lightning_modules.losses import build_loss

    z = math.exp(1) + 1 + math.exp(-1)
    p = [math.exp(1) / z, 1 / z, math.exp(-1) / z]
    y = [0.0, 1.0, 0.0]
    ce = -math.log(p[1])
    lch = sum(math.log(math.cosh(pi - yi)) for pi, yi in zip(p, y, strict=True))
    expected = 0.3 * ce + 0.7 * lch
    got = build_loss("ce_logcosh", 3, alpha=0.3, beta=0.7)(torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([1]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # The averaged variant (beta effectively / 3) is measurably different, so this test pins the sum.
    assert abs(got.item() - (0.3 * ce + 0.7 * lch / 3)) > 0.05
