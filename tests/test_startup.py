"""A quick start: `facerestore --help`, a refused option or path, and a rerun with nothing left to
do import no torch and load no model (issue #21). Checked by what a fresh process has imported,
not by timing it (benchmarks/bench_startup.py times it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from facerestore_cli.cli import main
from facerestore_cli.errors import InputError
from facerestore_cli.restore.lazy import BuildFailed, LazyFaceRestorer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: What the CLI's own import and its help must not import; a run that loads no model imports
#: OpenCV for its file loop, but not the model stack (MODEL_STACK).
HEAVY = ("torch", "diffusers", "cv2")
MODEL_STACK = ["torch", "diffusers"]

#: Runs `facerestore ARGS` in this fresh process, then writes its exit code and which HEAVY
#: modules it imported to the file named first.
PROBE = f"""
import json, sys
from facerestore_cli.cli import main
try:
    main(sys.argv[2:], prog_name="facerestore")
    code = 0
except SystemExit as e:
    code = e.code or 0
with open(sys.argv[1], "w") as f:
    json.dump({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}, f)
"""


def probe(tmp_path: Path, *args: str) -> tuple[int, list[str], str]:
    """`facerestore ARGS` in a fresh process: its exit code, the HEAVY modules it imported, its output."""
    result = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(result), *args], capture_output=True, text=True, timeout=300)
    assert result.is_file(), proc.stderr
    seen = json.loads(result.read_text())
    return seen["code"], seen["heavy"], proc.stdout + proc.stderr


def row(output: str, name: str) -> str:
    """The value of one row of the printed summary table."""
    rows = [cells[2] for line in output.splitlines() if len(cells := [c.strip() for c in line.split("│")]) > 2 and cells[1] == name]
    assert len(rows) == 1, f"expected one '{name}' row:\n{output}"
    return rows[0]


def done_before(tmp_path: Path) -> tuple[Path, Path]:
    """Photos and a video whose outputs all exist already: a rerun has nothing left to do."""
    src, out = tmp_path / "in", tmp_path / "out"
    for folder in (src, out):
        folder.mkdir()
        for name in ("astronaut_lq.jpg", "astronaut_grey.jpg", "astronaut_pan.mp4"):
            shutil.copy(EXAMPLES / name, folder / name)
    return src, out


def test_importing_the_cli_imports_no_torch() -> None:
    code = "import sys, facerestore_cli.cli; print([m for m in %r if m in sys.modules])" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    assert out.strip() == "[]", f"importing the CLI imported {out.strip()}"


@pytest.mark.parametrize("args", [["--help"], ["restore", "--help"]], ids=["help", "restore-help"])
def test_help_imports_no_torch(tmp_path: Path, args: list[str]) -> None:
    code, heavy, output = probe(tmp_path, *args)
    assert code == 0 and heavy == [], output
    assert "Usage: facerestore" in output and ("--skip-existing" in output) == (args[0] == "restore")


def test_refused_options_and_paths_import_no_torch(tmp_path: Path) -> None:
    """Options, then paths, are checked before torch: neither a bad value, nor options that do
    not go together, nor a --model that is not there (even with --device cuda, checked last)."""
    out = ["-o", str(tmp_path / "out")]
    for args, says in [
        (["--batch-size", "zero"], "--batch-size"),
        (["--engine", str(tmp_path / "x.onnx")], "--engine needs --backend onnx or tensorrt"),
        (["--model", str(tmp_path / "nowhere"), "--device", "cuda"], f"model folder not found: {tmp_path / 'nowhere'}"),
    ]:
        code, heavy, output = probe(tmp_path, "restore", str(EXAMPLES), *out, *args)
        assert code == 2 and says in output and not set(heavy) & set(MODEL_STACK), output
    assert not (tmp_path / "out").exists()


def test_a_missing_input_loads_no_model(tmp_path: Path) -> None:
    code, heavy, output = probe(tmp_path, "restore", str(tmp_path / "nonexistent"), "-o", str(tmp_path / "out"))
    assert code == 1 and "nonexistent" in output and not set(heavy) & set(MODEL_STACK), output


def test_a_rerun_with_nothing_left_to_do_imports_no_torch(tmp_path: Path) -> None:
    src, out = done_before(tmp_path)
    code, heavy, output = probe(tmp_path, "restore", str(src), "-o", str(out), "--skip-existing")
    assert code == 0 and not set(heavy) & set(MODEL_STACK), output
    assert row(output, "skipped (existing)") == "3" and row(output, "failures") == "0"


def test_skipped_and_failed_files_never_load_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run in which every file is skipped or fails before it is restored (a missing file, an
    unsupported one, an unreadable video) never builds the face restorer; the summary is as ever."""
    from facerestore_cli.restore import face_restorer as face_restorer_module

    monkeypatch.setattr(face_restorer_module, "build_face_restorer", lambda *a, **k: pytest.fail("the model was loaded"))
    src, out = done_before(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # read before the model (batch size auto)
    inputs = [
        str(src),
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "notes.txt"),
        str(tmp_path / "broken.mp4"),
        str(tmp_path / "broken.png"),
    ]
    result = CliRunner().invoke(main, ["restore", *inputs, "-o", str(out), "--skip-existing", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    for name in ("missing.jpg", "notes.txt", "broken.mp4", "broken.png"):
        assert any(name in line and "error" in line for line in result.output.splitlines()), result.output
    assert row(result.output, "skipped (existing)") == "3" and row(result.output, "failures") == "4"


def test_cuda_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    """Refused before anything else is done; without the NVIDIA driver, even without torch."""
    from facerestore_cli.devices import cuda_available, no_cuda_driver

    if cuda_available():
        pytest.skip("this machine has a CUDA GPU")
    src, out = done_before(tmp_path)
    code, heavy, output = probe(tmp_path, "restore", str(src), "-o", str(out), "--skip-existing", "--device", "cuda")
    assert code == 2 and "error: --device cuda was asked for, but no CUDA GPU is visible to torch" in output, output
    assert "summary" not in output
    assert ("torch" in heavy) != no_cuda_driver(), heavy


def test_no_cuda_driver_never_contradicts_torch() -> None:
    import torch

    from facerestore_cli.devices import cuda_available, no_cuda_driver

    assert cuda_available() == torch.cuda.is_available()
    assert not (no_cuda_driver() and torch.cuda.is_available())


def test_the_lazy_face_restorer_builds_once_and_only_when_asked() -> None:
    built = []

    class Restorer:
        batch_size = 4
        detector = "the detector"

    def build():
        built.append(1)
        return Restorer()

    lazy = LazyFaceRestorer(build, batch_size=2)
    assert lazy.batch_size == 2 and not built and not lazy.built, "a given --batch-size needs no model"
    assert lazy.detector == "the detector" and lazy.batch_size == 4 and lazy.detector and built == [1]
    auto = LazyFaceRestorer(build)
    assert auto.batch_size == 1 and built == [1], "auto: the first photo alone, before the model is built"
    assert auto.detector and auto.batch_size == 4 and built == [1, 1], "then the model's"


def test_a_failed_build_stops_the_run_not_one_file() -> None:
    def build():
        raise InputError("model folder not found: nowhere")

    lazy = LazyFaceRestorer(build)
    with pytest.raises(BuildFailed) as stopped:
        try:
            lazy.restore_frames([])
        except Exception:  # the loop's per-file handler must not take it
            pytest.fail("a failed build passed for one file's error")
    assert isinstance(stopped.value.error, InputError)
