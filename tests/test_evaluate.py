"""Degraded test sets (reproducible from a seed) and the evaluation of restorers against baselines."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from facerestore_cli.cli import main
from facerestore_cli.data.degrade import DegradationConfig
from facerestore_cli.data.testsets import DEGRADATIONS, EvalInputError, degrade_folder, find_lq, load_degradation_config, source_images
from facerestore_cli.evaluate import evaluate
from facerestore_cli.metrics.identity import identity_unavailable_reason

MILD = DegradationConfig(blur_sigma=(0.5, 2.0), downsample=(1.0, 2.0), noise_sigma=(0.0, 5.0), jpeg_quality=(60, 95))


def _face_like(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.float64)
    for s in (4, 8, 16):
        small = rng.uniform(0, 255, (size // s, size // s, 3))
        img += cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(img / 3, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hq_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hq_src")
    for i in range(3):
        cv2.imwrite(str(root / f"face_{i}.png"), _face_like(64, i))
    (root / "sub").mkdir()
    cv2.imwrite(str(root / "sub" / "face_9.jpg"), _face_like(64, 9))
    return root


@pytest.fixture(scope="module")
def pairs(hq_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "set"
    degrade_folder(hq_folder, out, MILD, seed=7)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from facerestore_cli.models import OneStepRestorer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-random"
    OneStepRestorer.from_config("tiny").save_pretrained(path)
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".png", ".jsonl")
    }


def test_degrade_writes_pairs_and_parameters(pairs):
    names = ["face_0.png", "face_1.png", "face_2.png", "sub/face_9.png"]
    for n in names:
        assert (pairs / "hq" / n).is_file() and (pairs / "lq" / n).is_file()
    rows = [json.loads(line) for line in (pairs / DEGRADATIONS).read_text().splitlines()]
    assert [r["file"] for r in rows] == names
    for r in rows:
        assert 0.5 <= r["sigma_x"] <= 2.0 and 60 <= r["quality"] <= 95 and isinstance(r["seed"], int)
    meta = json.loads((pairs / "degrade_config.json").read_text())
    assert meta["seed"] == 7 and meta["images"] == 4 and meta["config"]["blur_sigma"] == [0.5, 2.0]


def test_degrade_is_reproducible_per_image(hq_folder, pairs, tmp_path):
    degrade_folder(hq_folder, tmp_path / "again", MILD, seed=7)
    assert _files(tmp_path / "again") == _files(pairs)
    # an image's degradation depends only on the seed and its name, not on the other files
    degrade_folder(hq_folder, tmp_path / "first2", MILD, seed=7, limit=2)
    for n in ("face_0.png", "face_1.png"):
        assert (tmp_path / "first2" / "lq" / n).read_bytes() == (pairs / "lq" / n).read_bytes()
    degrade_folder(hq_folder, tmp_path / "other", MILD, seed=8)
    assert (tmp_path / "other" / "lq" / "face_0.png").read_bytes() != (pairs / "lq" / "face_0.png").read_bytes()
    with pytest.raises(EvalInputError, match="already holds"):
        degrade_folder(hq_folder, pairs, MILD, seed=7)


def test_degrade_config_file_rebuilds_the_set(pairs):
    assert load_degradation_config(pairs / "degrade_config.json") == MILD


def test_degrade_reads_manifests_and_configs(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"file": "a.png"}) + "\n")
    cv2.imwrite(str(tmp_path / "a.png"), _face_like(32, 1))
    cv2.imwrite(str(tmp_path / "ignored.png"), _face_like(32, 2))
    assert [n for n, _ in source_images(tmp_path)] == ["a.png"]
    cfg_file = tmp_path / "train.toml"
    cfg_file.write_text("steps = 3\n[degradation]\nblur_sigma = [1.0, 2.0]\njpeg_quality = [50, 60]\n")
    cfg = load_degradation_config(cfg_file)
    assert cfg.blur_sigma == (1.0, 2.0) and cfg.jpeg_quality == (50, 60) and cfg.noise_sigma == DegradationConfig().noise_sigma
    (tmp_path / "bad.toml").write_text("blur = [1, 2]\n")
    with pytest.raises(EvalInputError, match="unknown degradation keys: blur"):
        load_degradation_config(tmp_path / "bad.toml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="no images"):
        source_images(tmp_path / "empty")


def test_evaluate_table_and_grid(pairs, tiny_model, tmp_path):
    grid = tmp_path / "grid.png"
    result = evaluate(pairs=pairs, models=[tiny_model], metrics=["psnr", "ssim", "niqe"], batch_size=3, grid=grid, grid_rows=3)
    assert result.methods == ["input", "bicubic_unsharp", "tiny-random", "ground_truth"]
    assert [m.name for m in result.metrics] == ["psnr", "ssim", "niqe"]
    for method in ("input", "bicubic_unsharp", "tiny-random"):
        assert np.isfinite(result.table[method]["psnr"]) and 0 < result.table[method]["ssim"] <= 1
        assert result.counts[method]["psnr"] == 4
        assert result.counts[method]["niqe"] == 0  # 64 px crops hold no 96 px patch: n/a, not a number
    assert set(result.table["ground_truth"]) == {"niqe"}
    assert result.images == 4 and len(result.per_image) == 4 * 4
    json.dumps(result.to_dict(), allow_nan=False)
    img = cv2.imread(str(grid))
    assert img is not None and img.shape[1] == 4 * 256 and img.shape[0] == 28 + 3 * 256


def test_evaluate_takes_loaded_models(pairs, tiny_model):
    from facerestore_cli.models import OneStepRestorer

    model = OneStepRestorer.from_pretrained(tiny_model)
    by_path = evaluate(pairs=pairs, models=[tiny_model], metrics=["psnr"], baselines=[], per_image=False)
    loaded = evaluate(pairs=pairs, models=[("mine", model)], metrics=["psnr"], baselines=[], per_image=False)
    assert loaded.methods == ["mine"] and loaded.table["mine"]["psnr"] == pytest.approx(by_path.table["tiny-random"]["psnr"])


def test_evaluate_lq_only_skips_full_reference(pairs):
    result = evaluate(lq=pairs / "lq", metrics=["psnr", "niqe"], size=192, limit=2)
    assert result.methods == ["input", "bicubic_unsharp"]
    assert "psnr" in result.skipped and [m.name for m in result.metrics] == ["niqe"]
    assert all(np.isfinite(result.table[m]["niqe"]) for m in result.methods)


def test_evaluate_bad_inputs(tmp_path, pairs):
    with pytest.raises(EvalInputError, match="not a folder"):
        evaluate(pairs=tmp_path / "nope")
    with pytest.raises(EvalInputError, match="no lq/ and hq/"):
        evaluate(pairs=tmp_path)
    with pytest.raises(EvalInputError, match="exactly one"):
        evaluate(pairs=pairs, lq=pairs / "lq")
    with pytest.raises(EvalInputError, match="cannot load restorer"):
        evaluate(pairs=pairs, models=[tmp_path], metrics=["psnr"])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(pairs=pairs, metrics=["psnr", "sharpness9000"])


def test_cli_degrade_and_eval(hq_folder, tiny_model, tmp_path):
    runner = CliRunner()
    out = tmp_path / "set"
    res = runner.invoke(
        main, ["degrade", str(hq_folder), "-o", str(out), "--seed", "3", "--blur-sigma", "1,2", "--noise", "0,4", "--size", "64"]
    )
    assert res.exit_code == 0, res.output
    assert len(list((out / "lq").rglob("*.png"))) == 4
    rows = [json.loads(line) for line in (out / DEGRADATIONS).read_text().splitlines()]
    assert all(1 <= r["sigma_x"] <= 2 and r["noise"] <= 4 for r in rows)

    grid, js = tmp_path / "g.png", tmp_path / "s.json"
    args = [
        "eval",
        "--pairs",
        str(out),
        "--model",
        str(tiny_model),
        "--metrics",
        "psnr,ssim,lpips",
        "--grid",
        str(grid),
        "--json",
        str(js),
        "--device",
        "cpu",
    ]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    for word in ("input", "bicubic_unsharp", "tiny-random", "psnr", "ssim"):
        assert word in res.output
    data = json.loads(js.read_text())
    assert set(data["table"]) == {"input", "bicubic_unsharp", "tiny-random"}
    if "lpips" in data["unavailable"]:
        assert "not computed: lpips" in res.output
    assert grid.is_file()

    res = runner.invoke(main, ["eval", "--pairs", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a folder" in res.output
    res = runner.invoke(main, ["eval", "--pairs", str(hq_folder), "--baselines-only"])
    assert res.exit_code == 2 and "no lq/ and hq/" in res.output
    res = runner.invoke(main, ["eval", "--list-metrics"])
    assert res.exit_code == 0 and "niqe" in res.output


@pytest.fixture(scope="module")
def real_like(pairs, tmp_path_factory) -> list[Path]:
    """Two LQ folders as in real_lq: one with a subfolder, one with a crop of another size and a repeated name."""
    root = tmp_path_factory.mktemp("real")
    a, b = root / "GFPGAN" / "cropped_faces", root / "DiffBIR" / "aligned"
    for rel in ("face_0.png", "face_1.png", "sub/face_9.png"):
        (a / rel).parent.mkdir(parents=True, exist_ok=True)
        (a / rel).write_bytes((pairs / "lq" / rel).read_bytes())
    b.mkdir(parents=True)
    cv2.imwrite(str(b / "face_0.png"), cv2.resize(cv2.imread(str(pairs / "lq" / "face_2.png")), (58, 61)))
    return [a, b]


def test_find_lq_pools_folders_without_clashes(real_like):
    names = [it.name for it in find_lq(real_like)]
    assert names == [
        "GFPGAN/cropped_faces/face_0",
        "GFPGAN/cropped_faces/face_1",
        "GFPGAN/cropped_faces/sub/face_9",
        "DiffBIR/aligned/face_0",
    ]
    # a parent folder next to one of its subfolders: every file once
    assert len(find_lq([real_like[0].parents[1], real_like[0]])) == 4
    assert [it.name for it in find_lq(real_like[0])] == ["face_0", "face_1", "sub/face_9"]


def test_evaluate_identity_against_input_without_ground_truth(real_like, tiny_model):
    if reason := identity_unavailable_reason():
        pytest.skip(f"identity metric unavailable: {reason}")
    result = evaluate(
        lq=real_like, models=[tiny_model], metrics=["psnr", "identity", "identity_dist", "niqe"], input_reference=True, batch_size=4
    )
    assert [m.name for m in result.metrics] == ["identity@input", "identity_dist@input", "niqe"]
    assert result.reference == {"identity@input": "input", "identity_dist@input": "input", "niqe": None}
    assert "reward doing nothing" in result.skipped["psnr"] and "ground truth" in result.skipped["identity"]
    assert result.images == 4 and result.counts["tiny-random"]["identity_dist@input"] == 4  # the 58x61 crop too
    assert result.table["input"]["identity@input"] == pytest.approx(1.0) and result.table["input"]["identity_dist@input"] == pytest.approx(
        0.0
    )
    for method in ("bicubic_unsharp", "tiny-random"):
        assert 0 < result.table[method]["identity_dist@input"] < 2 and result.table[method]["identity@input"] < 1
    assert result.to_dict()["metrics"]["identity@input"]["reference"] == "input"
    with pytest.raises(EvalInputError, match="identity metrics"):
        evaluate(lq=real_like, metrics=["niqe"], input_reference=True)


def test_cli_eval_several_lq_folders_against_input(real_like, tmp_path):
    if reason := identity_unavailable_reason():
        pytest.skip(f"identity metric unavailable: {reason}")
    js = tmp_path / "s.json"
    args = [
        "eval",
        "--lq",
        str(real_like[0]),
        "--lq",
        str(real_like[1]),
        "--baselines-only",
        "--input-reference",
        "--metrics",
        "psnr,identity_dist",
        "--json",
        str(js),
        "--device",
        "cpu",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "identity_dist@input" in res.output and "(0.0000)" in res.output and "against the degraded input" in res.output
    data = json.loads(js.read_text())
    assert data["images"] == 4 and set(data["table"]["bicubic_unsharp"]) == {"identity_dist@input"}
    res = CliRunner().invoke(main, ["eval", "--lq", str(real_like[0]), "--lq", str(tmp_path / "missing"), "--baselines-only"])
    assert res.exit_code == 2 and "missing: not a folder" in res.output


def test_models_of_the_same_folder_name_get_rows_a_reader_can_tell_apart() -> None:
    """Training runs all end in RUN/final: each row names its run, not just the first one."""
    from facerestore_cli.evaluate import _model_labels

    runs = [Path("weights/restorer-tiny"), Path("/runs/refl_paper/final"), Path("/runs/lrpo/final"), Path("a/x/final"), Path("b/x/final")]
    assert _model_labels(runs) == ["restorer-tiny", "refl_paper/final", "lrpo/final", "a/x/final", "b/x/final"]
    assert _model_labels([Path("runs/input")]) == ["runs/input"], "never the name of a baseline row"
    assert _model_labels([Path("/x/final"), Path("/y/x/final")]) == ["/x/final", "y/x/final"], "down to the root"
