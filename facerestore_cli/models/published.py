"""The published face-restoration models `facerestore models` knows: their files, where each
file comes from, licenses, sizes, and whether a model is installed in the store.

Every fact here comes from ../shared/upstream/SPEC.md (§0, §1.1, §2.1, §3.1, §4.1). No file size
is published upstream, so sizes are computed from parameter counts (fp32, the likely dtype of
every file), and GPU memory is the weights alone: activations come on top. Each upstream file is
described once and shared by every model that uses it, so one download serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from facerestore_cli.errors import InputError
from facerestore_cli.models.model_file import ModelFile, model_file_path

#: The layout (a `checkpoints.LAYOUTS` name) each slot takes, and the slot each layout fills.
SLOT_LAYOUTS: dict[str, str] = {
    "sd": "a Stable Diffusion ldm checkpoint",
    "swinir": "a SwinIR state dict",
    "controlnet": "a DiffBIR ControlNet state dict",
    "osediff": "an OSEDiff checkpoint",
    "frm": "an OpenCLIP / Face Reward Model state dict",
}

SD_LICENSE = "CreativeML Open RAIL++-M"
DIFFBIR_LICENSE = "Apache-2.0"
SEE_UPSTREAM = "see upstream repo"


@dataclass(frozen=True)
class PublishedFile:
    """One upstream file: its slot in a model file, where it is hosted and how big it is.

    `hub_repo` is set for files on the Hugging Face Hub (`models pull` downloads them); `url` is
    the link for the others (Google Drive, a GitHub repository), fetched by hand and imported.
    """

    filename: str
    slot: str
    hub_repo: str | None
    url: str | None
    params: int
    license: str
    mirrors: tuple[str, ...] = ()

    @property
    def layout(self) -> str:
        return SLOT_LAYOUTS[self.slot]

    @property
    def size_gb(self) -> float:
        """Approximate file size: parameters × 4 bytes (fp32), as no size is published."""
        return self.params * 4 / 1e9

    @property
    def source(self) -> str:
        """Where it comes from, in a few words."""
        if self.hub_repo:
            return f"HF {self.hub_repo}"
        if self.url and "drive.google.com" in self.url:
            return "Google Drive"
        if self.url and "github.com" in self.url:
            return "GitHub " + "/".join(self.url.split("/")[3:5])
        return self.url or "unknown"

    @property
    def link(self) -> str:
        """A link a person can open in a browser."""
        if self.hub_repo:
            return f"https://huggingface.co/{self.hub_repo}/blob/main/{self.filename}"
        return self.url or ""


@dataclass(frozen=True)
class PublishedModel:
    """A model as its paper published it: the model-file kind and one file per slot."""

    name: str
    paper: str
    kind: str
    description: str
    files: tuple[PublishedFile, ...]
    #: The sampler its paper restores with (models.diffbir.PRESETS), for diffbir-v1 models.
    preset: str | None = None

    def file(self, slot: str) -> PublishedFile:
        return next(f for f in self.files if f.slot == slot)

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(f.slot for f in self.files)

    @property
    def params(self) -> int:
        return sum(f.params for f in self.files)

    def gpu_memory_gb(self, bytes_per_param: int) -> float:
        """GPU memory for the weights alone at 2 (fp16/bf16) or 4 (fp32) bytes a parameter."""
        return self.params * bytes_per_param / 1e9

    @property
    def gpu_memory(self) -> str:
        return f"{self.gpu_memory_gb(2):.1f} GB fp16, {self.gpu_memory_gb(4):.1f} GB fp32"


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


# Parameter counts: SPEC §0 (SD 2.1-base: UNet + VAE + OpenCLIP text), §2.1/§2.2 (the IRControlNet,
# shared by DiffBIR, DiffusionReward and LRPO), §2.4 (SwinIR), §1.1 (OSEDiff's stored LoRA
# tensors), §3.3 (the Face Reward Model).
SD21_PARAMS = 865_910_724 + 83_653_863 + 354_032_641
CONTROLNET_PARAMS = 363_153_280
SWINIR_PARAMS = 15_792_587
OSEDIFF_PARAMS = 4_436_908
FRM_PARAMS = 986_109_441

SD21 = PublishedFile("v2-1_512-ema-pruned.ckpt", "sd", "wubin1928/BFR_RL", None, SD21_PARAMS, SD_LICENSE)
SWINIR_FACE = PublishedFile(
    "face_swinir_v1.ckpt", "swinir", "lxq007/DiffBIR", None, SWINIR_PARAMS, SEE_UPSTREAM, mirrors=("HF wubin1928/BFR_RL",)
)
V1_FACE = PublishedFile(
    "v1_face.pth", "controlnet", "lxq007/DiffBIR-v2", None, CONTROLNET_PARAMS, DIFFBIR_LICENSE, mirrors=("HF wubin1928/BFR_RL",)
)
DIFFBIR_REFL = PublishedFile(
    "diffbir_refl.pt", "controlnet", None, _drive("1jLZP_NGxKcfhjN8rJXcbtBGXTin4vo3x"), CONTROLNET_PARAMS, SEE_UPSTREAM
)
LRPO_FIDELITY = PublishedFile("lrpo_fidelity.pth", "controlnet", "wubin1928/BFR_RL", None, CONTROLNET_PARAMS, SEE_UPSTREAM)
LRPO_PERCEPTION = PublishedFile("lrpo_perception.pth", "controlnet", "wubin1928/BFR_RL", None, CONTROLNET_PARAMS, SEE_UPSTREAM)
FRM_FILE = PublishedFile(
    "FaceRewardModel.pth",
    "frm",
    "wubin1928/BFR_RL",
    None,
    FRM_PARAMS,
    SEE_UPSTREAM,
    mirrors=("Google Drive " + _drive("1ugATjemF-70b4N1dQrQJ8J1cdmiVeqOR"),),
)
OSEDIFF_FACE = PublishedFile(
    "osediff_face.pkl",
    "osediff",
    None,
    "https://github.com/cswry/OSEDiff/blob/main/preset/models/osediff_face.pkl",
    OSEDIFF_PARAMS,
    SEE_UPSTREAM,
)

PUBLISHED: tuple[PublishedModel, ...] = (
    PublishedModel(
        "osediff-face", "OSEDiff (Wu et al. 2024)", "osediff", "one-step SD 2.1 LoRA restorer, face model", (SD21, OSEDIFF_FACE)
    ),
    PublishedModel(
        "diffbir-v1-face",
        "DiffBIR (Lin et al. 2023)",
        "diffbir-v1",
        "SwinIR + SD 2.1 + IRControlNet, 50 steps",
        (SD21, SWINIR_FACE, V1_FACE),
        "diffbir_v1",
    ),
    PublishedModel(
        "diffusionreward",
        "DiffusionReward (2025)",
        "diffbir-v1",
        "DiffBIR ControlNet fine-tuned with ReFL",
        (SD21, SWINIR_FACE, DIFFBIR_REFL),
        "diffusionreward",
    ),
    PublishedModel(
        "lrpo-fidelity",
        "LRPO (2025)",
        "diffbir-v1",
        "DiffBIR ControlNet after LRPO, fidelity-oriented",
        (SD21, SWINIR_FACE, LRPO_FIDELITY),
        "lrpo",
    ),
    PublishedModel(
        "lrpo-perception",
        "LRPO (2025)",
        "diffbir-v1",
        "LRPO without likelihood regularisation",
        (SD21, SWINIR_FACE, LRPO_PERCEPTION),
        "lrpo",
    ),
    PublishedModel("face-reward-model", "DiffusionReward (2025)", "frm", "Face Reward Model for score / refl / lrpo", (FRM_FILE,)),
)


def published_model(name: str) -> PublishedModel:
    """The published model called `name`; a one-line InputError listing the names otherwise."""
    for model in PUBLISHED:
        if model.name == name:
            return model
    raise InputError(f"no published model {name!r}; known: {', '.join(m.name for m in PUBLISHED)}")


@dataclass(frozen=True)
class InstallState:
    """Whether a model's file is in the store, and which of its files are gone since."""

    installed: bool
    missing: tuple[str, ...] = ()
    error: str | None = None

    @property
    def text(self) -> str:
        if self.error:
            return f"broken: {self.error}"
        if not self.installed:
            return "no"
        if self.missing:
            return "files gone: " + ", ".join(self.missing)
        return "yes"


