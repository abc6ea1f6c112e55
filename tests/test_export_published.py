"""`facerestore export` and `restore --backend onnx` with a published OSEDiff model file, on the CPU:
tiny files in the exact upstream layouts (ldm SD checkpoint + OSEDiff .pkl) named by a model file,
loaded through the one model loader with the shipped SD 2.1 configs swapped for tiny ones."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like
from upstream_fakes import TINY_SD, tiny_sd_models, write_ldm_file, write_osediff_pkl

from facerestore_cli.cli import main
from facerestore_cli.errors import InputError
from facerestore_cli.export.meta import read_meta, sidecar_path
from facerestore_cli.export.source import ModelSource
from facerestore_cli.models import sd21
from facerestore_cli.models.loading import load_restorer

pytest.importorskip("onnxruntime")  # a guard only: the test extra installs it

FACE = 64  # exports at this size; `restore` without --engine makes its engine at the model's 512
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny SD 2.1 ldm file and two OSEDiff pkls for it (two models of one architecture)."""
    root = tmp_path_factory.mktemp("osediff")
    sd = tiny_sd_models()
    write_osediff_pkl(root / "osediff_face.pkl", sd["unet"], sd["vae"], seed=5)
    write_osediff_pkl(root / "other.pkl", sd["unet"], sd["vae"], seed=6)
    return {"sd": write_ldm_file(root / "sd.ckpt", sd), "osediff": root / "osediff_face.pkl", "other": root / "other.pkl"}


