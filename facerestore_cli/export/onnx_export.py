"""torch -> ONNX: the whole restorer (VAE encoder, UNet step(s), VAE decoder) as one graph.

Uses torch's TorchScript exporter (`dynamo=False`): it traces the model once, so the few-step
sampler's Python loop is unrolled into `sampling_steps` UNet calls and the scheduler constants
become graph constants, exactly the computation `OneStepRestorer.forward` runs. It needs no
onnxscript. Only the batch dimension is dynamic; the face size is fixed at export.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from facerestore_cli.export.meta import BackendUnavailable
from facerestore_cli.models.restorer import OneStepRestorer

INPUT, OUTPUT = "lq", "restored"
DEFAULT_OPSET = 17
#: protobuf's limit is 2 GiB; above this the weights go to one `<file>.data` next to the graph.
_INLINE_LIMIT = 1_800_000_000


class _Graph(nn.Module):
    """fp32 in, fp32 out whatever the weights' dtype, so every backend feeds and reads float32."""

    def __init__(self, restorer: OneStepRestorer) -> None:
        super().__init__()
        self.restorer = restorer

    def forward(self, lq: Tensor) -> Tensor:
        return self.restorer(lq.to(self.restorer.dtype)).float()


def require_onnx():
    """The `onnx` module, or one clear line about the extra to install."""
    try:
        import onnx
    except ImportError:
        raise BackendUnavailable("ONNX export needs the `onnx` package: pip install onnx onnxruntime (the `onnx` extra)") from None
    return onnx


def export_onnx(restorer: OneStepRestorer, out: Path, face_size: int, opset: int = DEFAULT_OPSET) -> Path:
    """Trace `restorer` (already on its export device and dtype) at face_size and write `out`.

    Written through a temporary folder and renamed, so an interrupted export never leaves a
    half-written engine where the cache would pick it up.
    """
    onnx = require_onnx()
    out.parent.mkdir(parents=True, exist_ok=True)
    # batch 2 in the trace: a batch of 1 can let broadcasting specialise on that size
    dummy = torch.zeros(2, 3, face_size, face_size, device=restorer.device)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "traced.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            _quiet_exporter_warnings()
            torch.onnx.export(
                _Graph(restorer.eval()),
                (dummy,),
                str(traced),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
        _save_single(onnx, traced, out, Path(tmp))
    return out


def _quiet_exporter_warnings() -> None:
    """The legacy exporter's deprecation notice and tracer warnings about shape checks baked in as
    constants (fine: the face size is fixed, only the batch varies) would bury the CLI's output."""
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.filterwarnings("ignore", message="Constant folding")


def _save_single(onnx, traced: Path, out: Path, tmp: Path) -> None:
    """Re-save the traced graph as `out` alone, or `out` + one `out.data` when over protobuf's 2 GiB
    (torch writes one external file per tensor for big models; SD 2.1's UNet is 3.4 GB in fp32)."""
    model = onnx.load(str(traced))  # pulls in any external tensors
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    staged = tmp / "final" / out.name
    staged.parent.mkdir()
    data_name = out.name + ".data"
    if weights > _INLINE_LIMIT:
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        os.replace(staged.parent / data_name, out.parent / data_name)
    else:
        onnx.save_model(model, str(staged))
        (out.parent / data_name).unlink(missing_ok=True)
    os.replace(staged, out)
