"""ReFL's guard terms as DiffusionReward computes them: the DTCWT low-pass structural loss, LPIPS
with the VGG backbone, and the regulariser interface: the output against the frozen base for
one-step models, the control residuals against a frozen copy for ControlNet models.

- Structural: L1 between the low-pass bands of output and ground truth of a dual-tree complex
  wavelet transform (`pytorch_wavelets.DTCWTForward`, J = 3, biort near_sym_b, qshift qshift_b),
  the low-pass only. `blur_pyramid` (the project's earlier stand-in, `models.color.low_frequency`)
  stays selectable by name, never silently.
- Perceptual: `lpips` (0.1.4: its linear heads ship in the wheel) with torchvision's VGG16 read
  from a local file: `lpips` itself would download the backbone. Without that file the project's
  encoder-feature distance is used, and the run names it as the fallback.
"""

from __future__ import annotations

import importlib.resources
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facerestore_cli.errors import InputError, MissingFileError
from facerestore_cli.models.color import low_frequency
from facerestore_cli.models.perceptual import EncoderPerceptualLoss
from facerestore_cli.models.restorer import OneStepRestorer

STRUCTURAL_KINDS = ("dtcwt", "blur_pyramid")
#: The paper's DTCWT: J = 3 levels, biorthogonal near_sym_b for level 1, q-shift qshift_b above.
DTCWT_SETTINGS = {"J": 3, "biort": "near_sym_b", "qshift": "qshift_b"}


