"""Command-line paths no other test walked: `--precision fp16` (refused on a CPU, run on CUDA)
and a successful `restore --model SD_FOLDER --osediff PKL` with Stable Diffusion as a diffusers
folder (tiny files in the exact layouts)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import assert_images_close, face_like
from upstream_fakes import tiny_sd_models, write_ldm_file, write_osediff_pkl, write_sd_folder

from facerestore_cli.cli import main

FACE = 512  # the bundled model's own size and OSEDiff's


@pytest.fixture(scope="module")
def face(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "face.png"
    cv2.imwrite(str(path), face_like(FACE, 3))
    return path


def restore(face: Path, out: Path, *options: str):
    return CliRunner().invoke(main, ["restore", str(face), "-o", str(out), "--aligned", *options])


# ------------------------------------------------------------------ --precision fp16
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_on_a_cpu_exits_2_with_one_line(face: Path, tmp_path: Path, device: str) -> None:
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the CUDA device here, where fp16 runs")
    result = restore(face, tmp_path / "out", "--device", device, "--precision", "fp16")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and re.fullmatch(r"error: --precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU", lines[0]), lines
    assert not list(tmp_path.glob("out/**/*.png")), "nothing is restored"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fp16_on_cuda_restores_as_fp32_on_the_cpu_does(face: Path, tmp_path: Path) -> None:
    """The bundled model in fp16 on the GPU: the image a CPU makes in fp32, within the grey levels
    fp16 rounding moves (the GPU acceptance run's limits: mean 2.5, 99th percentile 14)."""
    cpu = restore(face, tmp_path / "cpu", "--device", "cpu")
    gpu = restore(face, tmp_path / "gpu", "--device", "cuda", "--precision", "fp16")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, cpu.output + gpu.output
    a, b = (cv2.imread(str(tmp_path / d / "face.png")).astype(np.int32) for d in ("cpu", "gpu"))
    diff = np.abs(a - b)
    assert b.shape == (FACE, FACE, 3) and diff.mean() <= 2.5 and np.percentile(diff, 99) <= 14, (diff.mean(), np.percentile(diff, 99))
    assert (b.reshape(-1, 3).max(1) > 8).mean() > 0.99, "an fp16 overflow comes out black"


# ------------------------------------------------------------------ --osediff with a diffusers folder
@pytest.fixture(scope="module")
def osediff_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("osediff")
    sd = tiny_sd_models()
    write_osediff_pkl(root / "osediff_face.pkl", sd["unet"], sd["vae"])
    return {
        "folder": write_sd_folder(root / "sd21", sd),
        "ldm": write_ldm_file(root / "v2-1_512-ema-pruned.ckpt", sd),
        "pkl": root / "osediff_face.pkl",
    }


@pytest.mark.usefixtures("tiny_published_configs", "one_thread")
def test_restore_with_an_sd_folder_and_osediff(face: Path, osediff_files: dict[str, Path], tmp_path: Path) -> None:
    """`--model SD_FOLDER --osediff PKL`, as the README's --model row offers it: exit 0, the
    restored face written at the input's size, the same restorer as from the ldm file."""
    result = restore(face, tmp_path / "folder", "--model", str(osediff_files["folder"]), "--osediff", str(osediff_files["pkl"]))
    assert result.exit_code == 0, result.output
    out = cv2.imread(str(tmp_path / "folder" / "face.png"))
    assert out is not None and out.shape == (FACE, FACE, 3)
    src = cv2.imread(str(face))
    assert np.abs(out.astype(int) - src).mean() > 1, "the random tiny model with its LoRA changes the face"
    by_file = restore(face, tmp_path / "ldm", "--model", str(osediff_files["ldm"]), "--osediff", str(osediff_files["pkl"]))
    assert by_file.exit_code == 0, by_file.output
    assert_images_close([out], [cv2.imread(str(tmp_path / "ldm" / "face.png"))], what="SD folder against the ldm file")
