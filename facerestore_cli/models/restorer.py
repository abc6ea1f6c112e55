"""One-step latent diffusion restorer in OSEDiff form.

    x (Bx3xHxW, [-1, 1]) --VAE encoder--> z --UNet at one fixed timestep--> z0 --VAE decoder--> x'

The degraded image's latent is treated as the noisy latent at timestep `config.timestep`; the
UNet's prediction is converted to the clean latent with the diffusion formula for its
`prediction_type`. LoRA (peft) can be put on the UNet and on the VAE *encoder* only, as OSEDiff
does: the decoder must keep producing the base model's image distribution.

On-disk layout (`save_pretrained`) mirrors a diffusers Stable Diffusion folder so SD-derived
weights drop in::

    restorer_config.json  vae/  unet/  scheduler/  prompt_embeds.safetensors  [skip_fusion.safetensors]

The optional skip fusion (`config.skip_levels`, models.skips) lets the decoder read the input's
encoder features as well as the restored latent, so identity survives the small latent.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from facerestore_cli.errors import InputError, MissingFileError
from facerestore_cli.models.configs import CONFIG_FILE, RestorerConfig, get_config
from facerestore_cli.models.lora import (
    LORA_FORMAT,
    LORA_META_KEY,
    LoraMismatchError,
    read_lora_metadata,
    unet_lora_target_groups,
    vae_encoder_lora_targets,
)
from facerestore_cli.models.sampler import restore_latent
from facerestore_cli.models.skips import SkipFusion, Skips, decode_fused, encode_moments

__all__ = [
    "CONFIG_FILE",
    "LORA_FORMAT",
    "LoraMismatchError",
    "OneStepRestorer",
    "PROMPT_FILE",
    "architecture_fingerprint",
    "count_parameters",
    "read_lora_metadata",
    "unet_lora_target_groups",
    "vae_encoder_lora_targets",
]

PROMPT_FILE = "prompt_embeds.safetensors"
SKIP_FILE = "skip_fusion.safetensors"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------ helpers


def _plain_config(config: Any) -> dict[str, Any]:
    """A diffusers FrozenDict config without bookkeeping keys, JSON-normalised."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def architecture_fingerprint(restorer: OneStepRestorer) -> str:
    """Hash of the effective vae/unet/scheduler configs + timestep + prompt shape.

    Uses the instantiated modules' full configs (defaults filled in), so a named config and a
    folder loaded from disk with the same architecture hash the same.
    """
    import hashlib

    arch = {
        "vae": _plain_config(restorer.vae.config),
        "unet": _plain_config(restorer.unet.config),
        "scheduler": _plain_config(restorer.scheduler.config),
        "timestep": restorer.config.timestep,
        "prompt": list(restorer.prompt_embeds.shape[1:]),
    }
    if restorer.config.skip_levels:  # absent otherwise, so fingerprints of plain models do not change
        arch["skip_levels"] = list(restorer.config.skip_levels)
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def load_diffusers_parts(root: Path, torch_dtype: torch.dtype | None = None) -> tuple[AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    """vae/, unet/ and scheduler/ of a diffusers-layout folder (ours or Stable Diffusion's), offline.

    SD ships a PNDM scheduler config; DDPMScheduler takes the same beta schedule and ignores the rest.
    """
    kw: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    vae = AutoencoderKL.from_pretrained(root / "vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", **kw)
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
    return vae, unet, scheduler


def _read_config(path: Path) -> RestorerConfig:
    """A model folder's restorer config; a broken file is the user's to fix, not a traceback."""
    try:
        return RestorerConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err})") from None


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}")


