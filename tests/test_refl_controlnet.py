"""`refl --model` on a DiffBIR-kind model tunes its ControlNet (train/refl_controlnet.py), end to
end on the CPU with tiny files in the upstream layouts: the CLI run and its model file that
`restore --model` takes, what trains and what stays frozen, the control-residual regulariser, a
run stopped by --max-minutes resuming, and the whole-ControlNet and LoRA variants."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fakes import fine_tuning_assets
from test_published_restore import files, model_file, restore  # noqa: F401 (fixtures)
from upstream_fakes import TINY_SD

from facerestore_cli.cli import main
from facerestore_cli.models.controlnet import load_controlnet
from facerestore_cli.models.model_file import ModelFile
from facerestore_cli.train import controlnet as rc
from facerestore_cli.train import refl as refl_module
from facerestore_cli.train.checkpoint import find_checkpoint
from facerestore_cli.train.refl import ControlNetReflMethod, ReflConfig, train_refl
from facerestore_cli.train.runner import run_training

pytestmark = pytest.mark.usefixtures("tiny_published_configs")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fine_tuning_assets(tmp_path_factory.mktemp("cn_assets"))


def config(assets: dict[str, Path], base: Path, steps: int = 1, **changes) -> ReflConfig:
    raw = {
        "data": [str(assets["data"])],
        "model": str(base),
        "frm": str(assets["frm"]),
        "lora_rank": 2,
        "steps": steps,
        "batch_size": 1,
        "face_size": 64,
        "sampling_steps": 2,
        "lr": 1e-3,
        "warmup_steps": 1,
        "frm_update_every": 1,
        "frm_lr": 1e-3,
        "frm_warmup_steps": 1,
        "num_workers": 0,
        "log_every": 1,
        "checkpoint_every": 1,
    }
    return ReflConfig.from_dict(raw | changes)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_cli_run_writes_a_model_file_restore_takes(files, assets, tmp_path: Path) -> None:  # noqa: F811
    base = model_file(tmp_path / "tiny_diffbir.toml", files, preset="diffusionreward")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config(assets, base).to_dict()))
    run = tmp_path / "run"
    cmd = ["refl", "--config", str(cfg), "--model", str(base), "--data", str(assets["data"]), "--out", str(run), "--steps", "1"]
    result = CliRunner().invoke(main, [*cmd, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "estimated peak memory" in result.output and "model.toml" in result.output
    spec = ModelFile.read(run / "model.toml")
    assert spec.kind == "diffbir-v1" and spec.controlnet == (run / "controlnet.pth").absolute()
    assert (spec.sd, spec.swinir, spec.preset) == (files["sd"], files["swinir"], "diffusionreward")
    assert spec.meta["base"] == str(base)
    code, output, image = restore(tmp_path, "out", "--model", str(run / "model.toml"), "--steps", "2")
    assert code == 0 and image is not None, output
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert rows[0]["setup"]["regulariser"] == "control_residuals_vs_fixed"
    assert rows[0]["regulariser"] == pytest.approx(0.0, abs=1e-10), "the tuned ControlNet starts as its frozen copy"
    assert "LoRA rank 2" in rows[0]["setup"]["tuned"]


@pytest.mark.parametrize("rank", [0, 2])
def test_only_the_controlnet_trains(files, assets, tmp_path: Path, rank: int) -> None:  # noqa: F811
    """Whole ControlNet (rank 0, the paper) or LoRA on it: the UNet, VAE and stage 1 keep their
    weights; the saved ControlNet differs from the base's; the regulariser starts at zero."""
    from facerestore_cli.models.loading import load_tunable_diffbir

    base = model_file(tmp_path / "tiny_diffbir.toml", files)
    cfg = config(assets, base, steps=2, lora_rank=rank)
    model, spec = load_tunable_diffbir(str(base))
    frozen = {name: state(getattr(model, name)) for name in ("unet", "vae", "stage1")}
    start = state(model.controlnet)
    terms: list[dict[str, float]] = []
    result = run_training(ControlNetReflMethod(cfg, model, spec), tmp_path / "run", on_step=lambda s, t: terms.append(t))
    assert result.finished and result["tuned"] == ("the whole ControlNet" if rank == 0 else "LoRA rank 2 on the ControlNet")
    assert terms[0]["regulariser"] == pytest.approx(0.0, abs=1e-10) and terms[1]["regulariser"] > 0
    for name, before in frozen.items():
        after = getattr(model, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} must stay frozen"
    now = model.controlnet.state_dict()
    if rank:

        def own(key: str) -> torch.Tensor:  # peft keeps a wrapped layer's weights under base_layer
            head, _, tail = key.rpartition(".")
            return now[key] if key in now else now[f"{head}.base_layer.{tail}"]

        assert all(torch.equal(start[k], own(k)) for k in start), "LoRA: the ControlNet's own weights stay"
        assert any(v.abs().sum() > 0 for k, v in now.items() if ".lora_B." in k), "the adapters moved"
    else:
        assert any(not torch.equal(start[k], now[k]) for k in start)
    saved = load_controlnet(tmp_path / "run" / "controlnet.pth", TINY_SD["unet"]).state_dict()
    assert any(not torch.equal(saved[k], start[k]) for k in start), "the exported ControlNet is the tuned one"


def test_a_run_stopped_by_max_minutes_resumes(files, assets, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """The checkpoint holds the trainable ControlNet and the optimiser; a resumed run continues
    from its step with the ControlNet weights it saved, and finishes with the exports."""
    from safetensors.torch import load_file

    base = model_file(tmp_path / "tiny_diffbir.toml", files)
    cfg, run = config(assets, base, steps=3, lora_rank=0), tmp_path / "run"
    first = train_refl(cfg, run, max_minutes=0.001)
    assert not first.finished and 1 <= first.step < 3 and not (run / "model.toml").exists()
    expected = load_file(str(find_checkpoint(run) / "model" / rc.STATE_FILE))
    restored: dict[str, torch.Tensor] = {}
    load = rc.load_state

    def record(tuning, folder):
        load(tuning, folder)
        restored.update({n: p.detach().clone() for n, p in tuning.controlnet.named_parameters() if p.requires_grad})

    monkeypatch.setattr(refl_module, "load_state", record)  # where ControlNetReflMethod looks it up
    second = train_refl(cfg, run)
    assert second.finished and second.step == 3 and second.steps_this_run == 3 - first.step
    assert set(restored) == set(expected) and all(torch.equal(restored[k], expected[k]) for k in expected)
    assert (run / "model.toml").is_file() and (run / "controlnet.pth").is_file()
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_settings_a_controlnet_run_refuses(files, assets, tmp_path: Path) -> None:  # noqa: F811
    from facerestore_cli.train.refl_losses import make_regulariser

    with pytest.raises(ValueError, match="is for one-step models"):
        make_regulariser("output_latent", "controlnet")
    with pytest.raises(ValueError, match="is for controlnet models"):
        make_regulariser("control_residuals", "one-step")
    with pytest.raises(ValueError, match="lora_rank = 0"):
        train_refl(config(assets, assets["base"], lora_rank=0), tmp_path / "one_step")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="needs bitsandbytes"):
            train_refl(config(assets, model_file(tmp_path / "v1.toml", files), optimizer="adamw8bit"), tmp_path / "run8")
