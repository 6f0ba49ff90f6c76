"""Pretrained weights resolved on the login node, so compute nodes without internet never ask the hub.

Each candidate that wants weights must find them before anything is submitted: a `pretrained_path` file that
exists, or timm's weights in the Hugging Face cache (set `HF_HOME` to shared storage so the jobs see the same
cache). Where the login node reaches the hub, missing weights are downloaded into that cache now; otherwise one
error lists every missing candidate and how to fetch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from errors import ConfigError

if TYPE_CHECKING:
    from lightning_modules.networks.factory import NetworkConfig

# Custom networks whose pretrained weights are a timm model's (see the factory's builders).
_WEIGHTS_OF = {"attention_vgg16": "vgg16"}


def missing_weights(candidates: dict[str, NetworkConfig], download: bool = True) -> list[str]:
    """One line per candidate whose weights the jobs would not find; [] when all are there.

    Args:
        candidates: label (e.g. the grid point) -> its network config.
        download: fetch what is missing into the local cache when the hub is reachable from here.
    """
    # Imported here: timm brings torch, which a login node needs only when some candidate wants weights.
    from lightning_modules.networks.factory import CUSTOM_NETWORKS, cached_weights, hub_reachable

    missing, reachable = [], None
    for label, cfg in candidates.items():
        if cfg.pretrained_path:
            if not Path(cfg.pretrained_path).expanduser().is_file():
                missing.append(f"{label}: model.network.pretrained_path '{cfg.pretrained_path}' does not exist")
            continue
        if not cfg.pretrained:
            continue
        name = _WEIGHTS_OF.get(cfg.name, cfg.name)
        if name in CUSTOM_NETWORKS:
            missing.append(f"{label}: '{cfg.name}' has no published weights; set model.network.pretrained: false")
            continue
        if cached_weights(name) is not None:
            continue
        reachable = hub_reachable() if reachable is None else reachable
        if download and reachable and _download(name):
            continue
        missing.append(f"{label}: weights of '{name}' are not in the Hugging Face cache "
                       f"({_cache_dir()}); fetch them where there is internet with "
                       f"`HF_HOME={_hf_home()} python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`"
                       " or set model.network.pretrained_path")
    return missing


def require_weights(candidates: dict[str, NetworkConfig], download: bool = True) -> None:
    """Raise one ConfigError listing every candidate whose weights the compute nodes would not find."""
    missing = missing_weights(candidates, download)
    if missing:
        raise ConfigError("pretrained weights missing for compute nodes without internet:\n  "
                          + "\n  ".join(missing))


def _download(name: str) -> bool:
    import timm

    from lightning_modules.networks.factory import cached_weights

    try:
        timm.create_model(name, pretrained=True, num_classes=0)
    except Exception:  # the reason is reported as "missing" with the fix; the hub's own error adds nothing
        return False
    return cached_weights(name) is not None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hf_home() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HOME)
