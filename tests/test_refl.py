"""`refl`: reward feedback learning of the restorer's LoRA against the FRM (tiny random models)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import assert_images_close, face_like, fine_tuning_assets, run_torchrun
from safetensors.torch import load_file

from facerestore_cli.cli import main
from facerestore_cli.models import OneStepRestorer
from facerestore_cli.train.checkpoint import find_checkpoint
from facerestore_cli.train.refl import ReflConfig, build_refl, train_refl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return fine_tuning_assets(tmp_path_factory.mktemp("refl_assets"))


def tiny_config(assets: dict[str, Path], steps: int = 2, **changes) -> ReflConfig:
    raw = {
        "data": [str(assets["data"])],
        "model": str(assets["base"]),
        "frm": str(assets["frm"]),
        "lora_rank": 2,
        "steps": steps,
        "batch_size": 2,
        "face_size": 64,
        "lr": 1e-3,
        "warmup_steps": 1,
        "wavelet_levels": 2,
        "frm_update_every": 1,
        "frm_lr": 1e-3,
        "num_workers": 0,
        "log_every": 1,
        "checkpoint_every": 2,
    }
    return ReflConfig.from_dict(raw | changes)


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def frm_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_reward_gradient_reaches_lora_in_unet_and_vae_encoder_only(assets) -> None:
    cfg = tiny_config(assets)
    model, frm, objective = build_refl(cfg)
    lq = torch.rand(2, 3, 64, 64) * 2 - 1
    terms, _ = objective(lq, lq)
    assert {"reward", "structural", "perceptual", "regulariser", "total", "frm_score"} <= set(terms)
    terms["reward"].backward()  # the reward term alone
    grads = {n: p.grad for n, p in model.named_parameters()}

    def has(prefix):
        return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix) and ".lora_" in n)

    assert has("unet."), "the FRM's gradient must reach the UNet's LoRA"
    assert has("vae.encoder."), "the FRM's gradient must flow back through the decoder and UNet into the encoder's LoRA"
    assert all(g is None for n, g in grads.items() if ".lora_" not in n), "base weights (decoder included) stay frozen"
    assert all(p.grad is None for p in frm.parameters()), "the FRM does not learn from the generator's loss"


def test_base_output_is_computed_with_the_adapters_disabled(assets) -> None:
    model, _, _ = build_refl(tiny_config(assets))
    base = OneStepRestorer.from_pretrained(assets["base"], torch_dtype=torch.float32).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        z_base = base.denoise_latent(base.encode(x))
        with model.adapters_disabled():
            z_off = model.denoise_latent(model.encode(x))
        z_on = model.denoise_latent(model.encode(x))
    assert torch.allclose(z_off, z_base, atol=1e-5)
    assert not torch.allclose(z_on, z_base, atol=1e-3), "adapters must be active again after the context"


def test_frozen_frm_stays_and_only_lora_changes(assets, tmp_path: Path) -> None:
    before = folder_hash(assets["base"]), folder_hash(assets["frm"])
    result = train_refl(tiny_config(assets, frm_update_every=0), tmp_path)
    assert result["finished"] and result["frm"] == "frozen" and result["frm_updates"] == 0
    assert (folder_hash(assets["base"]), folder_hash(assets["frm"])) == before
    assert not (tmp_path / "frm_final").exists()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("frm_accuracy" not in r for r in rows)
    assert all(
        np.isfinite(r[k]) for r in rows for k in ("total", "reward", "frm_score", "structural", "perceptual", "regulariser", "images_per_s")
    )
    lora = load_file(str(tmp_path / "lora.safetensors"))
    assert lora and all(".lora_" in k for k in lora), "the adapter file holds LoRA weights only"
    assert any(k.startswith("vae.encoder.") for k in lora) and any(k.startswith("unet.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "LoRA must have learned"
    base = OneStepRestorer.from_pretrained(assets["base"], torch_dtype=torch.float32)
    final = OneStepRestorer.from_pretrained(tmp_path / "final", torch_dtype=torch.float32)
    for part in ("vae.decoder", "vae.post_quant_conv"):
        b, f = base.get_submodule(part).state_dict(), final.get_submodule(part).state_dict()
        assert all(torch.allclose(b[k], f[k], atol=1e-3, rtol=1e-3) for k in b), f"{part} has no adapter and must not change"
    merged = OneStepRestorer.from_pretrained(assets["base"], torch_dtype=torch.float32)
    merged.load_lora(tmp_path / "lora.safetensors")
    merged.merge_lora()
    for (n, a), (_, b) in zip(merged.state_dict().items(), final.state_dict().items()):
        assert torch.allclose(a, b, atol=2e-3, rtol=2e-3), f"final = base + LoRA, but {n} differs"


def test_dynamic_frm_learns_and_resume_restores_its_state(assets, tmp_path: Path) -> None:
    first = train_refl(tiny_config(assets, steps=2), tmp_path)
    assert first["frm"] == "dynamic" and first["frm_updates"] == 2
    start, after2 = frm_state(assets["frm"]), frm_state(tmp_path / "frm_final")
    assert any(not torch.equal(start[k], after2[k]) for k in start), "the dynamic FRM must change"
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["frm_accuracy"] <= 1 and np.isfinite(r["frm_loss"]) and "frm_start_score" in r for r in rows)
    assert find_checkpoint(tmp_path) is not None
    # Resume with a zero FRM rate: the FRM then stays exactly as the checkpoint left it (not the bundled start).
    more = train_refl(tiny_config(assets, steps=3, frm_lr=0.0), tmp_path)
    assert more["step"] == 3 and more["steps_this_run"] == 1 and more["frm_updates"] == 3
    after3 = frm_state(tmp_path / "frm_final")
    assert all(torch.equal(after2[k], after3[k]) for k in after2), "resume must restore the updated FRM"
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_restore_with_the_lora_file_equals_the_merged_model(assets, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["refl", "--config", str(write_toml(tmp_path / "c.toml", assets)), "--out", str(run), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert (run / "lora.safetensors").is_file() and (run / "final").is_dir() and (run / "frm_final").is_dir()
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "face.png"), cv2.resize(face_like(64, 9), (512, 512), interpolation=cv2.INTER_CUBIC))
    common = ["--aligned", "--device", "cpu", "--color-fix", "none"]
    merged32 = OneStepRestorer.from_pretrained(assets["base"], torch_dtype=torch.float32)
    merged32.load_lora(run / "lora.safetensors")
    merged32.merge_lora()
    merged32.save_pretrained(tmp_path / "merged32")
    models = {
        "lora": ["--model", str(assets["base"]), "--lora", str(run / "lora.safetensors")],
        "merged32": ["--model", str(tmp_path / "merged32")],
        "merged": ["--model", str(run / "final")],
        "base": ["--model", str(assets["base"])],
    }
    outs = {}
    for name, extra in models.items():
        r = CliRunner().invoke(main, ["restore", str(src), "-o", str(tmp_path / name), *common, *extra])
        assert r.exit_code == 0, r.output
        outs[name] = cv2.imread(str(tmp_path / name / "face.png")).astype(np.float32)
    assert_images_close([outs["lora"]], [outs["merged32"]], what="restore --lora must give the merged model's output")
    diff = np.abs(outs["lora"] - outs["merged"])
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 3, "run/final is the same model, saved in fp16 (rounding only)"
    assert np.abs(outs["lora"] - outs["base"]).mean() > diff.mean(), "the adapter must change the output"


def write_toml(path: Path, assets: dict[str, Path], **extra) -> Path:
    cfg = tiny_config(assets).to_dict()
    cfg.pop("degradation"), cfg.pop("losses")
    cfg = {k: v for k, v in cfg.items() if v is not None} | extra
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.items()) + "\n")
    return path


def test_bad_config_is_a_one_line_error(assets, tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "bad.toml", assets, learning_rate=0.1)
    result = CliRunner().invoke(main, ["refl", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "learning_rate" in result.output and "unknown refl config keys" in result.output
    with pytest.raises(ValueError, match="unknown refl config \\[losses\\] keys: rewrd"):
        ReflConfig.from_dict({"losses": {"rewrd": 1.0}})
    with pytest.raises(ValueError, match="frm_update_every"):
        ReflConfig.from_dict({"frm_update_every": -1})


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", [CONFIGS / "refl_tiny.toml", *sorted(CONFIGS.glob("experiments/refl_*.toml"))], ids=lambda p: p.name)
def test_shipped_refl_configs_parse(path: Path) -> None:
    cfg = ReflConfig.from_file(path)
    assert cfg.steps > 0 and cfg.lora_rank > 0 and cfg.degradation.jpeg_quality[0] >= 1


def test_two_process_refl_through_torchrun(assets, tmp_path: Path) -> None:
    """ReFL runs under accelerate like `train` and `lrpo`: each process tunes on its shard of the
    faces, both make the same dynamic-FRM step on the gathered batch (2 CPU processes, gloo)."""
    printed, rows = run_torchrun("refl", tiny_config(assets, steps=2, batch_size=1), tmp_path / "run")
    assert printed.count("refl summary") == 1, "only the main process reports"
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["total"]) and 0 <= r["frm_accuracy"] <= 1 for r in rows)
    assert (
        (tmp_path / "run" / "lora.safetensors").is_file()
        and (tmp_path / "run" / "final").is_dir()
        and (tmp_path / "run" / "frm_final").is_dir()
    )
    assert find_checkpoint(tmp_path / "run") is not None
