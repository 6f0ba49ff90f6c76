"""Parity of both export formats for every network family the studies' sweeps use, at tiny input sizes with
random weights: ONNX Runtime and TorchScript answer the same probabilities as the torch model (within the
export's 1e-4, same predicted class) at batch sizes 1 and 3, which proves the batch axis dynamic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export import formats, parity
from export.network import ProbabilityNet
from lightning_modules.losses import build_loss
from lightning_modules.networks.factory import NetworkConfig, build_network

# (network config, input size, channels, loss): one per family.
FAMILIES = {
    "timm_cnn_resnet10t": (NetworkConfig(name="resnet10t"), 32, 3, "ce"),
    "mobilenetv4": (NetworkConfig(name="mobilenetv4_conv_small"), 32, 3, "ce"),
    "efficientnet": (NetworkConfig(name="efficientnet_b0"), 32, 1, "bce"),
    "ctnet10": (NetworkConfig(name="ctnet10"), 24, 3, "mse"),
    "attention_vgg16": (NetworkConfig(name="attention_vgg16"), 32, 3, "ce"),
    "vgg16_fc_head": (NetworkConfig(name="vgg16", pool="flatten", hidden=[10], dropout=0.5), 32, 3, "ce"),
}
# 1-4 s each on 2 CPU cores; the others take 5-20 s (tracing timm's larger graphs) and run under -m slow.
FAST = {("timm_cnn_resnet10t", "onnx"), ("ctnet10", "onnx"), ("ctnet10", "torchscript")}
CASES = [pytest.param(f, fmt, marks=() if (f, fmt) in FAST else pytest.mark.slow) for f in FAMILIES for fmt in ("onnx", "torchscript")]


def model_of(family: str) -> ProbabilityNet:
    cfg, size, chans, loss_name = FAMILIES[family]
    torch.manual_seed(0)
    loss = build_loss(loss_name, num_classes=2 if loss_name == "bce" else 3)
    net = build_network(cfg, loss.num_outputs, (size, size), in_chans=chans)
    return ProbabilityNet(net, loss.probabilities).eval()


def batches_for(family: str) -> list[torch.Tensor]:
    _, size, chans, _ = FAMILIES[family]
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, size, size, chans), dtype=torch.uint8, generator=gen)  # (B, H, W, C)
    return [images[:1], images[1:]]


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_export_matches_the_torch_model(family, fmt, tmp_path: Path):
    module = model_of(family)
    batches = batches_for(family)
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    formats.WRITERS[fmt](module, path, batches[1])
    check = parity.compare(module, formats.RUNNERS[fmt](path), batches, "random")
    assert check.passed, check
    assert check.images == 4 and check.batch_sizes == [1, 3]
    assert check.max_abs_diff < 1e-5  # a faithful export differs by float rounding only
    out = formats.RUNNERS[fmt](path)(batches[1].numpy())  # probabilities: the link function is part of the file
    assert out.shape == (3, 2 if FAMILIES[family][3] == "bce" else 3)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


def test_parity_check_catches_a_different_computation(tmp_path: Path):
    module = model_of("ctnet10")
    path = tmp_path / "m.onnx"
    formats.export_onnx(module, path, batches_for("ctnet10")[1])
    runner = formats.OnnxRunner(path)
    check = parity.compare(module, lambda x: runner(x) + 2e-4, batches_for("ctnet10"), "random")
    assert not check.passed and check.max_abs_diff == pytest.approx(2e-4, rel=0.1)
    with pytest.raises(parity.ParityError, match=r"max probability difference 2\.\d+e-04 \(limit 1e-04\)"):
        parity.require(check, "the onnx export")


class _Histogram(torch.nn.Module):
    """A network using an operator ONNX opset 17 has no counterpart for (torch.histc)."""

    def normalize(self, images):
        return images.permute(0, 3, 1, 2).float()

    def forward(self, x):
        return torch.stack([torch.histc(x[i], bins=2) for i in range(x.shape[0])])


def test_unexportable_operator_is_one_error_naming_it(tmp_path: Path, capfd):
    module = ProbabilityNet(_Histogram(), lambda logits: logits.softmax(1))
    with pytest.raises(formats.ExportError) as info:
        formats.export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    message = str(info.value)
    assert "'aten::histc'" in message and "--format torchscript" in message
    assert "\n" not in message
    assert not (tmp_path / "m.onnx").exists()
    assert "graph" not in capfd.readouterr().out  # the exporter's IR dump is not shown to the user