# ------------------------------------------------------------------------------------ model
class OneStepRestorer(nn.Module):
    """VAE encoder -> one UNet step at a fixed timestep -> VAE decoder, on [-1, 1] images."""

    takes_any_size = True  # fully convolutional: any multiple of the VAE's downsampling

    def __init__(
        self,
        config: RestorerConfig,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        prompt_embeds: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler
        if prompt_embeds is None:
            # Unit scale like a layer-normed text-encoder output, which cross-attention expects.
            prompt_embeds = torch.randn(1, config.prompt_tokens, config.cross_attention_dim)
        if prompt_embeds.dim() == 2:
            prompt_embeds = prompt_embeds[None]
        self._check_prompt_shape(prompt_embeds)
        self.prompt_embeds = nn.Parameter(prompt_embeds.detach().clone())
        #: OSEDiff samples the VAE posterior while training; inference uses its mode (deterministic).
        self.sample_posterior = False
        #: adapter name -> {"part", "rank", "alpha", "targets"} for every LoRA adapter added.
        self.lora_adapters: dict[str, dict[str, Any]] = {}
        #: base modules trained in full next to LoRA (OSEDiff trains unet.conv_in); saved by save_lora.
        self.full_trained_modules: list[str] = []
        self.skip_fusion = SkipFusion(config.vae, config.skip_levels) if config.skip_levels else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: RestorerConfig | str) -> OneStepRestorer:
        """Randomly initialised model of a named or given config."""
        cfg = get_config(config)
        vae = AutoencoderKL(**cfg.vae)
        unet = UNet2DConditionModel(**cfg.unet)
        scheduler = DDPMScheduler(**cfg.scheduler)
        return cls(cfg, vae, unet, scheduler)

    def _check_prompt_shape(self, prompt_embeds: Tensor) -> None:
        want = (1, self.config.prompt_tokens, self.config.cross_attention_dim)
        if tuple(prompt_embeds.shape) != want:
            raise ValueError(f"prompt_embeds shape {tuple(prompt_embeds.shape)} != expected {want}")

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_embeds.dtype

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (VAE factor x UNet downsampling)."""
        unet_levels = len(self.unet.config.block_out_channels) - 1
        return self.config.vae_scale_factor * 2**unet_levels

    # ------------------------------------------------------------------ the restoration step
    def encode(self, x: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Image in [-1, 1] -> scaled latent (posterior mode, or a sample when training)."""
        return self.encode_with_skips(x, sample, generator)[0]

    def encode_with_skips(
        self, x: Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Skips | None]:
        """The scaled latent and, with skip fusion, the encoder features `decode` fuses (else None)."""
        x = x.to(self.vae.dtype)
        if self.skip_fusion is None:
            dist, skips = self.vae.encode(x).latent_dist, None
        else:
            moments, skips = encode_moments(self.vae, x)
            dist = DiagonalGaussianDistribution(moments)
        use_sample = self.sample_posterior if sample is None else sample
        z = dist.sample(generator) if use_sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor, skips

    def unet_output(self, z_t: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """Raw UNet prediction (epsilon / v / x0 depending on the config) for latents z_t."""
        t = self._timesteps(z_t.shape[0], timestep, z_t.device)
        context = self.prompt_embeds.expand(z_t.shape[0], -1, -1).to(self.unet.dtype)
        return self.unet(z_t.to(self.unet.dtype), t, encoder_hidden_states=context).sample

    def denoise_latent(self, z: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """One UNet step: degraded latent (read as z_t at the fixed timestep) -> clean latent."""
        t = self._timesteps(z.shape[0], timestep, z.device)
        return self.predict_x0(z, t, self.unet_output(z, t))

    def predict_x0(self, z_t: Tensor, t: int | Tensor, model_out: Tensor) -> Tensor:
        """Clean latent from the UNet output at timestep(s) t, for any prediction_type.

        With a = alphas_cumprod[t] and z_t = sqrt(a) x0 + sqrt(1 - a) eps:
          epsilon:      x0 = (z_t - sqrt(1 - a) eps) / sqrt(a)
          v_prediction: x0 = sqrt(a) z_t - sqrt(1 - a) v       (v = sqrt(a) eps - sqrt(1 - a) x0)
          sample:       x0 = model_out
        """
        kind = self.config.prediction_type
        if kind == "sample":
            return model_out
        a = self.alpha_bar(t, z_t.shape[0], z_t.device)
        zf, of = z_t.float(), model_out.float()
        if kind == "epsilon":
            x0 = (zf - (1 - a).sqrt() * of) / a.sqrt()
        elif kind == "v_prediction":
            x0 = a.sqrt() * zf - (1 - a).sqrt() * of
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        return x0.to(model_out.dtype)

    def decode(self, z0: Tensor, clamp: bool = True, skips: Skips | None = None) -> Tensor:
        """Scaled clean latent -> image; clamped to [-1, 1] unless a loss wants the raw output.

        `skips` (from `encode_with_skips` of the degraded input) feed the skip fusion; without
        them the plain decoder runs (a latent with no input image, e.g. a ground truth's)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = (z0 / self.vae.config.scaling_factor + shift).to(self.vae.dtype)
        if self.skip_fusion is not None and skips is not None:
            x = decode_fused(self.vae, z, self.skip_fusion, skips)
        else:
            x = self.vae.decode(z).sample
        return x.clamp(-1, 1) if clamp else x

    def restore_one_step(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The single step as training sees it: (clean latent, unclamped image), skips included.
        Unclamped because a clamp would stop gradients at the limits."""
        z, skips = self.encode_with_skips(x)
        z0 = self.denoise_latent(z)
        return z0, self.decode(z0, clamp=False, skips=skips)

    def add_skip_fusion(self, levels: list[int]) -> None:
        """Give a finished restorer fresh (zero: output unchanged) skip fusion at these levels;
        a model with fusion already gets the levels it lacks, trained ones are kept."""
        have = list(self.config.skip_levels)
        if set(have) - set(levels):
            raise InputError(f"skip_levels {sorted(levels)}: the model has skip fusion at {have}, which cannot be removed")
        new = [lv for lv in levels if lv not in have]
        if not new:
            return
        self.config.skip_levels = have + new
        self.config.validate()
        fresh = SkipFusion(self.config.vae, self.config.skip_levels).to(device=self.device, dtype=self.dtype)
        if self.skip_fusion is not None:
            fresh.load_state_dict(self.skip_fusion.state_dict(), strict=False)
        self.skip_fusion = fresh

    def forward(self, x: Tensor) -> Tensor:
        """Restore Bx3xHxW images in [-1, 1]; sides are reflect-padded to `size_multiple` and cropped back.

        `config.sampling_steps` > 1 (a model tuned by LRPO in few-step mode) walks the sampler's
        deterministic path (models.sampler) instead of the single step."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected Bx3xHxW input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        x = self._pad(x)
        z, skips = self.encode_with_skips(x)
        out = self.decode(restore_latent(self, z, self.config.sampling_steps), skips=skips)
        return out[..., :h, :w]

    def _pad(self, x: Tensor) -> Tensor:
        m = self.size_multiple
        ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
        if not (ph or pw):
            return x
        mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def _timesteps(self, batch: int, timestep: int | Tensor | None, device: torch.device) -> Tensor:
        t = self.config.timestep if timestep is None else timestep
        t = torch.as_tensor(t, device=device, dtype=torch.long)
        return t.expand(batch) if t.dim() == 0 else t

    def alpha_bar(self, t: int | Tensor, batch: int, device: torch.device) -> Tensor:
        """alphas_cumprod[t] in float32 shaped Bx1x1x1 (kept float32 even for fp16 models)."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        a = self.scheduler.alphas_cumprod.float()[t].to(device)
        return a.expand(batch).reshape(-1, 1, 1, 1) if a.numel() == 1 else a.reshape(-1, 1, 1, 1)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the diffusers-style folder; `dtype` casts the saved weights only (e.g. fp16)."""
        if self.lora_adapters:
            raise RuntimeError("model has unmerged LoRA adapters: call merge_lora() first, or save_lora()")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        for name, module in (("vae", self.vae), ("unet", self.unet)):
            sub = out / name
            module.save_config(sub)
            save_file(_cast_state(module.state_dict(), dtype), str(sub / WEIGHTS_NAME), metadata={"format": "pt"})
        self.scheduler.save_config(out / "scheduler")
        prompt = self.prompt_embeds.detach().to(dtype or self.prompt_embeds.dtype).cpu().contiguous()
        save_file({"prompt_embeds": prompt}, str(out / PROMPT_FILE))
        if self.skip_fusion is not None:
            save_file(_cast_state(self.skip_fusion.state_dict(), dtype), str(out / SKIP_FILE))
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> OneStepRestorer:
        """Load a `save_pretrained` folder (a Stable Diffusion 2.1 folder: `models.loading`)."""
        root = Path(directory)
        _check_folder(root, "model folder")
        if not (root / CONFIG_FILE).is_file():
            raise MissingFileError(f"{root} is not a restorer folder (no {CONFIG_FILE})")
        config = _read_config(root / CONFIG_FILE)
        for part in ("vae", "unet", "scheduler", PROMPT_FILE):
            _check_folder(root / part, f"'{part}' of restorer folder")
        vae, unet, scheduler = load_diffusers_parts(root, torch_dtype)
        prompt = load_file(str(root / PROMPT_FILE))["prompt_embeds"].float()
        model = cls(config, vae, unet, scheduler, prompt)
        if model.skip_fusion is not None:
            _check_folder(root / SKIP_FILE, "skip fusion weights of restorer folder")
            model.skip_fusion.load_state_dict({k: v.float() for k, v in load_file(str(root / SKIP_FILE)).items()})
        return model.to(device=device, dtype=torch_dtype or vae.dtype).eval()

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self,
        rank_unet: int | None = None,
        rank_vae: int | None = None,
        adapter_name: str = "default",
        alpha: float | None = None,
        train_conv_in: bool = False,
    ) -> None:
        """Add a LoRA adapter to the UNet and the VAE encoder (rank 0 skips a part).

        Ranks default to the config's; `alpha` to `config.lora_alpha` (scale = alpha / rank).
        `train_conv_in` marks unet.conv_in for full training, as OSEDiff does; it is then saved
        by `save_lora` alongside the LoRA weights.
        """
        rank_unet = self.config.lora_rank_unet if rank_unet is None else rank_unet
        rank_vae = self.config.lora_rank_vae if rank_vae is None else rank_vae
        alpha = self.config.lora_alpha if alpha is None else alpha
        if rank_unet > 0:
            targets = [n for group in unet_lora_target_groups(self.unet).values() for n in group]
            self._add_adapter("unet", adapter_name, rank_unet, alpha, targets)
        if rank_vae > 0:
            self._add_adapter("vae", adapter_name, rank_vae, alpha, vae_encoder_lora_targets(self.vae))
        if train_conv_in and "unet.conv_in" not in self.full_trained_modules:
            self.full_trained_modules.append("unet.conv_in")

    def _add_adapter(self, part: str, name: str, rank: int, alpha: float, targets: list[str]) -> None:
        """Inject one peft LoRA adapter into self.<part> and keep every adapter of it active."""
        from peft import LoraConfig

        key = f"{part}:{name}"
        if key in self.lora_adapters:
            raise ValueError(f"LoRA adapter {name!r} already exists on the {part}")
        if not targets:
            raise ValueError(f"no LoRA target layers found in the {part}")
        module = getattr(self, part)
        # OSEDiff initialises with "gaussian": A ~ N(0, 1/r), B = 0, so the model starts unchanged.
        cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
        with warnings.catch_warnings():  # peft warns on every adapter after the first; several are intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            module.add_adapter(cfg, adapter_name=name)
        self.lora_adapters[key] = {"part": part, "name": name, "rank": rank, "alpha": alpha, "targets": list(targets)}
        module.set_adapter(self._adapter_names(part))

    def _adapter_names(self, part: str) -> list[str]:
        return [info["name"] for info in self.lora_adapters.values() if info["part"] == part]

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[OneStepRestorer]:
        """Run the frozen base: every LoRA adapter of the UNet and VAE switched off, then back on
        (ReFL's regulariser compares the tuned model with it)."""
        parts = [getattr(self, p) for p in ("unet", "vae") if self._adapter_names(p)]
        for part in parts:
            part.disable_adapters()
        try:
            yield self
        finally:
            for part in parts:
                part.enable_adapters()

    def lora_parameters(self) -> list[nn.Parameter]:
        """LoRA weights (plus fully trained base modules such as conv_in, if marked) for an optimizer."""
        params = [p for n, p in self.named_parameters() if ".lora_" in n]
        return params + [p for _, p in self._full_trained_params()]

    def freeze_base(self) -> None:
        """Train only the LoRA weights (and full-trained modules): everything else stops needing grads."""
        self.requires_grad_(False)
        for p in self.lora_parameters():
            p.requires_grad_(True)

    def _full_trained_params(self) -> list[tuple[str, nn.Parameter]]:
        prefixes = tuple(m + "." for m in self.full_trained_modules)
        return [(n, p) for n, p in self.named_parameters() if n.startswith(prefixes) and ".lora_" not in n]

    def lora_state_dict(self) -> dict[str, Tensor]:
        """LoRA (and full-trained) weights keyed `<part>.<module>.lora_A.<adapter>.weight`."""
        state = {}
        for part in ("unet", "vae"):
            for n, t in getattr(self, part).state_dict().items():
                if ".lora_" in n:
                    state[f"{part}.{n}"] = t
        for n, p in self._full_trained_params():
            state[n] = p.data
        return state

    def save_lora(self, path: str | Path, base: str | None = None) -> Path:
        """One safetensors file; the JSON metadata (ranks, targets, config, and the `--model` value
        of the `base` it was tuned on) lives in its header."""
        if not self.lora_adapters:
            raise RuntimeError("model has no LoRA adapters to save (call add_lora first)")
        meta = {
            "format": LORA_FORMAT,
            "config_name": self.config.name,
            "fingerprint": architecture_fingerprint(self),
            "rank_unet": self._rank_of("unet"),
            "rank_vae": self._rank_of("vae"),
            "adapters": list(self.lora_adapters.values()),
            "full_trained_modules": list(self.full_trained_modules),
            # A LoRA tuned in few-step mode (LRPO) restores in that mode wherever it is applied.
            "sampling_steps": self.config.sampling_steps,
            **({"base": str(base)} if base is not None else {}),
        }
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.lora_state_dict().items()}
        save_file(tensors, str(out), metadata={LORA_META_KEY: json.dumps(meta)})
        return out

    def _rank_of(self, part: str) -> int:
        return max((i["rank"] for i in self.lora_adapters.values() if i["part"] == part), default=0)

    def load_lora(self, path: str | Path) -> None:
        """Add the adapters described in a `save_lora` file and load their weights (and the
        sampling steps it was tuned with).

        Raises LoraMismatchError when the file was made for another config or architecture.
        """
        src = Path(path)
        _check_folder(src, "LoRA file")
        meta = read_lora_metadata(src)
        self._check_lora_meta(meta, src)
        for info in meta["adapters"]:
            key = f"{info['part']}:{info['name']}"
            if key in self.lora_adapters:
                have = self.lora_adapters[key]
                if have["targets"] != info["targets"] or have["rank"] != info["rank"]:
                    raise LoraMismatchError(f"{src}: adapter {key} exists with different rank/targets")
                continue
            self._add_adapter(info["part"], info["name"], int(info["rank"]), float(info["alpha"]), info["targets"])
        for m in meta.get("full_trained_modules", []):
            if m not in self.full_trained_modules:
                self.full_trained_modules.append(m)
        self._copy_weights(load_file(str(src)), src)
        self.config.sampling_steps = int(meta.get("sampling_steps", self.config.sampling_steps))

    def _check_lora_meta(self, meta: dict[str, Any], src: Path) -> None:
        if meta.get("config_name") != self.config.name:
            raise LoraMismatchError(f"{src} was made for config '{meta.get('config_name')}', this model is '{self.config.name}'")
        if meta.get("fingerprint") != architecture_fingerprint(self):
            raise LoraMismatchError(f"{src} was made for a different '{self.config.name}' architecture (fingerprint mismatch)")

    def _copy_weights(self, tensors: dict[str, Tensor], src: Path) -> None:
        own = dict(self.named_parameters())
        wanted = {n for n in own if ".lora_" in n} | {n for n, _ in self._full_trained_params()}
        missing = sorted(wanted - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise LoraMismatchError(
                f"{src}: {len(missing)} missing / {len(unexpected)} unexpected tensors (e.g. {(missing or unexpected)[0]})"
            )
        with torch.no_grad():
            for n, t in tensors.items():
                if own[n].shape != t.shape:
                    raise LoraMismatchError(f"{src}: {n} has shape {tuple(t.shape)}, model {tuple(own[n].shape)}")
                own[n].copy_(t.to(own[n].dtype))

    def merge_lora(self) -> None:
        """Fuse every adapter into the base weights and drop the peft wrappers (zero inference cost)."""
        for part in ("unet", "vae"):
            names = self._adapter_names(part)
            if not names:
                continue
            module = getattr(self, part)
            module.fuse_lora(adapter_names=names)
            module.unload_lora()
        self.lora_adapters.clear()
        self.full_trained_modules.clear()


def _cast_state(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Detached contiguous CPU copies, floating tensors cast to `dtype` when given."""
    out = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.cpu().contiguous()
    return out


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (for reports)."""
    return sum(p.numel() for p in module.parameters())
