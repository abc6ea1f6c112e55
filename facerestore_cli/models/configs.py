"""Named restorer configurations.

A config fully describes the architecture of a `OneStepRestorer`: the kwargs handed to
diffusers' `AutoencoderKL`, `UNet2DConditionModel` and `DDPMScheduler`, the fixed timestep of
the single UNet step, the shape of the learned prompt and the default LoRA ranks. Keeping it
as plain data means it can be written to `restorer_config.json` and compared when a LoRA file
is loaded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from facerestore_cli.errors import InputError

__all__ = ["RestorerConfig", "get_config", "list_configs", "register_config"]

#: A restorer folder's config file (`OneStepRestorer.save_pretrained`), the file that tells it
#: from a Stable Diffusion 2.1 folder.
CONFIG_FILE = "restorer_config.json"

#: Fixed timestep of the one UNet step (OSEDiff uses 999: the input latent is treated as pure noise level).
DEFAULT_TIMESTEP = 999


@dataclass
class RestorerConfig:
    """Architecture of a one-step latent restorer (VAE encoder -> one UNet step -> VAE decoder)."""

    name: str
    face_size: int
    vae: dict[str, Any]
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    timestep: int = DEFAULT_TIMESTEP
    #: UNet calls per restoration: 1 is the one-step restorer; more walks a deterministic DDIM path
    #: from `timestep` to the clean latent (models.sampler), the mode LRPO can tune.
    sampling_steps: int = 1
    #: Decoder up blocks that also read the input's encoder features of their resolution, and
    #: len(up blocks) for the output gate (models.skips); empty for the plain OSEDiff form and
    #: for upstream checkpoints.
    skip_levels: list[int] = field(default_factory=list)
    #: Smaller face crops (pixels, same FFHQ alignment) the model was also trained on (training
    #: `scales`): `restore --face-size auto` restores a face that is small in the image on the
    #: smallest of these that keeps its detail, about (face_size / size)**2 times faster.
    working_sizes: list[int] = field(default_factory=list)
    prompt_tokens: int = 4
    lora_rank_unet: int = 4
    lora_rank_vae: int = 4
    # peft's default alpha (8) is what OSEDiff trained with; LoRA scale = alpha / rank.
    lora_alpha: float = 8.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived values
    @property
    def cross_attention_dim(self) -> int:
        """Width of one prompt token (the UNet's cross-attention input)."""
        return int(self.unet["cross_attention_dim"])

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        """Pixel-to-latent downsampling factor (2 ** (levels - 1))."""
        return 2 ** (len(self.vae.get("block_out_channels", (64,))) - 1)

    @property
    def size_multiple(self) -> int:
        """Face sizes must be multiples of this: the VAE's and the UNet's downsamplings."""
        return self.vae_scale_factor * 2 ** (len(self.unet.get("block_out_channels", (64,))) - 1)

    @property
    def face_sizes(self) -> list[int]:
        """Every crop size the model restores well, smallest first (the full size last)."""
        return sorted(set(self.working_sizes) | {self.face_size})

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.get("prediction_type", "epsilon"))

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RestorerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown restorer config keys: {', '.join(unknown)}")
        return cls(**copy.deepcopy(data))

    def with_overrides(self, name: str | None = None, **changes: Any) -> RestorerConfig:
        """Copy with top-level fields replaced; dict fields (vae/unet/scheduler/extra) are merged key by key.

        Tests use this to shrink a named config without restating it.
        """
        data = copy.deepcopy(asdict(self))
        for key, value in changes.items():
            if key not in data:
                raise InputError(f"unknown restorer config field {key!r}")
            if isinstance(data[key], dict) and isinstance(value, dict):
                data[key].update(copy.deepcopy(value))
            else:
                data[key] = value
        if name is not None:
            data["name"] = name
        return RestorerConfig(**data)

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        lat = self.latent_channels
        if self.unet.get("in_channels", 4) != lat or self.unet.get("out_channels", 4) != lat:
            raise InputError(f"config {self.name!r}: unet in/out channels must equal vae latent_channels ({lat})")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"config {self.name!r}: unsupported prediction_type {self.prediction_type!r}")
        steps = int(self.scheduler.get("num_train_timesteps", 1000))
        if not 0 <= self.timestep < steps:
            raise InputError(f"config {self.name!r}: timestep {self.timestep} outside [0, {steps})")
        if self.prompt_tokens < 1:
            raise InputError(f"config {self.name!r}: prompt_tokens must be >= 1")
        if not 1 <= self.sampling_steps <= self.timestep + 1:
            raise InputError(f"config {self.name!r}: sampling_steps must be between 1 and timestep + 1 ({self.timestep + 1})")
        levels = len(self.vae.get("block_out_channels", (64,)))
        if any(not 0 <= lv <= levels for lv in self.skip_levels) or len(set(self.skip_levels)) != len(self.skip_levels):
            raise InputError(
                f"config {self.name!r}: skip_levels must be distinct decoder up-block indices in 0..{levels - 1}"
                f" (or {levels}: the output gate), not {self.skip_levels}"
            )
        bad = [s for s in self.working_sizes if not 0 < s < self.face_size or s % self.size_multiple]
        if bad:
            raise InputError(
                f"config {self.name!r}: working_sizes must be below face_size ({self.face_size}) and multiples of {self.size_multiple}, not {bad}"
            )
        self._check_groups("vae", self.vae, int(self.vae.get("norm_num_groups", 32)))
        self._check_groups("unet", self.unet, int(self.unet.get("norm_num_groups", 32)))

    def _check_groups(self, part: str, kwargs: dict[str, Any], groups: int) -> None:
        for ch in kwargs.get("block_out_channels", ()):
            if int(ch) % groups:
                raise InputError(f"config {self.name!r}: {part} channels {ch} not divisible by norm_num_groups {groups}")


