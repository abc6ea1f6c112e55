"""fp16/bf16 restoring without NaN faces: check each batch, redo the bad ones in fp32.

Stable Diffusion VAEs overflow in fp16 (the decoder's activations pass 65504), which comes out
as NaN/inf or an all-black face. `PrecisionGuard` wraps the torch restorer and, after each
low-precision batch, looks for that; a bad batch is redone with the VAE decoder in fp32 (kept so
from then on: an overflowing decoder keeps overflowing), and if still bad, with the whole model
in fp32 for that batch only (cast back after: fp16 -> fp32 -> fp16 is exact). One warning line
per kind of fallback per run; it never raises because of precision.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from facerestore_cli.models.inference import RestorerWrapper
from facerestore_cli.models.restorer import OneStepRestorer

#: An output face counts as black when no pixel is above this (in [-1, 1]: grey level 2 of 255).
BLACK_LEVEL = -1 + 4 / 255
#: ...while its input had some pixel above this (a black input may well give a black face).
LIT_LEVEL = -1 + 16 / 255
LOW_PRECISION = (torch.float16, torch.bfloat16)


def bad_faces(out: Tensor, x: Tensor) -> Tensor:
    """Per sample (B,): non-finite anywhere, or entirely black while the input was not."""
    flat_out, flat_in = out.detach().float().flatten(1), x.detach().float().flatten(1)
    non_finite = ~torch.isfinite(flat_out).all(1)
    black = (flat_out.nan_to_num(0.0).amax(1) <= BLACK_LEVEL) & (flat_in.amax(1) > LIT_LEVEL)
    return non_finite | black


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cast_input_to_float(_module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the fp32 decoder is fed the low-precision latent as fp32."""
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class PrecisionGuard(RestorerWrapper):
    """`RestoreModel` over a low-precision torch restorer that redoes NaN/black batches in fp32.

    `model` is what is called (the restorer, or a wrapper of it such as the compile fallback);
    `restorer` is the torch restorer whose parts are cast: a `OneStepRestorer` or any restorer
    with a diffusers `vae` (a multi-step `DiffBIRRestorer`, whose decoder overflows alike). `warn` gets one line per kind of
    fallback per run (default: a RuntimeWarning). Inputs are taken in fp32 (`dtype`) and cast
    down here, so an fp32 retry sees the exact input, not its fp16/bf16 rounding.
    """

    def __init__(
        self,
        restorer: OneStepRestorer | nn.Module,
        model: Callable[[Tensor], Tensor] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.restorer = restorer
        self.model = model if model is not None else restorer
        self.low = restorer.dtype
        self.warn = warn or _warn
        self.decoder_fp32 = False
        self._warned: set[str] = set()
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __call__(self, x: Tensor) -> Tensor:
        out = self.model(x.to(self.low))
        if self.low not in LOW_PRECISION or not bad_faces(out, x).any():
            return out
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.low]
        if not self.decoder_fp32:
            self._decoder_to_fp32()
            out = self.model(x.to(self.low))
            if not bad_faces(out, x).any():
                self._warn_once("decoder", f"{name} output had NaN/inf or black faces: the VAE decoder now runs in fp32")
                return out
        try:
            out = self._run_fp32(x)
        except RuntimeError as err:  # e.g. out of memory for the fp32 copy: keep the run going
            self._warn_once(
                "fp32-failed",
                f"{name} output had NaN/inf or black faces and the fp32 retry failed ({type(err).__name__}); such faces are left as they are",
            )
            return out.nan_to_num(0.0)
        self._warn_once(
            "fp32",
            f"{name} output had NaN/inf or black faces even with an fp32 VAE decoder: such batches are redone with the whole model in fp32",
        )
        if not torch.isfinite(out).all():
            self._warn_once("fp32-bad", "the model gives NaN/inf even in fp32: those pixels are written as mid-grey")
            out = out.nan_to_num(0.0, 0.0, 0.0)
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def _decoder_parts(self) -> list[nn.Module]:
        vae = self.restorer.vae
        fusion = getattr(self.restorer, "skip_fusion", None)
        return [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder, fusion) if m is not None]

    def _decoder_to_fp32(self) -> None:
        """Cast post_quant_conv + decoder to fp32 and feed them fp32 (the encoder and UNet stay low)."""
        parts = self._decoder_parts()
        with torch.inference_mode(False), torch.no_grad():
            for part in parts:
                part.float()
        self._hook = parts[0].register_forward_pre_hook(_cast_input_to_float)
        self.decoder_fp32 = True

    def _run_fp32(self, x: Tensor) -> Tensor:
        """The whole restorer in fp32 for one batch, then back to low precision (sticky decoder kept)."""
        try:
            with torch.inference_mode(False), torch.no_grad():
                self.restorer.float()
            with torch.inference_mode():
                return self.model(x.float())
        finally:
            with torch.inference_mode(False), torch.no_grad():
                self.restorer.to(self.low)
                if self.decoder_fp32:
                    for part in self._decoder_parts():
                        part.float()
