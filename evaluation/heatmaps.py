"""Where does the model look? Grad-CAM / Grad-CAM++ (the `grad-cam` package) and the attention gate's own map.

Lightning evaluates under `torch.inference_mode()`, where no gradient can be taken; heat maps are computed
inside `torch.inference_mode(False)` + `torch.enable_grad()`, on an input that requires grad so that
frozen backbones still produce activation gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from torch import nn

from lightning_modules.networks import Network

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


class HeatmapUnavailable(RuntimeError):
    """The network has no convolutional feature map to explain (e.g. a pure transformer)."""


def target_layer(net: Network, image_size: tuple[int, int]) -> nn.Module:
    """The layer whose activations Grad-CAM weights: a custom net's `gradcam_layer`, else the module of the
    backbone that finishes last in `forward_features` with a spatial (B, C, h, w) output."""
    chosen = getattr(net.backbone, "gradcam_layer", None)
    if chosen is not None:
        return chosen
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod) if isinstance(o, torch.Tensor) and o.ndim == 4
                                     and o.shape[-1] > 1 and o.shape[-2] > 1 else None)
             for m in net.backbone.modules() if m is not net.backbone]
    was = net.training
    net.eval()
    with torch.no_grad():
        net.backbone.forward_features(torch.zeros(1, net.mean.shape[1], *image_size, device=net.mean.device))
    net.train(was)
    for h in hooks:
        h.remove()
    if not order:
        raise HeatmapUnavailable("the backbone has no spatial feature map for Grad-CAM")
    return order[-1]


class _Logit:
    """Grad-CAM target: the logit of class `c` (for a one-logit sigmoid head, +logit or -logit)."""

    def __init__(self, c: int, single_logit: bool):
        self.c, self.single = c, single_logit

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if self.single:
            return output[..., 0] if self.c == 1 else -output[..., 0]
        return output[..., self.c]


def heatmaps(
    net: Network, images: torch.Tensor, classes: Sequence[int], method: str = "gradcam",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Heat maps for a batch.

    Args:
        net: the trained network (its `normalize` turns uint8 images into inputs).
        images: (B, H, W, C) uint8 images as the model sees them.
        classes: the class to explain for each image (usually the predicted one).
        method: "gradcam" or "gradcam++".

    Returns:
        (cams, attention): (B, H, W) maps in [0, 1]; the attention gate's coefficients upsampled to
        (B, H, W) for attention networks, else None.
    """
    if method not in METHODS:
        raise ValueError(f"heat map method must be one of {sorted(METHODS)}, got {method!r}")
    device = net.mean.device
    size = tuple(images.shape[1:3])
    layer = target_layer(net, size)
    single = net.head[-1].out_features == 1
    was = net.training
    net.eval()
    with torch.inference_mode(False), torch.enable_grad():
        x = net.normalize(images.clone().to(device)).contiguous().requires_grad_(True)
        with METHODS[method](model=net, target_layers=[layer]) as cam:
            maps = cam(input_tensor=x, targets=[_Logit(int(c), single) for c in classes])  # (B, H, W)
        attention = None
        alpha = getattr(net.backbone, "last_attention", None)
        if alpha is not None:
            with torch.no_grad():
                net(x.detach())
                alpha = net.backbone.last_attention
            attention = F.interpolate(alpha.float(), size=size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
    net.train(was)
    return np.nan_to_num(maps.astype(np.float32)), attention


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, C) uint8 image with a (H, W) [0, 1] map as a jet colour overlay, (H, W, 3) uint8."""
    import matplotlib

    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    colored = (matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.float32)
    return np.clip((1 - alpha) * rgb.astype(np.float32) + alpha * colored, 0, 255).astype(np.uint8)
