"""The fast GPU path, checked on the CPU: fp16 guard, torch.compile, torchrun sharding.

The CUDA-only parts (channels_last, fp16 itself, cuda:LOCAL_RANK) cannot run here; these tests
exercise the same code with bf16, the CPU and gloo.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import assert_images_close, face_like, randomize_fusion, tiny_model_config, torchrun_cli

from facerestore_cli.cli import main
from facerestore_cli.io.images import read_image
from facerestore_cli.io.inputs import InputItem
from facerestore_cli.models import OneStepRestorer, configs
from facerestore_cli.models.inference import CompiledRestorer, restore_crops, to_tensor, to_uint8
from facerestore_cli.models.precision import PrecisionGuard, bad_faces
from facerestore_cli.restore.face_restorer import fast_torch_model
from facerestore_cli.restore.report import Summary
from facerestore_cli.restore.shards import Shard, merge_summaries

FACE = 64
SLOW = os.environ.get("FACERESTORE_SLOW_TESTS") == "1"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config() -> configs.RestorerConfig:
    return tiny_model_config(face_size=FACE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return OneStepRestorer.from_config(tiny_config()).save_pretrained(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crops")
    for i in range(4):
        cv2.imwrite(str(root / f"face{i}.png"), face_like(FACE, i))
    return root


def crops(n: int = 3) -> list[np.ndarray]:
    return [face_like(FACE, 10 + i) for i in range(n)]


def load(model_dir: Path, dtype: torch.dtype = torch.float32) -> OneStepRestorer:
    return OneStepRestorer.from_pretrained(model_dir).to(dtype=dtype).eval()


def nan_when_low(module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `module` overflow like an SD VAE in fp16: NaN out whenever its weights are not fp32."""
    forward = module.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        if next(module.parameters()).dtype == torch.float32:
            return out
        sample = out.sample if hasattr(out, "sample") else out
        nan = torch.full_like(sample, float("nan"))
        return SimpleNamespace(sample=nan) if hasattr(out, "sample") else nan

    monkeypatch.setattr(module, "forward", patched)


# ------------------------------------------------------------------ fp16/bf16 guard
def test_bad_faces_flags_nan_and_black_but_not_black_inputs() -> None:
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    x[2] = -1  # a black input may come out black
    out = x.clone()
    out[0, 0, 0, 0] = float("inf")
    out[1] = -1
    out[2] = -1
    assert bad_faces(out, x).tolist() == [True, True, False]


def test_fp32_model_is_not_wrapped(model_dir: Path) -> None:
    restorer = load(model_dir)
    assert fast_torch_model(restorer) is restorer
    assert isinstance(fast_torch_model(load(model_dir, torch.bfloat16)), PrecisionGuard)


def test_cpu_model_in_channels_last_restores_the_same_faces(model_dir: Path) -> None:
    """The CPU speed-up (channels_last weights) must not change what the user gets."""
    fast = fast_torch_model(load(model_dir))
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got, want = restore_crops(fast, crops(2), batch_size=2), restore_crops(load(model_dir), crops(2), batch_size=2)
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(got, want))


