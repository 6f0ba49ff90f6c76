"""Writing and running the two export formats.

ONNX goes through torch's TorchScript-based exporter (`dynamo=False`): on the studies' networks it is several
times faster than the `torch.export` path and names an unsupported operator in its error
(`UnsupportedOperatorError`), which `export_onnx` turns into one line. TorchScript is a trace: every network
here is a plain feed-forward graph without data-dependent control flow, which a trace captures exactly (the
parity check proves it on real images, at several batch sizes).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from errors import MedselError
from export.layout import INPUT_NAME, OUTPUT_NAME

OPSET = 17  # ONNX Runtime >= 1.13 runs it; LayerNorm is a single op from 17 on


class ExportError(MedselError):
    """A network that cannot be written in the asked format; the message names the operator."""


def _operator(message: str) -> str | None:
    found = re.search(r"operator '([\w:.]+)'", message) or re.search(r"(aten::\w+|prim::\w+)", message)
    return found.group(1) if found else None


@contextlib.contextmanager
def _native_stdout_silenced():
    """Send file descriptor 1 to /dev/null for the block. The TorchScript-based exporter turns its C++ log on
    whatever `verbose` says (its `setup_onnx_logging` tests the function `_jit_is_onnx_log_enabled`, not its
    result) and then prints the whole IR graph to stdout on any failure: the user is to see one error line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def export_onnx(module: nn.Module, path: Path, example: torch.Tensor) -> None:
    """Write `module` (uint8 (B, H, W, C) -> (B, K)) as ONNX with a dynamic batch axis.

    Raises:
        ExportError: an operator the ONNX exporter does not support (named in the message).
    """
    try:
        with warnings.catch_warnings(), torch.no_grad(), _native_stdout_silenced():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes, not the user's to act on
            torch.onnx.export(
                module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET,
                dynamo=False, do_constant_folding=True,
            )
    except Exception as e:  # the exporter raises UnsupportedOperatorError, SymbolicValueError, RuntimeError, ...
        path.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        op = _operator(str(e))
        what = f"the operator '{op}'" if op else "an operation"
        raise ExportError(f"the network uses {what} that ONNX opset {OPSET} cannot express ({first}). "
                          "Export it with --format torchscript instead.") from None
    finally:
        module.eval()  # tracing may leave submodules in training mode


def export_torchscript(module: nn.Module, path: Path, example: torch.Tensor) -> None:
    """Write `module` as a traced TorchScript file (`torch.jit.load` reads it without this project).

    Raises:
        ExportError: the trace fails (the message names the operator when torch does).
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (example,), check_trace=False)
        traced.save(str(path))
    except Exception as e:
        path.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        op = _operator(str(e))
        raise ExportError(f"the network cannot be traced to TorchScript{f' (operator {op!r})' if op else ''}: {first}") from None
    finally:
        module.eval()


class OnnxRunner:
    """An exported ONNX file run by ONNX Runtime on the CPU: uint8 (B, H, W, C) -> (B, K) float32."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


class TorchScriptRunner:
    """An exported TorchScript file: uint8 (B, H, W, C) -> (B, K) float32."""

    def __init__(self, path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's note that TorchScript is deprecated: known, chosen
            self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(images)).float().numpy()


WRITERS = {"onnx": export_onnx, "torchscript": export_torchscript}
RUNNERS = {"onnx": OnnxRunner, "torchscript": TorchScriptRunner}