def install_state(name: str) -> InstallState:
    """Read `<store>/models/<name>.toml` without loading any weights."""
    path = model_file_path(name)
    if not path.is_file():
        return InstallState(False)
    try:
        model = ModelFile.read(path)
    except InputError as err:
        return InstallState(True, error=str(err))
    return InstallState(True, tuple(model.missing_slots()))


def installed_models() -> dict[str, Path]:
    """The published models with a model file in the store, by name."""
    return {m.name: model_file_path(m.name) for m in PUBLISHED if model_file_path(m.name).is_file()}


#: A diffusers Stable Diffusion folder, which the `sd` slot also takes (SPEC §0).
DIFFUSERS_SD = "a diffusers Stable Diffusion folder"


def identify(path: Path) -> tuple[str | None, str]:
    """The slot a file fills by its layout, and what it looks like (for the message when it fills none).

    The keys are read memory-mapped (`checkpoints.load_file`), so a multi-gigabyte checkpoint is
    classified without reading its tensors. `controlnet.`-prefixed keys, which BFR_RL's loader
    keeps alone with the prefix stripped (SPEC §4.2), are looked at that way.
    """
    if path.is_dir():
        if (path / "unet").is_dir() and (path / "vae").is_dir():
            return "sd", DIFFUSERS_SD
        return None, "a folder that is no diffusers Stable Diffusion folder (no unet/ and vae/)"
    from facerestore_cli.models.checkpoints import describe_layout, load_file, unwrap_state_dict

    keys = list(unwrap_state_dict(load_file(path, "import")))
    if any(k.startswith("controlnet.") for k in keys):
        keys = [k[len("controlnet.") :] for k in keys if k.startswith("controlnet.")]
    found = describe_layout(keys)
    slot = next((s for s, layout in SLOT_LAYOUTS.items() if found.startswith(layout)), None)
    return slot, found


def not_installed_hint(value: str) -> str | None:
    """For a `--model` value that names a published model not yet installed: what to run.

    `resolve_model_value` gives None for such a name; a caller that then finds no folder of
    that name can add this to its error instead of a bare "no such folder".
    """
    if any(m.name == value for m in PUBLISHED) and not model_file_path(value).is_file():
        return f"{value} is a published model that is not installed; run `facerestore models pull {value}`"
    return None
