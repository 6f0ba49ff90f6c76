"""The studies' own networks, as backbones with `forward_features` like timm models.

- CTnet-10 (study 001, Fig. 2): two blocks of two 3x3 convolutions (32 filters) and a max-pool; the
  paper's head (flatten, dense 256, dropout 0.3, one output) is its default head.
- Attention-gated VGG16 (study 003, eq. 1-2): soft attention gate on VGG16's layer 13 (block4_conv3),
  gated by layer 18 (block5_pool); attention-weighted features and the gating features feed the head.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


class CTNet10(nn.Module):
    """CTnet-10 feature extractor: 128x128x3 -> 29x29x32 as in the paper (any input size works)."""

    def __init__(self, in_chans: int = 3, width: int = 32):
        super().__init__()

        def conv(cin: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, width, 3), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_chans), *conv(width), nn.MaxPool2d(2),  # (B, 32, 62, 62) at 128
            *conv(width), *conv(width), nn.MaxPool2d(2),  # (B, 32, 29, 29) at 128
        )
        self.num_features = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class AttentionGate(nn.Module):
    """Additive soft attention gate (Schlemper et al. 2019; study 003 eq. 1-2).

    q = psi^T relu(W_x^T x + W_g^T g + b_g) + b_psi ;  alpha = sigmoid(q) ;  x_hat = alpha * x

    The gating signal g comes from a coarser scale and is upsampled bilinearly to x's grid (study 003 Fig. 3).
    """

    def __init__(self, x_channels: int, g_channels: int, inter_channels: int):
        super().__init__()
        self.w_x = nn.Conv2d(x_channels, inter_channels, 1, bias=False)
        self.w_g = nn.Conv2d(g_channels, inter_channels, 1, bias=True)  # its bias is b_g
        self.psi = nn.Conv2d(inter_channels, 1, 1, bias=True)  # its bias is b_psi

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_up = F.interpolate(self.w_g(g), size=x.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.w_x(x) + g_up)))  # (B, 1, Hx, Wx)
        return alpha * x, alpha


class AttentionVGG16(nn.Module):
    """VGG16 (timm weights) with one soft attention gate; outputs a (B, 1024) feature vector.

    Attributes:
        last_attention: the attention coefficients of the last forward pass, (B, 1, H/8, W/8), for heat maps.
    """

    def __init__(self, in_chans: int = 3, inter_channels: int = 256):
        super().__init__()
        # Built on the meta device: VGG's 102M-parameter classifier is never materialised. Pretrained weights
        # are copied in by the network factory.
        with torch.device("meta"):
            vgg = timm.create_model("vgg16", pretrained=False, num_classes=0, in_chans=in_chans)
        features = vgg.features.to_empty(device="cpu")
        for m in features.modules():
            if isinstance(m, nn.Conv2d):  # timm's VGG init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # timm's vgg16.features: indices 0-22 end with block4_conv3 + ReLU (Keras layer 13),
        # 23-30 are block4_pool, block5 and block5_pool (Keras layer 18).
        self.to_block4 = features[:23]  # (B, 512, H/8, W/8)
        self.to_block5_pool = features[23:]  # (B, 512, H/32, W/32)
        self.gate = AttentionGate(512, 512, inter_channels)
        self.num_features = 1024
        self.last_attention: torch.Tensor | None = None

    @property
    def gradcam_layer(self) -> nn.Module:
        """Grad-CAM explains block4_conv3 (layer 13), the features the attention gate weighs (16x16 at 128 px)."""
        return self.to_block4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x13 = self.to_block4(x)
        g = self.to_block5_pool(x13)
        x_hat, alpha = self.gate(x13, g)
        self.last_attention = alpha.detach()
        attended = x_hat.sum((2, 3)) / alpha.sum((2, 3)).clamp_min(1e-6)  # (B, 512) attention-weighted mean
        return torch.cat([attended, g.mean((2, 3))], dim=1)  # (B, 1024)
