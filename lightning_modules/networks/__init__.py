"""Network registry: any timm backbone by name, plus the studies' custom nets, each with a configurable head."""

from lightning_modules.networks.factory import (
    CUSTOM_NETWORKS,
    Network,
    NetworkConfig,
    available,
    build_network,
)

__all__ = ["CUSTOM_NETWORKS", "Network", "NetworkConfig", "available", "build_network"]