def test_decoder_overflow_is_redone_with_fp32_decoder(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    low = load(model_dir, torch.bfloat16)
    unpatched = copy.deepcopy(low)
    nan_when_low(low.vae.decoder, monkeypatch)
    warnings: list[str] = []
    guard = PrecisionGuard(low, warn=warnings.append)
    faces = crops(3)
    out = restore_crops(guard, faces, batch_size=2, method="none")  # two batches, one warning
    assert guard.decoder_fp32 and len(warnings) == 1 and "decoder" in warnings[0]
    assert low.unet.dtype == torch.bfloat16 and low.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    with torch.inference_mode():  # what it should be: bf16 encoder and UNet, then the fp32 decoder
        x = to_tensor(faces, torch.device("cpu"), torch.float32).to(torch.bfloat16)
        z0 = unpatched.denoise_latent(unpatched.encode(x))
        want = unpatched.vae.float().decode(z0.float() / unpatched.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert_images_close(out, to_uint8(want), what="bf16 encoder and UNet, fp32 decoder")
    ref = restore_crops(load(model_dir), faces, batch_size=2, method="none")
    assert np.abs(np.stack(out).astype(int) - np.stack(ref)).mean() < 5, "and near the fp32 model"


def test_fp32_decoder_fallback_takes_the_skip_fusion_along(model_dir: Path) -> None:
    low = load(model_dir, torch.bfloat16)
    low.add_skip_fusion([1, 2, 3, 4])
    randomize_fusion(low)
    reference = copy.deepcopy(low).float()
    guard = PrecisionGuard(low, warn=lambda _: None)
    guard._decoder_to_fp32()  # as after an overflow: bf16 encoder and UNet, fp32 decoder and fusion
    assert low.skip_fusion.blocks["1"].body[1].weight.dtype == torch.float32
    out = restore_crops(guard, crops(2), batch_size=2, method="none")
    ref = restore_crops(reference, crops(2), batch_size=2, method="none")
    assert np.abs(np.stack(out).astype(int) - np.stack(ref)).mean() < 5


def test_still_bad_batch_is_redone_in_fp32_and_model_stays_low(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    low = load(model_dir, torch.bfloat16)
    same_weights_fp32 = copy.deepcopy(low).float()  # the bf16-rounded weights, in fp32
    nan_when_low(low.unet, monkeypatch)
    warnings: list[str] = []
    guard = PrecisionGuard(low, warn=warnings.append)
    faces = crops(2)
    out = restore_crops(guard, faces, batch_size=2)
    ref = restore_crops(same_weights_fp32, faces, batch_size=2)
    assert_images_close(out, ref, what="the retry must be the fp32 result")
    assert len(warnings) == 1 and "whole model in fp32" in warnings[0]
    assert low.dtype == torch.bfloat16 and low.unet.dtype == torch.bfloat16


# ------------------------------------------------------------------ torch.compile
def test_compile_eager_backend_gives_the_eager_output(model_dir: Path) -> None:
    """Dynamo's tracing with the "eager" backend: the wiring, in seconds (inductor: the slow test)."""
    eager, compiled = load(model_dir), CompiledRestorer(load(model_dir), backend="eager")
    x = torch.rand(2, 3, FACE, FACE) * 2 - 1
    with torch.inference_mode():
        assert torch.allclose(compiled(x), eager(x), atol=1e-5)
    assert compiled.compiled


def test_compile_covers_the_blocks_of_a_fused_model(model_dir: Path) -> None:
    """With skip fusion the VAE halves run block by block, so --compile must reach the blocks
    and the fusion (compiling `vae.decoder` as a whole would leave them eager): every block
    is traced, and the output is the eager one."""
    fused = load(model_dir)
    fused.add_skip_fusion([1, 2, 3, 4])
    randomize_fusion(fused)
    eager = copy.deepcopy(fused)
    traced: list[str] = []

    def recording_backend(graph, example_inputs):
        traced.append(graph.code)
        return graph.forward

    compiled = CompiledRestorer(fused, backend=recording_backend)
    x = torch.rand(2, 3, FACE, FACE) * 2 - 1
    with torch.inference_mode():
        assert torch.allclose(compiled(x), eager(x), atol=1e-5)
    up_blocks, fuse_blocks = len(fused.vae.decoder.up_blocks), len(fused.skip_fusion.blocks)
    assert compiled.compiled and len(traced) >= 1 + up_blocks + fuse_blocks, len(traced)


def test_compile_failure_falls_back_to_eager_with_one_warning(model_dir: Path) -> None:
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no working C++ compiler\nmore detail")

    warnings: list[str] = []
    runner = CompiledRestorer(load(model_dir), backend=broken_backend, warn=warnings.append)
    out = restore_crops(runner, crops(3), batch_size=2)
    assert out and not runner.compiled and len(warnings) == 1
    assert warnings[0].startswith("--compile: torch.compile failed (") and "no working C++ compiler" in warnings[0]
    assert warnings[0].endswith("; running eager") and "\n" not in warnings[0]
    assert_images_close(out, restore_crops(load(model_dir), crops(3), batch_size=2), what="eager fallback")


def test_guard_over_compiled_model_recompiles_for_the_fp32_decoder(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 + --compile, the usual GPU setting (as fast_torch_model stacks them; dynamo's "eager"
    backend because inductor takes minutes here): the fp32 decoder retry runs compiled too."""
    low, plain = load(model_dir, torch.bfloat16), load(model_dir, torch.bfloat16)
    nan_when_low(low.vae.decoder, monkeypatch)
    nan_when_low(plain.vae.decoder, monkeypatch)
    warnings: list[str] = []
    runner = CompiledRestorer(low, backend="eager", warn=warnings.append)
    out = restore_crops(PrecisionGuard(low, runner, warnings.append), crops(2), batch_size=2)
    assert runner.compiled and len(warnings) == 1 and "decoder" in warnings[0], warnings
    want = restore_crops(PrecisionGuard(plain, warn=lambda m: None), crops(2), batch_size=2)
    assert_images_close(out, want, what="compiled fp32 decoder retry")


@pytest.mark.skipif(not SLOW, reason="compiling even a tiny model with inductor takes minutes on a small CPU; set FACERESTORE_SLOW_TESTS=1")
def test_cli_compile_matches_eager(model_dir: Path, crops_dir: Path, tmp_path: Path) -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    args = ["restore", str(crops_dir / "face0.png"), "--aligned", "--device", "cpu", "--model", str(model_dir)]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        assert "warning" not in result.output, result.output
    a, b = (read_image(tmp_path / n / "face0.png").rgb.astype(int) for n in ("eager", "compiled"))
    assert np.abs(a - b).max() <= 1


# ------------------------------------------------------------------ torchrun sharding
def test_shards_cover_the_sorted_inputs_once() -> None:
    items = [InputItem(Path(f"/in/{n}.png"), Path(f"{n}.png"), "image") for n in "dbeac"]
    shards = [Shard(r, 2, r).take(items) for r in range(2)]
    assert [i.rel.stem for i in shards[0]] == ["a", "c", "e"] and [i.rel.stem for i in shards[1]] == ["b", "d"]
    assert Shard().take(items) == items


def test_merged_summary_adds_counts_and_keeps_one_copy_of_shared_errors() -> None:
    a = Summary(files=2, images=2, faces_restored=2, failures=["out: not writable"], seconds=3.0)
    b = Summary(files=1, images=1, faces_restored=1, skipped=1, failures=["out: not writable", "x.png: bad"], seconds=5.0)
    m = merge_summaries([a, b])
    assert (m.files, m.images, m.faces_restored, m.skipped, m.seconds) == (3, 3, 3, 1, 5.0)
    assert m.failures == ["out: not writable", "x.png: bad"]


def torchrun_restore(model_dir: Path, src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    options = ["-o", str(out), "--aligned", "--device", "cpu", "--model", str(model_dir), "--batch-size", "2"]
    return torchrun_cli("restore", str(src), *options, *extra)


def summary_row(output: str, name: str) -> str:
    """The value of one row of the printed summary table (there must be exactly one)."""
    rows = [cells[2] for line in output.splitlines() if len(cells := [c.strip() for c in line.split("│")]) > 2 and cells[1] == name]
    assert len(rows) == 1, f"expected one '{name}' row:\n{output}"
    return rows[0]


def test_torchrun_two_processes_restore_each_input_once(model_dir: Path, crops_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = torchrun_restore(model_dir, crops_dir, out)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert text.count("facerestore summary") == 1, text
    assert sorted(p.name for p in out.iterdir()) == [f"face{i}.png" for i in range(4)]
    assert summary_row(text, "files") == "4" and summary_row(text, "faces restored") == "4", text
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = torchrun_restore(model_dir, crops_dir, out, "--skip-existing")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and summary_row(text, "skipped (existing)") == "4", text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


# ------------------------------------------------------------------ tensor warp / paste
def similarity(scale: float, angle: float, shift: tuple[float, float]) -> np.ndarray:
    """Image -> crop affine of a face `scale` crop pixels per image pixel, rotated and shifted."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]], np.float32)


FACES = {  # crop pixels per image pixel: the face as big as the crop, larger (pre-shrink), smaller (low-pass)
    "same size": similarity(1.05, 0.2, (-20.0, -30.0)),
    "face larger": similarity(0.5, -0.3, (-5.0, -10.0)),
    "face smaller": similarity(2.2, 0.1, (-150.0, -160.0)),
    "off the edge": similarity(1.0, 0.0, (30.0, 25.0)),
}


@pytest.mark.parametrize("border", ["reflect", "constant"])
def test_tensor_warp_matches_cv2(border: str) -> None:
    from facerestore_cli.faces.align import warp_faces
    from facerestore_cli.faces.tensor_align import warp_faces_tensor

    image = face_like(160, 0)[:, :150].copy()
    affines = list(FACES.values())
    want = warp_faces(image, affines, FACE, border)
    got = warp_faces_tensor(torch.from_numpy(image).permute(2, 0, 1), affines, FACE, border)
    for name, a, b in zip(FACES, want, got):
        diff = np.abs(a.astype(float) - b.permute(1, 2, 0).round().clamp(0, 255).numpy())
        assert diff.mean() < 0.5 and diff.max() <= 2, f"{name}: mean abs diff {diff.mean():.2f}, max {diff.max()}"


def test_tensor_paste_matches_cv2_and_leaves_the_rest_untouched() -> None:
    from facerestore_cli.faces.align import _bounds, paste_faces
    from facerestore_cli.faces.tensor_align import paste_faces_tensor

    image = face_like(160, 1)[:, :150].copy()
    faces = [face_like(FACE, 20 + i) for i in range(len(FACES))]
    affines = list(FACES.values())
    want = paste_faces(image, faces, affines)
    got = paste_faces_tensor(torch.from_numpy(image).permute(2, 0, 1), [torch.from_numpy(f).permute(2, 0, 1) for f in faces], affines)
    got = got.permute(1, 2, 0).numpy()
    diff = np.abs(want.astype(float) - got)
    assert diff.mean() < 0.1 and diff.max() <= 2, f"mean {diff.mean():.3f}, max {diff.max()}"
    near = np.zeros(image.shape[:2], bool)  # each face's bounding region: nothing outside may change
    for a in affines:
        box = _bounds(cv2.invertAffineTransform(a), FACE, image.shape[:2], pad=2)
        if box:
            near[box[1] : box[3], box[0] : box[2]] = True
    assert (~near).mean() > 0.1 and np.array_equal(got[~near], image[~near].astype(float))
