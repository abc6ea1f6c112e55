"""`restore --model` with published models, end to end on the CPU: model files naming tiny files
in the exact upstream layouts (ldm SD checkpoint, flat IRControlNet, SwinIR), loaded through the
one model loader with the shipped configs swapped for tiny ones."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import assert_images_close, face_like
from test_diffbir import tiny_models, write_tiny_files
from test_swinir import tiny_model as tiny_swinir
from upstream_fakes import tiny_sd_models, write_ldm_file, write_osediff_pkl

from facerestore_cli.cli import main
from facerestore_cli.models.diffbir import PRESETS
from facerestore_cli.models.loading import load_restorer
from facerestore_cli.models.lora import read_lora_metadata

pytestmark = pytest.mark.usefixtures("tiny_published_configs")

FACE = 64  # a multiple of 64, as DiffBIR pads to; tiny models keep a step in milliseconds


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    paths = write_tiny_files(root, tiny_models())
    paths["swinir"] = root / "face_swinir_v1.ckpt"
    torch.save({"state_dict": tiny_swinir().state_dict()}, paths["swinir"])
    sd = tiny_sd_models()
    write_osediff_pkl(root / "osediff_face.pkl", sd["unet"], sd["vae"])
    paths["osediff_sd"], paths["osediff"] = write_ldm_file(root / "sd_for_osediff.ckpt", sd), root / "osediff_face.pkl"
    return paths


def model_file(path: Path, files: dict[str, Path], preset: str | None = None) -> Path:
    lines = ['kind = "diffbir-v1"', f'sd = "{files["sd"]}"', f'swinir = "{files["swinir"]}"', f'controlnet = "{files["controlnet"]}"']
    path.write_text("\n".join(lines + ([f'preset = "{preset}"'] if preset else [])) + "\n")
    return path


def restore(tmp_path: Path, out: str, *options: str) -> tuple[int, str, np.ndarray | None]:
    face = tmp_path / "face.png"
    if not face.exists():
        cv2.imwrite(str(face), face_like(FACE, 3))
    result = CliRunner().invoke(
        main, ["restore", str(face), "-o", str(tmp_path / out), "--aligned", "--face-size", str(FACE), "--device", "cpu", *options]
    )
    image = cv2.imread(str(tmp_path / out / "face.png"))
    return result.exit_code, result.output, image


def test_restore_with_a_diffbir_model_file_and_the_same_seed(files: dict[str, Path], tmp_path: Path) -> None:
    model = model_file(tmp_path / "refl.toml", files, preset="diffusionreward")
    code, output, first = restore(tmp_path, "a", "--model", str(model), "--steps", "2", "--seed", "7")
    assert code == 0, output
    assert first is not None and first.shape == (FACE, FACE, 3)
    _, _, again = restore(tmp_path, "b", "--model", str(model), "--steps", "2", "--seed", "7")
    _, _, other = restore(tmp_path, "c", "--model", str(model), "--steps", "2", "--seed", "8")
    assert np.array_equal(first, again), "the same --seed must give the same output"
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 0.5, "another seed draws other noise"


def test_model_file_presets_are_the_papers(files: dict[str, Path], tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    plain = load_restorer(model_file(tmp_path / "v1.toml", files), None, cpu, torch.float32)
    refl = load_restorer(model_file(tmp_path / "refl.toml", files, "diffusionreward"), None, cpu, torch.float32)
    tuned = load_restorer(model_file(tmp_path / "lrpo.toml", files, "lrpo"), None, cpu, torch.float32, sampling={"steps": 10})
    assert plain.settings == PRESETS["diffbir_v1"] and refl.settings == PRESETS["diffusionreward"]
    assert tuned.settings.eta == 0.8 and tuned.settings.steps == 10 and tuned.settings.seed == 232
    assert plain.default_color_fix == "none", "DiffBIR fixes colours against its stage 1 itself"


def test_restore_with_an_osediff_model_file_and_the_ldm_file(files: dict[str, Path], tmp_path: Path) -> None:
    """OSEDiff from the SD ldm single file and its pkl, by model file and by --model/--osediff:
    the same one-step restorer either way."""
    (tmp_path / "osediff.toml").write_text(f'kind = "osediff"\nsd = "{files["osediff_sd"]}"\nosediff = "{files["osediff"]}"\n')
    code, output, by_file = restore(tmp_path, "a", "--model", str(tmp_path / "osediff.toml"))
    assert code == 0, output
    code, output, by_options = restore(tmp_path, "b", "--model", str(files["osediff_sd"]), "--osediff", str(files["osediff"]))
    assert code == 0, output
    assert by_file is not None and by_file.shape == (FACE, FACE, 3)
    # two loading paths merge the same LoRA into the same SD: the same restorer up to float rounding
    assert_images_close([by_options], [by_file], what="--model SD --osediff PKL against the model file")
    face = cv2.imread(str(tmp_path / "face.png"))
    assert np.abs(by_file.astype(int) - face.astype(int)).mean() > 1, "the random tiny model changes the face"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--lora", "{lora}"], "--lora is for one-step models"),
        (["--backend", "onnx"], "is a published model"),
        (["--eta", "0.5"], "eta applies to the ddim sampler only"),
    ],
)
def test_options_a_diffbir_model_refuses(files: dict[str, Path], tmp_path: Path, options: list[str], says: str) -> None:
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    model = model_file(tmp_path / "v1.toml", files)
    code, output, _ = restore(tmp_path, "out", "--model", str(model), *[o.format(lora=lora) for o in options])
    assert code == 2 and says in output and "Traceback" not in output, output


def test_a_one_step_model_refuses_sampling_options(tmp_path: Path) -> None:
    code, output, _ = restore(tmp_path, "out", "--steps", "3")
    assert code == 2 and "--steps is for multi-step models" in output


def test_a_reward_model_file_is_not_a_restorer(tmp_path: Path) -> None:
    frm = tmp_path / "FaceRewardModel.pth"
    frm.write_bytes(b"x")
    (tmp_path / "frm.toml").write_text(f'kind = "frm"\nfrm = "{frm}"\n')
    code, output, _ = restore(tmp_path, "out", "--model", str(tmp_path / "frm.toml"))
    assert code == 2 and "Face Reward Model, not a restorer" in output


def test_a_published_name_not_installed_says_what_to_run(tmp_path: Path) -> None:
    code, output, _ = restore(tmp_path, "out", "--model", "lrpo-fidelity")
    assert code == 2 and "facerestore models pull lrpo-fidelity" in output


def test_bf16_diffbir_overflow_is_redone_with_the_fp32_decoder(files: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """The fp16/bf16 NaN guard covers DiffBIR models too: a decoder that overflows in low precision
    (as SD VAEs do in fp16) is moved to fp32 with one warning, and the faces come out finite."""
    from test_fast_paths import nan_when_low

    from facerestore_cli.restore.face_restorer import load_restore_model
    from facerestore_cli.restore.options import ModelChoice

    warnings: list[str] = []
    choice = ModelChoice(model=model_file(tmp_path / "v1.toml", files), precision="bf16", sampling={"steps": 2})
    guarded = load_restore_model(choice, torch.device("cpu"), warn=warnings.append)
    nan_when_low(guarded.restorer.vae.decoder, monkeypatch)
    out = guarded(torch.rand(2, 3, FACE, FACE) * 2 - 1)
    assert torch.isfinite(out).all() and out.shape == (2, 3, FACE, FACE)
    assert len(warnings) == 1 and "decoder now runs in fp32" in warnings[0], warnings
    assert guarded.restorer.unet.dtype == torch.bfloat16, "only the decoder leaves low precision"


def test_compile_reaches_the_diffbir_networks_and_keeps_the_output(files: dict[str, Path], tmp_path: Path) -> None:
    """--compile on a DiffBIR model: UNet, ControlNet, VAE halves and SwinIR are traced (dynamo's
    "eager" backend: the wiring in seconds), and the output is the eager one."""
    from facerestore_cli.models.inference import CompiledRestorer

    model = load_restorer(model_file(tmp_path / "v1.toml", files), None, torch.device("cpu"), torch.float32, sampling={"steps": 2})
    x = torch.rand(1, 3, FACE, FACE) * 2 - 1
    eager = model(x)
    compiled = CompiledRestorer(model, backend="eager")
    assert set(compiled.eager) == {"unet", "controlnet", "vae.encoder", "vae.decoder", "stage1"}
    assert torch.allclose(compiled(x), eager, atol=1e-5) and compiled.compiled


@pytest.mark.parametrize("method", ["refl", "lrpo"])
def test_refl_and_lrpo_tune_an_osediff_model_file(files: dict[str, Path], tmp_path: Path, method: str) -> None:
    """`refl`/`lrpo --model` take what `restore --model` takes, through the one loader: an OSEDiff
    model file (SD ldm + pkl) is tuned and `restore --model ... --lora` runs the result (DiffBIR
    bases: tests/test_refl_controlnet.py, tests/test_lrpo_controlnet.py)."""
    import json

    import test_lrpo
    import test_refl
    from fakes import fine_tuning_assets

    assets = fine_tuning_assets(tmp_path / "assets")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"refl": test_refl, "lrpo": test_lrpo}[method].tiny_config(assets, steps=1).to_dict()))
    osediff = tmp_path / "osediff.toml"
    osediff.write_text(f'kind = "osediff"\nsd = "{files["osediff_sd"]}"\nosediff = "{files["osediff"]}"\n')
    run = [method, "--config", str(cfg), "--device", "cpu", "--model"]
    tuned = CliRunner().invoke(main, [*run, str(osediff), "--out", str(tmp_path / "run")])
    assert tuned.exit_code == 0, tuned.output
    code, output, image = restore(tmp_path, "out", "--model", str(osediff), "--lora", str(tmp_path / "run" / "lora.safetensors"))
    assert code == 0 and image is not None, output
    assert read_lora_metadata(tmp_path / "run" / "lora.safetensors")["base"] == str(osediff), "the LoRA names its base"
    plain_sd = CliRunner().invoke(main, [*run, str(files["osediff_sd"]), "--out", str(tmp_path / "sd")])
    assert plain_sd.exit_code == 2 and "is Stable Diffusion 2.1, not a restorer" in plain_sd.output