def _sd_scheduler(prediction_type: str) -> dict[str, Any]:
    """DDPM kwargs of Stable Diffusion's training schedule (scaled_linear 0.00085..0.012)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "prediction_type": prediction_type,
        "steps_offset": 1,
    }


def _tiny() -> RestorerConfig:
    """CPU-sized default, trained from scratch.

    Speed drives the sizes: at 512 px the VAE convs at full/half resolution dominate the cost
    (each decoder level costs about the same FLOPs when channels double as resolution halves),
    so the VAE is (8, 16, 32, 64) wide: ~0.25 s decode on 2 cores instead of ~0.9 s with
    (16, 32, 64, 128). The UNet tops out at 160 channels so its fp16 file stays < 16 MiB.
    """
    return RestorerConfig(
        name="tiny",
        face_size=512,
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 16, 32, 64],
            "layers_per_block": 1,
            "latent_channels": 16,
            "norm_num_groups": 4,
            "mid_block_add_attention": False,
            "sample_size": 512,
            "scaling_factor": 1.0,
        },
        unet={
            "sample_size": 64,
            "in_channels": 16,
            "out_channels": 16,
            "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            "block_out_channels": [64, 128, 160],
            "layers_per_block": 1,
            "cross_attention_dim": 64,
            # diffusers' legacy naming: this is the number of heads (160 / 4 = 40-dim heads).
            "attention_head_dim": 4,
            "norm_num_groups": 16,
            "use_linear_projection": True,
        },
        scheduler=_sd_scheduler("v_prediction"),
        timestep=DEFAULT_TIMESTEP,
        prompt_tokens=4,
        lora_rank_unet=4,
        lora_rank_vae=4,
    )


def _sd21() -> RestorerConfig:
    """Stable Diffusion 2.1-base sizes, as OSEDiff fine-tunes them (LoRA rank 4 on UNet and VAE encoder)."""
    return RestorerConfig(
        name="sd21",
        face_size=512,
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "act_fn": "silu",
            "sample_size": 512,
            "scaling_factor": 0.18215,
        },
        unet={
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        scheduler=_sd_scheduler("epsilon"),
        timestep=DEFAULT_TIMESTEP,
        # CLIP's context length: the prompt embedding replaces the OpenCLIP text encoder output.
        prompt_tokens=77,
        lora_rank_unet=4,
        lora_rank_vae=4,
    )


_REGISTRY: dict[str, RestorerConfig] = {}


def register_config(config: RestorerConfig) -> None:
    """Make a config available by name (e.g. one a training run defines)."""
    _REGISTRY[config.name] = copy.deepcopy(config)


def list_configs() -> list[str]:
    """Names accepted by `get_config`."""
    return sorted(_REGISTRY)


def get_config(name: str | RestorerConfig, **overrides: Any) -> RestorerConfig:
    """A fresh copy of a named config, optionally with `RestorerConfig.with_overrides` changes."""
    if isinstance(name, RestorerConfig):
        base = copy.deepcopy(name)
    else:
        try:
            base = copy.deepcopy(_REGISTRY[name])
        except KeyError:
            raise InputError(f"unknown restorer config {name!r}; known: {', '.join(list_configs())}") from None
    return base.with_overrides(**overrides) if overrides else base


register_config(_tiny())
register_config(_sd21())