# ------------------------------------------------------------------ structural (low-pass) loss
def _pkg_resources_shim() -> None:
    """pytorch_wavelets 1.3 reads its filter files with `pkg_resources.resource_stream`, which
    setuptools >= 81 no longer ships; give it the one function it uses (importlib.resources)."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_stream = lambda package, name: importlib.resources.files(package).joinpath(name).open("rb")  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim


def dtcwt_forward(levels: int = 3, biort: str = "near_sym_b", qshift: str = "qshift_b") -> nn.Module:
    """`pytorch_wavelets.DTCWTForward`; an InputError naming what to install when it is missing."""
    _pkg_resources_shim()
    try:
        from pytorch_wavelets import DTCWTForward
    except ImportError as err:
        raise InputError(
            f"structural_loss = 'dtcwt' needs pytorch-wavelets and PyWavelets (pip install pytorch-wavelets PyWavelets): {err}; "
            "or set structural_loss = 'blur_pyramid' (the stand-in, named so in the summary)"
        ) from None
    return DTCWTForward(J=levels, biort=biort, qshift=qshift)


class LowPassL1(nn.Module):
    """L1 between the low-pass bands of output and ground truth (images in [-1, 1]), in fp32."""

    def __init__(self, kind: str = "dtcwt", levels: int = 3, blur_levels: int = 4) -> None:
        super().__init__()
        if kind not in STRUCTURAL_KINDS:
            raise InputError(f"structural_loss must be one of {', '.join(STRUCTURAL_KINDS)}, not {kind!r}")
        self.kind, self.blur_levels = kind, blur_levels
        self.dtcwt = dtcwt_forward(levels, DTCWT_SETTINGS["biort"], DTCWT_SETTINGS["qshift"]) if kind == "dtcwt" else None
        self.name = f"dtcwt_lowpass(J={levels}, near_sym_b, qshift_b)" if kind == "dtcwt" else f"blur_pyramid(levels={blur_levels})"

    def lowpass(self, x: Tensor) -> Tensor:
        if self.dtcwt is None:
            return low_frequency(x.float(), self.blur_levels)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.dtcwt(x.float())[0]

    def forward(self, out: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            ref = self.lowpass(target)
        return F.l1_loss(self.lowpass(out), ref)


# ------------------------------------------------------------------ perceptual
def lpips_vgg(vgg_weights: str | Path) -> nn.Module:
    """`lpips.LPIPS(net='vgg')` with its shipped linear heads and torchvision's VGG16 features
    read from `vgg_weights` (e.g. vgg16-397923af.pth); nothing is downloaded.

    LPIPS is built with a random backbone (`pnet_rand`), then every backbone weight is replaced
    from the file (torchvision keys `features.N.*`), strictly: a file that does not fit is an error.
    """
    import lpips

    path = Path(vgg_weights)
    if not path.is_file():
        raise MissingFileError(f"lpips_vgg: {path} not found (torchvision's VGG16 weights, e.g. vgg16-397923af.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    own = model.net.state_dict()
    # lpips names the backbone's layers slice{k}.{index in vgg.features}.{weight|bias}
    wanted = {name: "features." + name.split(".", 1)[1] for name in own}
    missing = [src for src in wanted.values() if src not in state]
    wrong = [src for dst, src in wanted.items() if src in state and state[src].shape != own[dst].shape]
    if missing or wrong:
        raise InputError(f"lpips_vgg: {path} is not torchvision's VGG16 (missing {missing[:3]}, other shapes {wrong[:3]})")
    model.net.load_state_dict({dst: state[src].float() for dst, src in wanted.items()})
    return model.eval().requires_grad_(False)


class LpipsLoss(nn.Module):
    """Mean LPIPS of images in [-1, 1] (lpips' own input range), in fp32, frozen."""

    name = "lpips_vgg"

    def __init__(self, vgg_weights: str | Path) -> None:
        super().__init__()
        self.lpips = lpips_vgg(vgg_weights)

    def train(self, mode: bool = True) -> LpipsLoss:
        return super().train(False)

    def forward(self, out: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=out.device.type, enabled=False):
            return self.lpips(out.float(), target.float()).mean()


class NamedEncoderPerceptual(EncoderPerceptualLoss):
    """The fallback when no VGG16 weights are given: the restorer's own encoder features."""

    name = "encoder_features (fallback: no lpips_vgg weights given)"


def perceptual_loss(encoder: nn.Module, lpips_vgg_weights: str) -> nn.Module:
    """LPIPS-VGG when its backbone's weights are given by path, else the named fallback."""
    return LpipsLoss(lpips_vgg_weights) if lpips_vgg_weights else NamedEncoderPerceptual(encoder)


# ------------------------------------------------------------------ regulariser
@dataclass
class ReflStep:
    """The one trained sampler step of a ReFL forward: what a regulariser may compare."""

    #: the degraded input in [-1, 1].
    lq: Tensor
    #: the step's input latent (detached unless it is the encoder's output; None where the
    #: regulariser needs none) and its timestep.
    z_t: Tensor | None
    t: int
    #: index of the step in the trajectory (0: the first, the only one of a one-step model).
    index: int
    #: the trained prediction (with gradients): the clean latent that is decoded and scored.
    x0: Tensor
    #: a ControlNet model's control residuals at the step (with gradients) and its frozen copy's.
    residuals: tuple[list[Tensor], Tensor] | None = None
    fixed_residuals: tuple[list[Tensor], Tensor] | None = None


class StepRegulariser(Protocol):
    """Keeps the tuned model near its frozen start; `name` goes into the run's summary. A
    ControlNet model's residual regulariser (DiffusionReward's Σ mean((c_l - c_l^fixed)²) over the
    13 control residuals) implements this with the residuals it records during the step."""

    name: str

    def __call__(self, model: OneStepRestorer, step: ReflStep) -> Tensor: ...


class OutputLatentRegulariser:
    """MSE between the trained step's clean latent and the frozen base's on the same input (the
    base is the model with its adapters disabled; a first step re-encodes the LQ with the base
    encoder too). Zero at the start, when the LoRA adapters are still zero."""

    name = "output_latent_vs_frozen_base"
    #: the kind of tuned model it applies to (make_regulariser refuses the other).
    base = "one-step"

    def __call__(self, model: OneStepRestorer, step: ReflStep) -> Tensor:
        with torch.no_grad(), model.adapters_disabled():
            z_t = model.encode(step.lq) if step.index == 0 else step.z_t
            x0_base = model.denoise_latent(z_t.to(model.dtype), step.t)
        return F.mse_loss(step.x0.float(), x0_base.float())


class ControlResidualRegulariser:
    """DiffusionReward's regulariser of a tuned ControlNet: the sum over its 13 control residuals
    of mean((c_l - c_l^fixed)^2) against a frozen copy of the starting ControlNet on the same
    input (`model` is the `train.controlnet.TunableControlNet`). Zero at the start."""

    name = "control_residuals_vs_fixed"
    base = "controlnet"

    def __call__(self, model, step: ReflStep) -> Tensor:
        if step.residuals is None or step.fixed_residuals is None:
            raise InputError("regulariser = 'control_residuals' is for ControlNet (DiffBIR-kind) models")
        return model.regulariser(step.residuals, step.fixed_residuals)


#: config name -> regulariser; a new kind registers here.
REGULARISERS: dict[str, type] = {"output_latent": OutputLatentRegulariser, "control_residuals": ControlResidualRegulariser}


def make_regulariser(kind: str, base: str | None = None) -> StepRegulariser:
    """The regulariser `kind` names; `base` ("one-step" or "controlnet") refuses one made for the other."""
    if kind not in REGULARISERS:
        raise InputError(f"regulariser must be one of {', '.join(REGULARISERS)}, not {kind!r}")
    made_for = getattr(REGULARISERS[kind], "base", None)
    if base is not None and made_for is not None and made_for != base:
        raise InputError(f"regulariser = {kind!r} is for {made_for} models; this base is a {base} model")
    return REGULARISERS[kind]()
