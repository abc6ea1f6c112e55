"""`facerestore export` and `restore --backend onnx|tensorrt` (tiny random models, CPU).

TensorRT needs an NVIDIA GPU; here only its "not installed" message is tested.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like, randomize_fusion, tiny_model_config

from facerestore_cli.cli import main
from facerestore_cli.export import EngineError
from facerestore_cli.export.meta import read_meta, sidecar_path
from facerestore_cli.export.source import ModelSource
from facerestore_cli.models import configs
from facerestore_cli.models.loading import load_restorer
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.models.sampler import restore_latent

pytest.importorskip("onnxruntime")  # a guard only: the test extra installs it

FACE = 64
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Engines made on demand go to the test's folder, never ~/.cache."""
    monkeypatch.setenv("FACERESTORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def small_config(**changes) -> configs.RestorerConfig:
    return tiny_model_config(face_size=FACE, **changes)


def save_model(path: Path, seed: int, **changes) -> Path:
    torch.manual_seed(seed)
    OneStepRestorer.from_config(small_config(**changes)).save_pretrained(path)
    return path


def save_lora(base: Path, path: Path) -> Path:
    """A LoRA with non-zero weights (fresh ones are a no-op), so merging it changes the output."""
    model = OneStepRestorer.from_pretrained(base)
    model.add_lora(rank_unet=2, rank_vae=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.save_lora(path)


def save_fused_model(path: Path) -> Path:
    """A model with skip fusion whose weights are not zero, so the graph must really carry it."""
    torch.manual_seed(3)
    model = OneStepRestorer.from_config(small_config())
    model.add_skip_fusion([1, 2, 3, 4])
    randomize_fusion(model)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    one = save_model(root / "one_step", seed=0)
    return {
        "one_step": one,
        "lora": save_lora(one, root / "lora.safetensors"),
        "other": save_model(root / "other", seed=1),  # same architecture, other weights
        "two_step": save_model(root / "two_step", seed=2, timestep=250, sampling_steps=2),
        "skips": save_fused_model(root / "skips"),
    }


def images(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, FACE, FACE, generator=g) * 2 - 1


def export(args: list[str]):
    return CliRunner().invoke(main, ["export", "--device", "cpu", *args])


@pytest.mark.parametrize("which", ["one_step+lora", "two_step", "skips"])
def test_onnx_graph_matches_torch_at_any_batch(models: dict[str, Path], tmp_path: Path, which: str) -> None:
    from facerestore_cli.export.backends import OnnxBackend

    name, _, extra = which.partition("+")
    lora = models["lora"] if extra else None
    out = tmp_path / f"{name}.onnx"
    args = ["--model", str(models[name]), "-o", str(out)] + (["--lora", str(lora)] if lora else [])
    result = export(args)
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    reference = load_restorer(models[name], lora, CPU, torch.float32)
    assert meta.face_size == FACE and meta.sampling_steps == reference.config.sampling_steps == (2 if name == "two_step" else 1)
    assert meta.model_fingerprint == ModelSource(models[name], lora).fingerprint() and "torch" in meta.versions and "onnx" in meta.versions
    backend = OnnxBackend(out, meta, CPU)
    assert isinstance(backend.session.get_inputs()[0].shape[0], str), "the batch dimension must be dynamic"
    for batch in (1, 3):
        x = images(batch)
        with torch.no_grad():
            want = reference(x)
        got = backend(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max().item() < 1e-3, f"batch {batch}"
    if name == "skips":  # the fusion really is in the graph
        with torch.no_grad():
            plain = reference.decode(restore_latent(reference, reference.encode(images(1)), 1))
        assert (backend(images(1)) - plain).abs().max().item() > 1e-3
    if lora:  # the LoRA really is in the graph
        with torch.no_grad():
            base = load_restorer(models[name], None, CPU, torch.float32)(images(1))
        assert (backend(images(1)) - base).abs().max().item() > 1e-3


def test_onnx_fp16_export_stays_close(models: dict[str, Path], tmp_path: Path) -> None:
    from facerestore_cli.export.backends import OnnxBackend

    out = tmp_path / "half.onnx"
    assert export(["--model", str(models["one_step"]), "-o", str(out), "--fp16"]).exit_code == 0
    meta = read_meta(out)
    assert meta.fp16
    x = images(2)
    with torch.no_grad():
        want = load_restorer(models["one_step"], None, CPU, torch.float32)(x)
    got = OnnxBackend(out, meta, CPU)(x)
    assert got.dtype == torch.float32 and (got - want).abs().max().item() < 0.05


def restore(face: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["restore", str(face), "-o", str(out), "--aligned", "--device", "cpu", *args])


def test_restore_backend_onnx_same_image_as_torch_and_cached(
    models: dict[str, Path], tmp_path: Path, _cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), face_like(FACE, 5))
    model = ["--model", str(models["one_step"]), "--lora", str(models["lora"])]
    torch_run = restore(face, tmp_path / "torch", *model)
    assert torch_run.exit_code == 0, torch_run.output
    onnx_run = restore(face, tmp_path / "onnx", *model, "--backend", "onnx")
    assert onnx_run.exit_code == 0, onnx_run.output
    a, b = (cv2.imread(str(tmp_path / d / "face.png")).astype(int) for d in ("torch", "onnx"))
    assert a.shape == b.shape == (FACE, FACE, 3) and np.abs(a - b).max() <= 2
    cached = sorted((_cache / "engines").glob("*.onnx"))
    assert len(cached) == 1 and sidecar_path(cached[0]).is_file() and "1step" in cached[0].name
    # second run: the cached engine is reused, nothing is exported again
    monkeypatch.setattr("facerestore_cli.export.engines.export_onnx", lambda *a, **k: pytest.fail("exported again"))
    again = restore(face, tmp_path / "again", *model, "--backend", "onnx")
    assert again.exit_code == 0, again.output
    assert np.array_equal(cv2.imread(str(tmp_path / "again" / "face.png")).astype(int), b)


def test_an_engine_serves_only_its_own_face_size(tmp_path: Path) -> None:
    """A model trained for smaller crops too (working_sizes) exports at one size: the engine's
    shapes are fixed, so `restore --face-size auto` gives it that size only."""
    from facerestore_cli.export.backends import OnnxBackend
    from facerestore_cli.restore.face_restorer import face_sizes_for

    model = save_model(tmp_path / "two_sizes", seed=0, working_sizes=[32])
    out = tmp_path / "two_sizes.onnx"
    assert export(["--model", str(model), "-o", str(out)]).exit_code == 0
    backend = OnnxBackend(out, read_meta(out), CPU)
    assert backend.config.face_sizes == face_sizes_for(backend) == [FACE]
    with pytest.raises(ValueError, match="engine"):
        face_sizes_for(backend, 32)


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def test_engine_from_another_model_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    engine = tmp_path / "other.onnx"
    assert export(["--model", str(models["other"]), "-o", str(engine)]).exit_code == 0
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), face_like(FACE, 6))
    result = restore(face, tmp_path / "out", "--model", str(models["one_step"]), "--backend", "onnx", "--engine", str(engine))
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert str(engine) in line and "another model" in line
    assert ModelSource(models["one_step"]).fingerprint() in line and ModelSource(models["other"]).fingerprint() in line
    # the same weights plus a LoRA are another model too
    same = tmp_path / "one.onnx"
    assert export(["--model", str(models["one_step"]), "-o", str(same)]).exit_code == 0
    with_lora = restore(
        face,
        tmp_path / "out",
        "--model",
        str(models["one_step"]),
        "--lora",
        str(models["lora"]),
        "--backend",
        "onnx",
        "--engine",
        str(same),
    )
    assert with_lora.exit_code == 2 and str(same) in one_error_line(with_lora.output)
    sidecar_path(same).unlink()
    no_sidecar = restore(face, tmp_path / "out", "--model", str(models["one_step"]), "--backend", "onnx", "--engine", str(same))
    assert no_sidecar.exit_code == 2 and "facerestore export" in one_error_line(no_sidecar.output)
    torch_engine = restore(face, tmp_path / "out", "--model", str(models["one_step"]), "--engine", str(same))
    assert torch_engine.exit_code == 2 and "--backend" in one_error_line(torch_engine.output)