@pytest.fixture(autouse=True)
def tiny_configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Tiny architectures for the loader; the store, prompt cache and engine cache in tmp_path."""
    shipped = sd21.sd21_configs()
    monkeypatch.setattr(sd21, "sd21_configs", lambda: {**shipped, **{k: dict(v) for k, v in TINY_SD.items()}})
    monkeypatch.setenv("FACERESTORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACERESTORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def osediff_file(path: Path, sd: Path, pkl: Path, records: bool = False) -> Path:
    """An osediff model file; `records` adds the [files.SLOT] sha256/size tables `models import` writes."""
    lines = ['kind = "osediff"', f'sd = "{sd}"', f'osediff = "{pkl}"']
    if records:
        for slot, p in (("sd", sd), ("osediff", pkl)):
            lines += [f"[files.{slot}]", f'sha256 = "{hashlib.sha256(p.read_bytes()).hexdigest()}"', f"size = {p.stat().st_size}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def export(*args: str):
    return CliRunner().invoke(main, ["export", "--device", "cpu", *args])


def restore(face: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["restore", str(face), "-o", str(out), "--aligned", "--device", "cpu", *args])


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def images(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, FACE, FACE, generator=g) * 2 - 1


def test_osediff_model_file_exports_and_onnxruntime_matches_torch(files: dict[str, Path], tmp_path: Path) -> None:
    from facerestore_cli.export.backends import OnnxBackend

    model = osediff_file(tmp_path / "tiny.toml", files["sd"], files["osediff"])
    out = tmp_path / "tiny.onnx"
    result = export("--model", str(model), "-o", str(out), "--face-size", str(FACE))
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    assert meta.face_size == FACE and meta.sampling_steps == 1 and meta.config_name == "sd21"
    assert meta.model_fingerprint == ModelSource(model).fingerprint()
    assert meta.source["model"] == str(model) and meta.source["model_kind"] == "osediff"
    assert meta.source["sd_file"] == str(files["sd"]) and meta.source["osediff_file"] == str(files["osediff"])
    assert not out.with_name(out.name + ".data").exists(), "small weights stay inline"
    reference = load_restorer(model, None, CPU, torch.float32)
    backend = OnnxBackend(out, meta, CPU)
    for batch in (1, 2):
        x = images(batch)
        with torch.no_grad():
            want = reference(x)
        got = backend(x)
        assert got.shape == want.shape == (batch, 3, FACE, FACE)
        assert (got - want).abs().max().item() < 1e-3, f"batch {batch}"


def test_a_store_name_is_the_same_source_as_its_file(files: dict[str, Path], tmp_path: Path) -> None:
    path = osediff_file(tmp_path / "home" / "models" / "tiny-osediff.toml", files["sd"], files["osediff"])
    by_name, by_path = ModelSource(Path("tiny-osediff")), ModelSource(path)
    assert by_name.fingerprint() == by_path.fingerprint() and by_name.describe()["model"] == str(path)
    assert by_name.face_size() == 512 and by_name.sampling_steps() == 1
    moved = osediff_file(tmp_path / "elsewhere" / "m.toml", files["sd"], files["osediff"])
    assert ModelSource(moved).fingerprint() == by_path.fingerprint(), "contents count, not where the model file is"
    other = ModelSource(osediff_file(tmp_path / "other.toml", files["sd"], files["other"]))
    assert other.fingerprint() != by_path.fingerprint()


def test_restore_backend_onnx_with_a_model_file_matches_torch_and_reuses_the_engine(
    files: dict[str, Path], tmp_path: Path, tiny_configs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = str(osediff_file(tmp_path / "tiny.toml", files["sd"], files["osediff"]))
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), face_like(512, 5))  # the model's own size: a cached engine is made at it
    torch_run = restore(face, tmp_path / "torch", "--model", model)
    assert torch_run.exit_code == 0, torch_run.output
    onnx_run = restore(face, tmp_path / "onnx", "--model", model, "--backend", "onnx")
    assert onnx_run.exit_code == 0, onnx_run.output
    a, b = (cv2.imread(str(tmp_path / d / "face.png")).astype(int) for d in ("torch", "onnx"))
    assert a.shape == b.shape == (512, 512, 3) and np.abs(a - b).max() <= 2
    cached = sorted((tiny_configs / "engines").glob("*.onnx"))
    assert len(cached) == 1 and sidecar_path(cached[0]).is_file() and "512px-1step-fp32" in cached[0].name
    assert cached[0].name.startswith(ModelSource(Path(model)).fingerprint())
    # second run: the cached engine is reused; nothing is loaded or exported again
    monkeypatch.setattr("facerestore_cli.export.engines.export_onnx", lambda *a, **k: pytest.fail("exported again"))
    monkeypatch.setattr("facerestore_cli.models.loading.load_osediff", lambda *a, **k: pytest.fail("torch model loaded again"))
    again = restore(face, tmp_path / "again", "--model", model, "--backend", "onnx")
    assert again.exit_code == 0, again.output
    assert np.array_equal(cv2.imread(str(tmp_path / "again" / "face.png")).astype(int), b)


def test_an_engine_from_another_model_file_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    other = osediff_file(tmp_path / "other.toml", files["sd"], files["other"])
    engine = tmp_path / "other.onnx"
    assert export("--model", str(other), "-o", str(engine), "--face-size", str(FACE)).exit_code == 0
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), face_like(FACE, 6))
    model = osediff_file(tmp_path / "tiny.toml", files["sd"], files["osediff"])
    result = restore(face, tmp_path / "out", "--model", str(model), "--backend", "onnx", "--engine", str(engine))
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert str(engine) in line and "another model" in line and str(other) in line
    assert ModelSource(model).fingerprint() in line and ModelSource(other).fingerprint() in line
    # its own model file takes it
    ok = restore(face, tmp_path / "ok", "--model", str(other), "--backend", "onnx", "--engine", str(engine))
    assert ok.exit_code == 0, ok.output


def test_multi_step_and_reward_model_files_are_not_exported(tmp_path: Path) -> None:
    for name in ("sd.ckpt", "swinir.ckpt", "cn.pt", "frm.pth"):
        (tmp_path / name).write_bytes(b"x")
    diffbir = tmp_path / "v1.toml"
    diffbir.write_text(
        f'kind = "diffbir-v1"\nsd = "{tmp_path / "sd.ckpt"}"\nswinir = "{tmp_path / "swinir.ckpt"}"\ncontrolnet = "{tmp_path / "cn.pt"}"\n'
    )
    frm = tmp_path / "frm.toml"
    frm.write_text(f'kind = "frm"\nfrm = "{tmp_path / "frm.pth"}"\n')
    result = export("--model", str(diffbir), "-o", str(tmp_path / "v1.onnx"))
    line = one_error_line(result.output)
    assert result.exit_code == 2 and "multi-step ControlNet model" in line and "not exported" in line and "--backend torch" in line
    result = export("--model", str(frm), "-o", str(tmp_path / "frm.onnx"))
    assert result.exit_code == 2 and "Face Reward Model" in one_error_line(result.output)
    assert not list(tmp_path.rglob("*.onnx*")), "nothing is written"


def test_osediff_option_with_a_model_file_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    model = osediff_file(tmp_path / "tiny.toml", files["sd"], files["osediff"])
    with pytest.raises(InputError, match="names its files itself"):
        ModelSource(model, osediff=files["other"])


def test_recorded_sha256_stands_in_for_reading_the_files(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = ModelSource(osediff_file(tmp_path / "plain.toml", files["sd"], files["osediff"])).fingerprint()
    recorded = osediff_file(tmp_path / "recorded.toml", files["sd"], files["osediff"], records=True)
    monkeypatch.setattr("facerestore_cli.export.source._digest", lambda p: pytest.fail(f"read {p}"))
    assert ModelSource(recorded).fingerprint() == plain, "a record is the same digest: the same fingerprint"
    # a file whose size no longer matches its record is read again
    text = recorded.read_text()
    stale = tmp_path / "stale.toml"
    stale.write_text(text.replace(f"size = {files['sd'].stat().st_size}", "size = 1"))
    with pytest.raises(pytest.fail.Exception, match="read"):
        ModelSource(stale).fingerprint()


def test_weights_over_the_limit_go_to_external_data(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SD 2.1's weights are over protobuf's 2 GiB: the tiny model takes the same path with the limit lowered."""
    import onnx

    from facerestore_cli.export.backends import OnnxBackend

    model = osediff_file(tmp_path / "tiny.toml", files["sd"], files["osediff"])
    out = tmp_path / "engine" / "tiny.onnx"
    data = out.with_name("tiny.onnx.data")
    from facerestore_cli.export import onnx_export

    limit = onnx_export._INLINE_LIMIT
    monkeypatch.setattr(onnx_export, "_INLINE_LIMIT", 1000)
    result = export("--model", str(model), "-o", str(out), "--face-size", str(FACE))
    assert result.exit_code == 0, result.output
    assert "tiny.onnx.data" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx", "tiny.onnx.data", "tiny.onnx.json"], "one data file, no leftovers"
    graph = onnx.load(str(out), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {data.name}
    assert data.stat().st_size > out.stat().st_size
    x = images(2)
    with torch.no_grad():
        want = load_restorer(model, None, CPU, torch.float32)(x)
    assert (OnnxBackend(out, read_meta(out), CPU)(x) - want).abs().max().item() < 1e-3
    # exported again under the limit: one self-contained file, the stale data file removed
    monkeypatch.setattr(onnx_export, "_INLINE_LIMIT", limit)
    assert export("--model", str(model), "-o", str(out), "--face-size", str(FACE)).exit_code == 0
    assert not data.exists() and sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx", "tiny.onnx.json"]


def test_tensorrt_with_a_model_file_is_one_clear_line(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = osediff_file(tmp_path / "tiny.toml", files["sd"], files["osediff"])
    args = ("--model", str(model), "--format", "tensorrt", "-o", str(tmp_path / "x.engine"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails even where it is installed
    result = export(*args)
    assert result.exit_code == 2 and "pip install tensorrt" in one_error_line(result.output)
    # installed but no CUDA GPU (this CPU run): the GPU line, before anything is exported
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.0.0"))
    result = export(*args)
    assert result.exit_code == 2 and "needs a CUDA GPU" in one_error_line(result.output)
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.engine")), "nothing is exported before the checks"
