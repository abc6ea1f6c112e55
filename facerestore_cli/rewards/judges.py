"""The LRPO paper's reward judges, each built only from files on disk (nothing is downloaded).

- `DtcwtLowpass`: L1 between the low-pass bands of a dual-tree complex wavelet transform
  (pytorch_wavelets `DTCWTForward`, J = 3, biort `near_sym_b`, qshift `qshift_b`: the LRPO reward
  server's `DWTLoss(lowq=True, highq=False)`), images in [0, 1].
- `LpipsVgg`: LPIPS v0.1 with the VGG16 backbone (the `lpips` package; its linear layers ship in
  the package, the torchvision VGG16 backbone is read from a local file).
- `ClipIqa`: CLIP-IQA's antonym-prompt score ("Good photo." vs "Bad photo.", CLIP RN50 through
  open_clip from a local checkpoint).

A judge that cannot be built raises `JudgeUnavailable` with the reason; the composite reward
decides whether that stops the run.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The reward server's DTCWT (reward_server/reward_loss.py `DWTLoss`).
DTCWT_LEVELS = 3
DTCWT_BIORT = "near_sym_b"
DTCWT_QSHIFT = "qshift_b"
#: CLIP-IQA's antonym prompts (the positive one first) and CLIP's logit scale.
CLIPIQA_PROMPTS = ("Good photo.", "Bad photo.")
CLIP_LOGIT_SCALE = 100.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class JudgeUnavailable(RuntimeError):
    """A judge's package or weights are not here; the message says which."""


def _pkg_resources_shim() -> None:
    """pytorch_wavelets 1.3.0 reads its filter banks with `pkg_resources.resource_stream`, which
    setuptools >= 81 no longer ships; give it the one function it uses, from importlib.resources."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    from importlib.resources import files

    shim = types.ModuleType("pkg_resources")
    shim.resource_stream = lambda package, name: files(package).joinpath(name).open("rb")  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim


class DtcwtLowpass(nn.Module):
    """Per-image mean L1 between the DTCWT low-pass bands of two image batches in [0, 1]."""

    def __init__(self, levels: int = DTCWT_LEVELS) -> None:
        super().__init__()
        if importlib.util.find_spec("pytorch_wavelets") is None:
            raise JudgeUnavailable("needs the pytorch-wavelets package (pip install pytorch-wavelets)")
        _pkg_resources_shim()
        from pytorch_wavelets import DTCWTForward

        self.levels = levels
        self.dtcwt = DTCWTForward(J=levels, biort=DTCWT_BIORT, qshift=DTCWT_QSHIFT)

    def lowpass(self, x: Tensor) -> Tensor:
        self.dtcwt.to(x.device)
        return self.dtcwt(x.float())[0]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (self.lowpass(a) - self.lowpass(b)).abs().flatten(1).mean(1)


def _vgg_features_state(path: Path) -> dict[str, Tensor]:
    """torchvision VGG16 weights (`vgg16-397923af.pth` or its `features` alone) -> {"N.weight": ...}."""
    from safetensors.torch import load_file

    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.") or k.split(".")[0].isdigit()}
    if not feats:
        raise JudgeUnavailable(f"{path}: no VGG16 `features.*` weights in this file")
    return feats


class LpipsVgg(nn.Module):
    """LPIPS v0.1 (VGG) distance of images in [0, 1]; lower is closer."""

    def __init__(self, vgg_weights: str | Path, linear_weights: str | Path | None = None) -> None:
        super().__init__()
        if importlib.util.find_spec("lpips") is None:
            raise JudgeUnavailable("needs the lpips package (pip install lpips)")
        if not vgg_weights:
            raise JudgeUnavailable("no VGG16 backbone file given (lpips_vgg_weights: torchvision's vgg16-397923af.pth)")
        vgg = Path(vgg_weights)
        if not vgg.is_file():
            raise JudgeUnavailable(f"VGG16 backbone file not found: {vgg}")
        if linear_weights and not Path(linear_weights).is_file():
            raise JudgeUnavailable(f"LPIPS linear-layer file not found: {linear_weights}")
        import lpips

        # pnet_rand: build VGG16 without torchvision's download; its weights come from the file below.
        with warnings.catch_warnings():  # torchvision's deprecation notes about lpips's `pretrained=` call
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, model_path=str(linear_weights) if linear_weights else None, verbose=False)
        feats, loaded = _vgg_features_state(vgg), 0
        for part in self.net.net.children():  # its slices keep torchvision's layer indices
            own = {k: feats[k] for k in (f"{i}.{p}" for i, _ in part.named_children() for p in ("weight", "bias")) if k in feats}
            loaded += len(own)
            part.load_state_dict(own, strict=False)
        if loaded != 26:  # VGG16's 13 convolutions, weight and bias each
            raise JudgeUnavailable(f"{vgg}: expected VGG16's 13 convolution layers, found {loaded // 2}")
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, a01: Tensor, b01: Tensor) -> Tensor:
        self.net.to(a01.device)
        return self.net(a01.float() * 2 - 1, b01.float() * 2 - 1).flatten()


class ClipIqa(nn.Module):
    """CLIP-IQA: softmax over 100 x cosine(image, "Good photo." / "Bad photo."), the positive's share.

    `model` has open_clip's `encode_image` / `encode_text`; images are resized to the model's input
    size with CLIP's normalisation (pyiqa keeps the native size by dropping the positional
    embedding; at face sizes of 224-512 px the two agree closely, and resizing needs no model surgery).
    """

    def __init__(self, model: nn.Module, text_tokens: Tensor, image_size: int = 224) -> None:
        super().__init__()
        self.model, self.image_size = model.eval().requires_grad_(False), image_size
        with torch.no_grad():
            self.register_buffer("text", F.normalize(model.encode_text(text_tokens).float(), dim=-1), persistent=False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x01: Tensor) -> Tensor:
        x = F.interpolate(x01.float(), size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        image = F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)
        return (CLIP_LOGIT_SCALE * image @ self.text.T).softmax(-1)[:, 0]


def load_clipiqa(weights: str | Path, arch: str = "RN50-quickgelu") -> ClipIqa:
    """CLIP-IQA on an open_clip checkpoint file (the OpenAI RN50 weights in open_clip's layout)."""
    if importlib.util.find_spec("open_clip") is None:
        raise JudgeUnavailable("needs open_clip (pip install open_clip_torch)")
    if not weights:
        raise JudgeUnavailable("no CLIP checkpoint given (clipiqa_weights: open_clip RN50 OpenAI weights)")
    if not Path(weights).is_file():
        raise JudgeUnavailable(f"CLIP checkpoint not found: {weights}")
    import open_clip

    from facerestore_cli.metrics.external import no_network

    try:
        with no_network():
            model = open_clip.create_model(arch, pretrained=str(weights))
            tokenizer = open_clip.get_tokenizer(arch)
    except Exception as err:  # noqa: BLE001 - any failure means "cannot run here"; say why
        raise JudgeUnavailable(f"open_clip could not load {arch} from {weights}: {type(err).__name__}: {err}") from None
    size = model.visual.image_size
    return ClipIqa(model, tokenizer(list(CLIPIQA_PROMPTS)), size[0] if isinstance(size, (tuple, list)) else int(size))
