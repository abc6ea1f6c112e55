"""Metrics whose networks come from other packages: LPIPS and pyiqa's. Never downloads anything.

Both packages fetch their weights from the internet on first use. Here a metric is available only
when its weights are already on disk: LPIPS is checked by file name, and a pyiqa metric is built
once with the network switched off, so a missing weight file makes it unavailable (with the
reason) instead of starting a download. pyiqa is PolyForm Noncommercial licensed and never a
dependency of this project; its metrics show up only where a user installed it themselves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from facerestore_cli.io.tensors import to_tensor01
from facerestore_cli.metrics.base import Metric, MetricUnavailable

#: torchvision's ImageNet AlexNet weights, the backbone of LPIPS (net="alex").
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


class _NetworkBlocked(OSError):
    pass


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Make any socket connection in this process fail, so nothing can be downloaded."""

    def refuse(*_args, **_kwargs):
        raise _NetworkBlocked("network access is disabled while metrics load (weights must already be on disk)")

    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection
    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection = saved  # type: ignore[method-assign]


# ------------------------------------------------------------------ LPIPS
def alexnet_checkpoint() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def lpips_unavailable_reason() -> str | None:
    missing = []
    if importlib.util.find_spec("lpips") is None:
        missing.append("the lpips package (pip install lpips)")
    if not alexnet_checkpoint().is_file():
        missing.append(f"its AlexNet backbone {alexnet_checkpoint()}")
    if missing:
        return f"needs {' and '.join(missing)}; weights are never downloaded here"
    return None


class LPIPS(Metric):
    name = "lpips"
    full_reference = True
    lower_better = True
    description = "LPIPS v0.1 (AlexNet) perceptual distance, via the lpips package"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        reason = lpips_unavailable_reason()
        if reason:
            raise MetricUnavailable(reason)
        import lpips

        self.device = torch.device(device)
        with no_network():
            self.net = lpips.LPIPS(net="alex", verbose=False).to(self.device).eval()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return lpips_unavailable_reason()

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return self.score_batch([image], [reference])[0]

    @torch.inference_mode()
    def score_batch(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray] | None = None) -> list[float]:
        if references is None or len(references) != len(images):
            raise ValueError("lpips is full-reference: give one reference per image")
        a = to_tensor01(images, self.device) * 2 - 1
        b = to_tensor01(references, self.device) * 2 - 1
        return [float(v) for v in self.net(a, b).flatten().cpu()]


# ------------------------------------------------------------------ pyiqa
@dataclass(frozen=True)
class PyiqaSpec:
    name: str  # pyiqa's name
    full_reference: bool
    lower_better: bool
    description: str


#: The pyiqa metrics worth listing for faces (each needs downloaded weights except piqe).
PYIQA_METRICS = {
    s.name: s
    for s in (
        PyiqaSpec("topiq_nr-face", False, False, "TOPIQ no-reference model trained for faces (GFIQA)"),
        PyiqaSpec("musiq", False, False, "MUSIQ (KonIQ) no-reference quality"),
        PyiqaSpec("maniqa", False, False, "MANIQA no-reference quality"),
        PyiqaSpec("clipiqa", False, False, "CLIP-IQA no-reference quality"),
        PyiqaSpec("topiq_nr", False, False, "TOPIQ no-reference quality (KonIQ)"),
        PyiqaSpec("brisque", False, True, "BRISQUE no-reference quality"),
        PyiqaSpec("piqe", False, True, "PIQE no-reference quality (no weights)"),
        PyiqaSpec("dists", True, True, "DISTS full-reference perceptual distance"),
        PyiqaSpec("topiq_fr", True, False, "TOPIQ full-reference quality"),
    )
}
PYIQA_PREFIX = "pyiqa:"
PYIQA_MISSING = "pyiqa is not installed (optional, never required: its license is PolyForm Noncommercial)"


def pyiqa_installed() -> bool:
    return importlib.util.find_spec("pyiqa") is not None


@lru_cache(maxsize=None)
def _build_pyiqa(name: str, device: str):
    """(model, None) or (None, reason); built once per process with the network off."""
    if not pyiqa_installed():
        return None, PYIQA_MISSING
    import pyiqa

    try:
        with no_network():
            model = pyiqa.create_metric(name, device=torch.device(device), as_loss=False)
    except Exception as err:  # noqa: BLE001 - any failure means "cannot run here"; say why
        if isinstance(err, _NetworkBlocked) or isinstance(err.__context__, _NetworkBlocked) or "network access is disabled" in str(err):
            return None, f"pyiqa's {name} weights are not on disk (pyiqa would download them; not done here)"
        return None, f"pyiqa could not build {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return model, None


def pyiqa_unavailable_reason(name: str) -> str | None:
    return _build_pyiqa(name, "cpu")[1]


class PyiqaMetric(Metric):
    """A pyiqa metric (inputs RGB in [0, 1]) behind this project's interface."""

    def __init__(self, pyiqa_name: str, device: str | torch.device = "cpu") -> None:
        self.pyiqa_name = pyiqa_name
        self.device = torch.device(device)
        model, reason = _build_pyiqa(pyiqa_name, str(self.device))
        if reason:
            raise MetricUnavailable(reason)
        self.model = model
        spec = PYIQA_METRICS.get(pyiqa_name)
        self.name = PYIQA_PREFIX + pyiqa_name
        self.lower_better = bool(getattr(model, "lower_better", spec.lower_better if spec else False))
        self.full_reference = spec.full_reference if spec else getattr(model, "metric_mode", "NR") == "FR"
        self.description = spec.description if spec else f"pyiqa {pyiqa_name}"

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return self.score_batch([image], [reference] if reference is not None else None)[0]

    @torch.inference_mode()
    def score_batch(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray] | None = None) -> list[float]:
        x = to_tensor01(images, self.device)
        if self.full_reference:
            if references is None or len(references) != len(images):
                raise ValueError(f"{self.name} is full-reference: give one reference per image")
            out = self.model(x, to_tensor01(references, self.device))
        else:
            out = self.model(x)
        return [float(v) for v in torch.as_tensor(out).flatten().cpu()]
