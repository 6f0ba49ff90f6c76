"""Build a classification network from config: a backbone (any timm model or a registered custom net),
a pooling step and a head as the studies used them.

Example:
    >>> net = build_network(NetworkConfig(name="resnet18"), num_outputs=4, image_size=(64, 64))
    >>> net(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import timm
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from errors import ConfigError
from lightning_modules.networks.custom import AttentionVGG16, CTNet10
from lightning_modules.registry import Registry, unknown_name_message

Pool = Literal["default", "avg", "max", "flatten"]


@dataclass
class NetworkConfig:
    """What network to build.

    Attributes:
        name: a timm model name (`timm.list_models()`, e.g. "tf_efficientnetv2_s", "resnest50d",
            "mobilenetv4_conv_small", "xception41", "vgg19") or a custom net ("ctnet10", "attention_vgg16").
        pretrained: load ImageNet weights from timm's usual source (the Hugging Face hub).
        pretrained_path: load weights from this local .pth/.safetensors file instead (offline machines).
        pool: how backbone features become a vector: "default" (the backbone's own pooling), "avg", "max",
            or "flatten" (study 002). None: the network's default.
        hidden: sizes of hidden dense layers in the head, e.g. [4096, 4096] (study 001 VGG-19) or [10]
            (study 003). None: the network's default.
        dropout: dropout before each dense layer of the head. None: the network's default.
        freeze_backbone: train only the head (BatchNorm layers stay trainable when train_bn, study 002).
        train_bn: keep BatchNorm layers trainable when the backbone is frozen.
        kwargs: extra arguments for `timm.create_model` (e.g. drop_path_rate).
    """

    name: str = "resnet18"
    pretrained: bool = False
    pretrained_path: str | None = None
    pool: Pool | None = None
    hidden: list[int] | None = None
    dropout: float | None = None
    freeze_backbone: bool = False
    train_bn: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CustomNet:
    """A registered non-timm backbone with the head its paper used.

    `build(cfg, in_chans)` returns a module with `forward_features`, with the weights `cfg` asks for
    (`pretrained` / `pretrained_path`) already loaded, or raises ConfigError when it has none to offer.
    """

    build: Callable[[NetworkConfig, int], nn.Module]
    pool: Pool
    hidden: tuple[int, ...]
    dropout: float
    description: str


def _build_ctnet10(cfg: NetworkConfig, in_chans: int) -> nn.Module:
    if cfg.pretrained and not cfg.pretrained_path:
        raise ConfigError("model.network: ctnet10 has no published weights; set pretrained: false "
                          "(or pretrained_path to weights you trained).")
    net = CTNet10(in_chans)
    if cfg.pretrained_path:
        _load_local_state(net, cfg.pretrained_path)
    return net


def _build_attention_vgg16(cfg: NetworkConfig, in_chans: int) -> nn.Module:
    """VGG16 with the attention gate; ImageNet (or local) VGG16 weights go into its convolutional blocks."""
    net = AttentionVGG16(in_chans)
    if cfg.pretrained or cfg.pretrained_path:
        vgg = _create_timm(NetworkConfig(name="vgg16", pretrained=cfg.pretrained, pretrained_path=cfg.pretrained_path),
                           in_chans)
        net.to_block4.load_state_dict(vgg.features[:23].state_dict())
        net.to_block5_pool.load_state_dict(vgg.features[23:].state_dict())
    return net


CUSTOM_NETWORKS: Registry[CustomNet] = Registry("network", "model.network.name")
CUSTOM_NETWORKS.add("ctnet10", CustomNet(
    _build_ctnet10, "flatten", (256,), 0.3,
    "CTnet-10 of study 001: 2 conv blocks, dense 256, dropout 0.3 (128x128 input)",
))
CUSTOM_NETWORKS.add("attention_vgg16", CustomNet(
    _build_attention_vgg16, "default", (10,), 0.5,
    "VGG16 with a soft attention gate on layer 13 gated by layer 18 (study 003), head of 10 units",
))


def available() -> list[str]:
    """Custom network names; every name in `timm.list_models()` is also accepted."""
    return CUSTOM_NETWORKS.available()


class Network(nn.Module):
    """backbone -> pooled features (B, F) -> head -> logits (B, num_outputs).

    `forward` takes normalised float images (B, C, H, W), so tools such as Grad-CAM can call it directly.
    """

    def __init__(self, backbone: nn.Module, pool: Pool, head: nn.Module, mean, std, is_timm: bool):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = head
        self.is_timm = is_timm
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)  # (B, C, h, w) for CNNs, (B, N, C) for token models
        if self.pool == "default":
            return self.backbone.forward_head(f, pre_logits=True) if self.is_timm else f.flatten(1)
        if self.pool == "flatten" or f.ndim == 2:
            return f.flatten(1)
        dims = (2, 3) if f.ndim == 4 else (1,)
        return f.mean(dims) if self.pool == "avg" else f.amax(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) batch -> normalised float (B, C, H, W) in the backbone's convention."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)  # channels-last strides, NCHW shape
        return (x - self.mean) / self.std


def _mlp_head(in_features: int, hidden: list[int], dropout: float, out: int) -> nn.Sequential:
    """[Linear, ReLU, Dropout] per hidden size, then the output Linear; dropout precedes every dense layer
    after the features (study 002: flatten -> dropout 0.5 -> dense; study 001: FC-4096 + dropout 0.3, x2)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    if not hidden and dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_weights(name: str) -> str | None:
    """The hub weights of timm's `name` already in the local Hugging Face cache, if any.

    Looked up here rather than by switching huggingface_hub to offline mode: that is process-wide state, and
    an unreachable hub would otherwise cost a minute of retries.
    """
    from huggingface_hub import try_to_load_from_cache

    hub_id = (timm.models.get_pretrained_cfg(name) or timm.models.PretrainedCfg()).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(found, str):
            return found
    return None


def _create_timm(cfg: NetworkConfig, in_chans: int) -> nn.Module:
    kwargs = dict(num_classes=0, in_chans=in_chans, **cfg.kwargs)
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.network.pretrained_path: '{path}' does not exist.")
        try:
            # timm loads local files with torch.load(weights_only=True) or safetensors, and drops the
            # ImageNet classifier for us.
            return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except Exception as e:
            raise ConfigError(
                f"model.network.pretrained_path: cannot load '{path}' into '{cfg.name}': {e}. The file must be a "
                f"state dict (.pth/.bin/.safetensors) saved from timm's '{cfg.name}'."
            ) from None
    if not cfg.pretrained:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if hub_reachable():
        try:
            return timm.create_model(cfg.name, pretrained=True, **kwargs)
        except Exception as e:
            raise _no_weights(cfg.name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    cached = cached_weights(cfg.name)
    if cached is None:  # fail at once: asking an unreachable hub costs a minute of retries
        raise _no_weights(cfg.name, "the Hugging Face hub is unreachable from this machine and the weights are "
                                    "not in its local cache")
    return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)


def _no_weights(name: str, reason: str) -> ConfigError:
    hub_id = (timm.models.get_pretrained_cfg(name) or timm.models.PretrainedCfg()).hf_hub_id or f"timm/{name}"
    return ConfigError(
        f"model.network: could not get pretrained weights for '{name}' ({reason}). Download them where there is "
        f"internet (https://huggingface.co/{hub_id}, file model.safetensors), copy the file here and set "
        "model.network.pretrained_path: /path/to/model.safetensors — or set model.network.pretrained: false to "
        "train from scratch."
    )


def _prune_unused_children(model: nn.Module, probe: torch.Tensor) -> None:
    """Replace top-level children that `forward_features` never calls (timm's classifier-side layers, e.g.
    VGG's 4096-wide pre_logits) with Identity: they would waste memory and break DDP's gradient check."""
    called: set[str] = set()
    hooks = [
        child.register_forward_hook(lambda m, i, o, name=name: called.add(name))
        for name, child in model.named_children()
    ]
    with torch.no_grad():
        model.forward_features(probe)
    for h in hooks:
        h.remove()
    for name, child in list(model.named_children()):
        if name not in called and any(True for _ in child.parameters()):
            setattr(model, name, nn.Identity())


def build_network(
    cfg: NetworkConfig, num_outputs: int, image_size: tuple[int, int], in_chans: int = 3
) -> Network:
    """Build the network described by `cfg`.

    Args:
        cfg: the network config.
        num_outputs: logits to produce (classes, or 1 for a binary-logit loss).
        image_size: (height, width) of the input, used to size flattened heads.
        in_chans: input channels (3, or 1 for grayscale data).

    Raises:
        ConfigError: unknown network name or unloadable weights, with what to do about it.
    """
    if cfg.name in CUSTOM_NETWORKS:
        spec = CUSTOM_NETWORKS.get(cfg.name)
        backbone = spec.build(cfg, in_chans)
        pool, hidden, dropout, is_timm = spec.pool, list(spec.hidden), spec.dropout, False
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    elif timm.is_model(cfg.name):
        backbone = _create_timm(cfg, in_chans)
        pool, hidden, dropout, is_timm = "default", [], 0.0, True
        mean = backbone.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)
        std = backbone.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)
    else:
        raise ConfigError(unknown_name_message(
            "network", "model.network.name", cfg.name, CUSTOM_NETWORKS.available(),
            extra=f", or any of timm's {len(timm.list_models())} models (python -c \"import timm; "
                  f"print(timm.list_models('*{cfg.name[:6]}*'))\")",
        ))
    pool = cfg.pool or pool
    hidden = list(cfg.hidden) if cfg.hidden is not None else hidden
    dropout = cfg.dropout if cfg.dropout is not None else dropout
    if in_chans == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    probe = torch.zeros(1, in_chans, *image_size)
    was_training = backbone.training
    backbone.eval()
    if is_timm and pool != "default":
        _prune_unused_children(backbone, probe)
    net = Network(backbone, pool, nn.Identity(), mean, std, is_timm)
    try:
        with torch.no_grad():
            width = net.features(probe).shape[1]
    except RuntimeError as e:
        raise ConfigError(f"model.network '{cfg.name}' cannot take {image_size[0]}x{image_size[1]} inputs "
                          f"({str(e).splitlines()[0][:160]}); increase data.image_size.") from None
    backbone.train(was_training)
    net.head = _mlp_head(width, hidden, dropout, num_outputs)
    if cfg.freeze_backbone:
        BaseFinetuning.freeze(backbone, train_bn=cfg.train_bn)
    return net


def _load_local_state(module: nn.Module, path: str) -> None:
    """Load a state dict file into a custom backbone with safe loading (weights_only / safetensors)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"model.network.pretrained_path: '{p}' does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"model.network.pretrained_path: '{p}' lacks {len(missing)} weights, e.g. {missing[:3]}")
    if unexpected and os.environ.get("MEDSEL_DEBUG"):
        print(f"[network] ignored {len(unexpected)} extra weights from {p}")