def test_fingerprint_follows_weights_not_paths(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(models["one_step"], moved)
    assert ModelSource(moved).fingerprint() == ModelSource(models["one_step"]).fingerprint()
    assert ModelSource(models["other"]).fingerprint() != ModelSource(models["one_step"]).fingerprint()
    assert ModelSource(models["two_step"]).sampling_steps() == 2 and ModelSource(models["one_step"]).face_size() == FACE


def test_tensorrt_missing_is_one_clear_line(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails even where it is installed
    result = export(["--model", str(models["one_step"]), "--format", "tensorrt", "-o", str(tmp_path / "x.engine")])
    assert result.exit_code == 2 and "pip install tensorrt" in one_error_line(result.output)
    assert not list(tmp_path.rglob("*.onnx")), "nothing is exported before the check"
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), face_like(FACE, 7))
    result = restore(face, tmp_path / "out", "--model", str(models["one_step"]), "--backend", "tensorrt")
    assert result.exit_code == 2 and "pip install tensorrt" in one_error_line(result.output)


def test_bf16_is_not_an_onnx_precision(models: dict[str, Path]) -> None:
    from facerestore_cli.export.backends import load_backend

    with pytest.raises(EngineError, match="bf16"):
        load_backend("onnx", ModelSource(models["one_step"]), CPU, "bf16")
