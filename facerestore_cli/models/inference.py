"""Running the restorer on uint8 face crops: conversion, one step, colour fix.

`restore` and `eval` both go through `restore_crops_tensor` (`restore_crops` is it for numpy
crops), so what is measured is what users get, whichever backend runs the model (the torch
restorer or an exported engine, export.backends).
`CompiledRestorer` is the torch restorer under `torch.compile` (`restore --compile`), falling
back to eager when compiling fails.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from facerestore_cli.models.color import DEFAULT_COLOR_FIX, color_fix
from facerestore_cli.models.configs import RestorerConfig

if TYPE_CHECKING:
    pass

T = TypeVar("T")


class RestoreModel(Protocol):
    """What restoring needs of a model: `OneStepRestorer` or an exported engine's backend.

    Called on Bx3xHxW in [-1, 1] on `device` in `dtype`; `config.face_size` is the crop size.
    `takes_any_size`: a torch model takes any multiple of its downsampling (`--face-size`); an
    exported engine only the size it was built for.
    """

    config: RestorerConfig
    takes_any_size: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def model_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Bx3xHxW in 0..255 (uint8 or float, any device) -> the model's [-1, 1] on its device and dtype."""
    return (x.to(device).to(dtype) / 127.5 - 1).contiguous()


def to_tensor(crops: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 HxWx3 crops (same size) -> Bx3xHxW in [-1, 1]."""
    return model_input(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2), device, dtype)


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW in [-1, 1] -> uint8 Bx3xHxW on the same device."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """Bx3xHxW in [-1, 1] -> uint8 HxWx3 arrays."""
    return list(to_uint8_tensor(x).permute(0, 2, 3, 1).cpu().numpy())


@torch.inference_mode()
def restore_batch(model: RestoreModel, x: torch.Tensor, method: str = DEFAULT_COLOR_FIX) -> torch.Tensor:
    """One step, then the colour fix against the model's own input."""
    return color_fix(model(x), x, method)


def restore_crops_tensor(model: RestoreModel, crops: torch.Tensor, batch_size: int = 4, method: str = DEFAULT_COLOR_FIX) -> torch.Tensor:
    """Restore aligned crops given as a uint8 Bx3xSxS tensor (any device), batch_size at a time.

    Returns uint8 Bx3xSxS on the model's device, so a frame path that keeps its frames there
    (restore/frames.py) never takes the faces through host memory.
    """
    out = [
        to_uint8_tensor(restore_batch(model, model_input(crops[i : i + batch_size], model.device, model.dtype), method))
        for i in range(0, len(crops), batch_size)
    ]
    return torch.cat(out) if out else torch.empty((0, *crops.shape[1:]), dtype=torch.uint8, device=model.device)


def restore_crops(
    model: RestoreModel, crops: Sequence[np.ndarray], batch_size: int = 4, method: str = DEFAULT_COLOR_FIX
) -> list[np.ndarray]:
    """Restore aligned uint8 HxWx3 crops, batch_size at a time, on the model's device and dtype."""
    if not len(crops):
        return []
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)  # moved to the device a batch at a time
    return list(restore_crops_tensor(model, batch, batch_size, method).permute(0, 2, 3, 1).cpu().numpy())


def by_size(crops: Sequence[T], restore: Callable[[list[T]], Sequence[T]]) -> list[T]:
    """Restore crops of several sizes (arrays or tensors): each same-size group in one `restore`
    call, the results in input order."""
    out: list[T | None] = [None] * len(crops)
    for shape in dict.fromkeys(tuple(c.shape) for c in crops):
        idx = [i for i, c in enumerate(crops) if tuple(c.shape) == shape]
        for i, restored in zip(idx, restore([crops[i] for i in idx])):
            out[i] = restored
    return out  # type: ignore[return-value]


def compiled_parts(restorer: nn.Module) -> list[str]:
    """The submodules `--compile` compiles: what the restorer calls forward() on (a restorer that
    knows better, such as a multi-step DiffBIR model, lists them in its own `compiled_parts()`).

    The VAE itself is reached through encode()/decode(), which torch.compile of the VAE module
    would not cover, so its halves are compiled; with skip fusion the halves are run block by
    block (models.skips), so the blocks and the fusion are compiled instead."""
    if hasattr(restorer, "compiled_parts"):
        return restorer.compiled_parts()
    if restorer.skip_fusion is None:
        return ["unet", "vae.encoder", "vae.decoder"]
    enc, dec = restorer.vae.encoder, restorer.vae.decoder
    return [
        "unet",
        *(f"vae.encoder.down_blocks.{i}" for i in range(len(enc.down_blocks))),
        "vae.encoder.mid_block",
        "vae.decoder.mid_block",
        *(f"vae.decoder.up_blocks.{i}" for i in range(len(dec.up_blocks))),
        *(f"skip_fusion.blocks.{k}" for k in restorer.skip_fusion.blocks),
    ]


def _one_line(err: BaseException) -> str:
    """`Type: first line`, through to the cause (dynamo's own first line only names the backend)."""
    inner = getattr(err, "inner_exception", None) or err.__cause__
    if inner is not None and inner is not err:
        err = inner
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}"


def _swap(restorer: nn.Module, dotted: str, module: nn.Module) -> nn.Module:
    """Put `module` at restorer.<dotted>; returns what was there."""
    parent_name, _, name = dotted.rpartition(".")
    parent = restorer.get_submodule(parent_name) if parent_name else restorer
    old = getattr(parent, name)
    setattr(parent, name, module)
    return old


class RestorerWrapper:
    """Base of the wrappers around a torch restorer (compile, precision guard): they pass its
    config, device and dtype through, so they are `RestoreModel`s too."""

    restorer: nn.Module
    takes_any_size = True

    @property
    def config(self) -> RestorerConfig:
        return self.restorer.config

    @property
    def device(self) -> torch.device:
        return self.restorer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.restorer.dtype


class CompiledRestorer(RestorerWrapper):
    """`RestoreModel` over a torch restorer whose UNet and VAE halves run under torch.compile.

    Compiling happens lazily at the first batch; if it (or any later call of the compiled
    modules) raises, the eager modules are put back, `warn` gets one line naming the reason and
    the batch is redone eagerly, so `--compile` can only cost time, never a run.
    `channels_last` (CUDA) moves the weights and inputs to NHWC, which tensor cores prefer.
    """

    def __init__(
        self, restorer: nn.Module, backend: str = "inductor", channels_last: bool = False, warn: Callable[[str], None] | None = None
    ) -> None:
        self.restorer, self.channels_last = restorer, channels_last
        self.warn = warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3))
        if channels_last:
            restorer.to(memory_format=torch.channels_last)
        self.eager = {p: _swap(restorer, p, torch.compile(restorer.get_submodule(p), backend=backend)) for p in compiled_parts(restorer)}

    @property
    def compiled(self) -> bool:
        return bool(self.eager)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.eager:
            return self.restorer(x)
        try:
            return self.restorer(x)
        except Exception as err:  # inductor/triton/compiler problems surface as many types
            self.to_eager()
            self.warn(f"--compile: torch.compile failed ({_one_line(err)}); running eager")
            return self.restorer(x)

    def to_eager(self) -> None:
        """Put the original modules back (they share their weights with the compiled ones)."""
        for part, module in self.eager.items():
            _swap(self.restorer, part, module)
        self.eager = {}
