"""DiffBIR v1 face restoration (stage 2) on diffusers parts, with the published models' settings.

Stage 1 (SwinIR) cleans the face; its output, encoded by the VAE (`.mode()` x 0.18215), is the
ControlNet's condition latent c_img; from x_T ~ N(0, I) every step adds the ControlNet's 13
residuals (x strength) to the UNet, which predicts epsilon for the empty prompt (cfg 1.0, so only
the conditional branch runs); the decoded face gets DiffBIR's wavelet colour fix against the
stage-1 output (upstream/SPEC.md §2.6). The restorer does its own colour fix: `restore` must
pass colour fix "none" for it.

Samplers are diffusers schedulers, checked against DiffBIR's over full 50-step runs (SPEC):
`spaced` is DDPM with fixed-small variance on IDDPM-respaced timesteps; `ddim` is DDIM with
"leading" spacing, offset 1, alpha_prev(t < 0) = alphas_cumprod[0], and eta.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facerestore_cli.errors import InputError
from facerestore_cli.models.color import color_fix
from facerestore_cli.models.configs import RestorerConfig
from facerestore_cli.models.controlnet import load_controlnet
from facerestore_cli.models.sd21 import build_scheduler, load_sd21, sd21_configs

__all__ = [
    "COLOR_FIX",
    "PRESETS",
    "SAMPLERS",
    "DiffBIRRestorer",
    "SamplerSettings",
    "make_scheduler",
    "preset_settings",
    "respaced_timesteps",
]

SAMPLERS = ("spaced", "ddim")
#: DiffBIR's `wavelet_reconstruction` takes 5 detail levels of [1 2 1]/4 a-trous blurs with
#: dilations 1..16 and replicate padding: the project's `wavelet_color_fix` with levels=5 (its
#: plain "wavelet" default is 3 levels). Linear, so [-1, 1] gives the same as DiffBIR's [0, 1].
COLOR_FIX = "wavelet:5"


@dataclass(frozen=True)
class SamplerSettings:
    """How one published model samples (SPEC §2.6, §3.4, §4.3)."""

    sampler: str = "spaced"
    steps: int = 50
    eta: float = 0.0
    seed: int = 231

    def validated(self) -> SamplerSettings:
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if not 1 <= int(self.steps) <= 1000:
            raise InputError(f"steps must be between 1 and 1000, not {self.steps}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise InputError(f"eta must be between 0 and 1, not {self.eta}")
        if self.sampler == "spaced" and float(self.eta) != 0.0:
            raise InputError("eta applies to the ddim sampler only (spaced samples with the fixed posterior variance)")
        return SamplerSettings(self.sampler, int(self.steps), float(self.eta), int(self.seed))


#: DiffBIR v1 (spaced 50), DiffusionReward ReFL (DDIM 50, eta 1.0), LRPO (DDIM 50, eta 0.8).
PRESETS: dict[str, SamplerSettings] = {
    "diffbir_v1": SamplerSettings("spaced", 50, 0.0, 231),
    "diffusionreward": SamplerSettings("ddim", 50, 1.0, 231),
    "lrpo": SamplerSettings("ddim", 50, 0.8, 232),
}
#: The preset of a model file that names none: DiffBIR v1's own.
DEFAULT_PRESET = "diffbir_v1"


def preset_settings(name: str) -> SamplerSettings:
    """A published model's settings by preset name; one InputError line for an unknown name."""
    if name not in PRESETS:
        raise InputError(f"unknown DiffBIR preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def respaced_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """IDDPM's `space_timesteps(T, str(steps))`, ascending: one section, stride (T-1)/(steps-1)
    accumulated in floats and rounded (Python's round), so 50 of 1000 gives 0, 20, 41, 61, ..., 979, 999."""
    if not 1 <= steps <= num_train_timesteps:
        raise InputError(f"cannot take {steps} steps of {num_train_timesteps}")
    stride = 1.0 if steps <= 1 else (num_train_timesteps - 1) / (steps - 1)
    out, cur = [], 0.0
    for _ in range(steps):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


def make_scheduler(settings: SamplerSettings, schedule: Mapping[str, Any] | None = None) -> Any:
    """A fresh diffusers scheduler for `settings`, its timesteps set (on the CPU)."""
    s = settings.validated()
    common = {"prediction_type": "epsilon", "clip_sample": False, "thresholding": False}
    if s.sampler == "ddim":
        sched = build_scheduler("ddim", schedule, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, **common)
        sched.set_timesteps(s.steps)
    else:
        sched = build_scheduler("ddpm", schedule, variance_type="fixed_small", **common)
        total = int(sched.config.num_train_timesteps)
        sched.set_timesteps(timesteps=respaced_timesteps(s.steps, total)[::-1])
    return sched


def _with(base: SamplerSettings, changes: Mapping[str, Any]) -> SamplerSettings:
    """`base` with some of sampler/steps/eta/seed changed, validated."""
    unknown = sorted(set(changes) - set(asdict(base)))
    if unknown:
        raise InputError(f"unknown DiffBIR setting(s) {', '.join(unknown)}; known: sampler, steps, eta, seed")
    return replace(base, **changes).validated()


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers FrozenDict config as JSON-ready data, without its `_class_name`-style entries."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=list))


class DiffBIRRestorer(nn.Module):
    """Stage 1 + VAE + UNet + IRControlNet + the "" context + a scheduler: Bx3xHxW in [-1, 1]
    (H, W multiples of 64) -> the restored faces in [-1, 1], all faces of a batch stepping together.

    `stage1` is any callable [0, 1] -> [0, 1] of the same size (normally `load_face_swinir`).
    The noise comes from a CPU generator seeded with `seed` at every call, so the same seed gives
    the same output on any device. Sampling runs the latent in float32 and the networks in their
    own dtype (`.to(dtype)` moves all of them).
    """

    takes_any_size = True
    #: `--color-fix auto` for this model: none, since it applies DiffBIR's own wavelet fix
    #: against the stage-1 output (a second fix against the degraded input would undo it).
    default_color_fix = "none"

    def __init__(
        self,
        stage1: Callable[[Tensor], Tensor],
        vae: nn.Module,
        unet: nn.Module,
        controlnet: nn.Module,
        prompt_embeds: Tensor,
        settings: SamplerSettings | str = "diffbir_v1",
        strength: float = 1.0,
        scheduler_config: Mapping[str, Any] | None = None,
        face_size: int = 512,
        name: str = "diffbir",
    ) -> None:
        super().__init__()
        self.stage1 = stage1
        self.vae, self.unet, self.controlnet = vae, unet, controlnet
        self.register_buffer(
            "prompt_embeds", prompt_embeds.detach().float().reshape(1, *prompt_embeds.shape[-2:]).clone(), persistent=False
        )
        self.strength = float(strength)
        self.scheduler_config = dict(scheduler_config or sd21_configs()["scheduler"])
        self._settings = (preset_settings(settings) if isinstance(settings, str) else settings).validated()
        self.config = RestorerConfig(
            name=name,
            face_size=int(face_size),
            vae=_plain(vae.config),
            unet=_plain(unet.config),
            scheduler=_plain(self.scheduler_config),
            timestep=int(self.scheduler_config.get("num_train_timesteps", 1000)) - 1,
            sampling_steps=self._settings.steps,
            prompt_tokens=int(self.prompt_embeds.shape[1]),
            extra={},
        )
        self._sync_config()

    # ---------------------------------------------------------------- settings
    @property
    def settings(self) -> SamplerSettings:
        return self._settings

    def configure(self, preset: str | None = None, **changes: Any) -> DiffBIRRestorer:
        """Switch to a preset and/or change sampler, steps, eta or seed (validated); returns self."""
        base = preset_settings(preset) if preset is not None else self._settings
        self._settings = _with(base, changes)
        self._sync_config()
        return self

    def _sync_config(self) -> None:
        self.config.sampling_steps = self._settings.steps
        self.config.extra.update(pipeline="diffbir", color_fix=COLOR_FIX, strength=self.strength, **asdict(self._settings))

    @property
    def sampler(self) -> str:
        return self._settings.sampler

    @sampler.setter
    def sampler(self, value: str) -> None:
        self.configure(sampler=value)

    @property
    def steps(self) -> int:
        return self._settings.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.configure(steps=value)

    @property
    def eta(self) -> float:
        return self._settings.eta

    @eta.setter
    def eta(self, value: float) -> None:
        self.configure(eta=value)

    @property
    def seed(self) -> int:
        return self._settings.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.configure(seed=value)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # ---------------------------------------------------------------- pieces (also for trainers)
    def stage1_image(self, x: Tensor) -> Tensor:
        """Stage 1 on (x+1)/2, back in [-1, 1]: the ControlNet's condition and the colour reference."""
        return self.stage1((x + 1) / 2).to(self.dtype) * 2 - 1

    def encode_condition(self, cond: Tensor) -> Tensor:
        """c_img = VAE.encode(cond).mode() x scaling factor (the mode, not a sample: SPEC §2.5)."""
        return self.vae.encode(cond.to(self.dtype)).latent_dist.mode() * self.scaling_factor

    def control_residuals(
        self, x_t: Tensor, c_img: Tensor, t: Tensor | int, context: Tensor | None = None, controlnet: nn.Module | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """The 13 control residuals (12 down, 1 mid) x strength: `controlnet` (default this model's;
        a trainer passes its frozen copy for the regulariser) over cat([x_t, c_img]) with a zero hint."""
        net = controlnet or self.controlnet
        b, _, h, w = x_t.shape
        x_t = x_t.to(self.dtype)
        f = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
        hint = torch.zeros(b, int(net.config.conditioning_channels), h * f, w * f, device=x_t.device, dtype=self.dtype)
        down, mid = net(
            torch.cat([x_t, c_img.to(self.dtype)], 1),
            t,
            encoder_hidden_states=self._context(context, b),
            controlnet_cond=hint,
            conditioning_scale=self.strength,
            return_dict=False,
        )
        return list(down), mid

    def predict_noise(
        self, x_t: Tensor, c_img: Tensor, t: Tensor | int, context: Tensor | None = None, residuals: tuple | None = None
    ) -> Tensor:
        """epsilon at timestep t: the UNet with the control residuals (computed here unless given)."""
        down, mid = residuals if residuals is not None else self.control_residuals(x_t, c_img, t, context)
        return self.unet(
            x_t.to(self.dtype),
            t,
            encoder_hidden_states=self._context(context, x_t.shape[0]),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    def _context(self, context: Tensor | None, batch: int) -> Tensor:
        return context if context is not None else self.prompt_embeds.to(self.dtype).expand(batch, -1, -1)

    def initial_noise(self, c_img: Tensor, generator: torch.Generator) -> Tensor:
        """x_T ~ N(0, I) in float32, drawn on the CPU so a seed means the same noise everywhere."""
        shape = (c_img.shape[0], int(self.unet.config.in_channels), *c_img.shape[2:])
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(c_img.device)

    def sample(self, c_img: Tensor, seed: int | None = None) -> Tensor:
        """The clean latent (float32) for condition latents c_img, all in one batch through every step."""
        gen = torch.Generator("cpu").manual_seed(self.seed if seed is None else int(seed))
        z = self.initial_noise(c_img, gen)
        sched = make_scheduler(self._settings, self.scheduler_config)
        context = self.prompt_embeds.to(self.dtype).expand(c_img.shape[0], -1, -1)
        extra = {"eta": self.eta} if self.sampler == "ddim" else {}
        for t in sched.timesteps:
            eps = self.predict_noise(z, c_img, t, context)
            z = sched.step(eps.float(), t, z, generator=gen, return_dict=False, **extra)[0]
        return z

    def compiled_parts(self) -> list[str]:
        """What `--compile` compiles: the networks every step calls (UNet, ControlNet), the VAE
        halves (reached through encode/decode) and a stage 1 that is a module."""
        parts = ["unet", "controlnet", "vae.encoder", "vae.decoder"]
        return parts + (["stage1"] if isinstance(self.stage1, nn.Module) else [])

    def decode(self, z: Tensor) -> Tensor:
        """VAE decode of z / scaling factor, clamped to [-1, 1]."""
        return self.vae.decode((z / self.scaling_factor).to(self.dtype)).sample.clamp(-1, 1)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Restore Bx3xHxW faces in [-1, 1]; the result has the input's size, device and dtype."""
        m = self.config.size_multiple
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % m or x.shape[3] % m:
            raise InputError(f"DiffBIR restores Bx3xHxW faces with H and W multiples of {m}, not {tuple(x.shape)}")
        x = x.to(self.device, self.dtype)
        cond = self.stage1_image(x)
        restored = self.decode(self.sample(self.encode_condition(cond)))
        return color_fix(restored, cond, COLOR_FIX)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_files(
        cls,
        sd: str | Path,
        controlnet: str | Path,
        stage1: str | Path | Callable[[Tensor], Tensor],
        preset: str = "diffbir_v1",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
        sd_configs: Mapping[str, Mapping[str, Any]] | None = None,
        **settings: Any,
    ) -> DiffBIRRestorer:
        """The restorer from the published files: the SD 2.1 ldm file (or a diffusers folder), an
        IRControlNet file and a face SwinIR file (or any stage-1 callable). `settings` override
        the preset's sampler, steps, eta or seed; `sd_configs` replaces the shipped configs."""
        parts = load_sd21(sd, cache_dir=cache_dir, device=device, dtype=dtype, configs=sd_configs)
        net = load_controlnet(controlnet, _plain(parts.unet.config), device=device, dtype=dtype)
        if isinstance(stage1, (str, Path)):
            from facerestore_cli.models.swinir import load_face_swinir

            stage1 = load_face_swinir(stage1, device=device, dtype=dtype)
        model = cls(
            stage1,
            parts.vae,
            parts.unet,
            net,
            parts.prompt_embeds,
            _with(preset_settings(preset), settings),
            scheduler_config=parts.scheduler_config,
            name=f"diffbir-{preset}",
        )
        return model.to(device=device, dtype=dtype).eval()
