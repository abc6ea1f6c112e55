"""Resume, checked by what a run ends with: `train` stopped after 2 steps and resumed for 2 more
ends with the weights and optimizer state of 4 uninterrupted steps (so the checkpoint brings back
the weights, the optimizer and every random state), and a save killed between its two renames
still resumes from the checkpoint before it.

A tiny random restorer on 6 synthetic crops, batch 2 (3 batches an epoch): the resume comes in the middle of an epoch,
where the order of the faces and their random patches must also come back (`data.order`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakes import tiny_restorer, write_crops
from safetensors.torch import load_file

from facerestore_cli.train.restorer import RestorerTrainConfig, train_restorer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume_assets")
    tiny_restorer(64).save_pretrained(root / "base")
    return {"base": root / "base", "data": write_crops(root / "faces", 6)}


def config(assets: dict[str, Path]) -> RestorerTrainConfig:
    """Random 32-px patches with flips, degraded on the fly, cosine rate after 1 warm-up step: every
    random state a step draws from, and a rate that depends on the step."""
    raw = {
        "data": [str(assets["data"])],
        "model": str(assets["base"]),
        "steps": STEPS,
        "batch_size": 2,
        "patch_size": 32,
        "num_workers": 0,
        "log_every": 1,
        "checkpoint_every": 2,
        "warmup_steps": 1,
        "lr": 1e-3,
    }
    return RestorerTrainConfig.from_dict(raw)


def saved_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights (fp32, as saved for resuming) and its optimizer's moments."""
    tensors = {}
    for part in ("unet", "vae"):
        for k, v in load_file(str(ckpt / "model" / part / "diffusion_pytorch_model.safetensors")).items():
            tensors[f"{part}.{k}"] = v
    opt = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
    for i, s in opt.items():
        tensors.update({f"opt.{i}.{name}": torch.as_tensor(v) for name, v in s.items()})
    return tensors


def assert_same_run(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> None:
    """Equal within float rounding (the same steps on the same data in one process); the weights
    moved far more than that tolerance, so the comparison means something."""
    assert set(got) == set(want)
    moved = max(float((want[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3, f"4 steps at lr 1e-3 should move some weight by more than 1e-3, not {moved:.2e}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.fixture(scope="module")
def straight(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("straight")
    result = train_restorer(config(assets), run)
    assert result.finished and result.step == STEPS and result.steps_this_run == STEPS
    return saved_state(run / "checkpoint")


def start_weights(assets: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v
        for part in ("unet", "vae")
        for k, v in load_file(str(assets["base"] / part / "diffusion_pytorch_model.safetensors")).items()
    }


def test_killed_after_two_steps_and_resumed_ends_as_four_straight_steps(assets, straight, tmp_path: Path) -> None:
    def kill_in_step_3(step: int, terms: dict[str, float]) -> None:
        if step == 3:  # step 3 is done but not checkpointed: a kill loses it
            raise Killed

    with pytest.raises(Killed):
        train_restorer(config(assets), tmp_path, on_step=kill_in_step_3)
    assert json.loads((tmp_path / "checkpoint" / "step.json").read_text())["step"] == 2
    resumed = train_restorer(config(assets), tmp_path)
    assert resumed.finished and resumed.step == STEPS and resumed.steps_this_run == 2, "must resume from step 2"
    assert_same_run(saved_state(tmp_path / "checkpoint"), straight, start_weights(assets))


def test_a_save_killed_between_its_renames_resumes_from_the_checkpoint_before(
    assets, straight, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_checkpoint writes checkpoint.tmp, moves checkpoint to checkpoint.old, then moves
    checkpoint.tmp to checkpoint. Killed between the two moves, the run has no `checkpoint`: the
    next start must resume from checkpoint.old (step 2), not start again from step 0."""
    rename = Path.rename

    def killed_before_the_second_rename(self: Path, target):
        if self.name == "checkpoint.tmp" and json.loads((self / "step.json").read_text())["step"] == STEPS:
            raise Killed
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    with pytest.raises(Killed):
        train_restorer(config(assets), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint").exists(), "the state a kill between the renames leaves"
    assert json.loads((tmp_path / "checkpoint.old" / "step.json").read_text())["step"] == 2
    assert json.loads((tmp_path / "checkpoint.tmp" / "step.json").read_text())["step"] == STEPS

    resumed = train_restorer(config(assets), tmp_path)
    assert resumed.finished and resumed.step == STEPS and resumed.steps_this_run == 2, "must resume from the step-2 checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert_same_run(saved_state(tmp_path / "checkpoint"), straight, start_weights(assets))


# ------------------------------------------------------------------ refl and lrpo
def tuning_config(kind: str, assets: dict[str, Path]):
    """4 steps of batches of 2 of the 6 crops (3 batches a data epoch, so step 2's checkpoint
    falls inside one), checkpoints every 2, tiny LoRA: the dynamic FRM steps at 2 and 4 (refl);
    2 sampling rounds a step with the GT likelihood (lrpo)."""
    from facerestore_cli.train.lrpo import LrpoConfig
    from facerestore_cli.train.refl import ReflConfig

    raw = {
        "data": [str(assets["data"])],
        "model": str(assets["base"]),
        "frm": str(assets["frm"]),
        "lora_rank": 2,
        "steps": STEPS,
        "batch_size": 2,
        "face_size": 64,
        "lr": 1e-3,
        "wavelet_levels": 2,
        "num_workers": 0,
        "log_every": 1,
        "checkpoint_every": 2,
    }
    if kind == "refl":
        return ReflConfig.from_dict(raw | {"frm_update_every": 2, "frm_lr": 1e-3, "frm_warmup_steps": 1, "warmup_steps": 1})
    extra = {"group_size": 2, "sampling_steps": 2, "rounds_per_epoch": 2, "fidelity_metric": "encoder", "quality_metric": "frm"}
    return LrpoConfig.from_dict(raw | extra | {"allow_missing_rewards": True})


def tuning_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The LoRA a checkpoint holds and its optimizer's moments."""
    tensors = {f"lora.{k}": v for k, v in load_file(str(ckpt / "model" / "lora.safetensors")).items()}
    opt = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
    for i, s in opt.items():
        tensors.update({f"opt.{i}.{name}": torch.as_tensor(v) for name, v in s.items()})
    return tensors


@pytest.mark.parametrize("kind", ["refl", "lrpo"])
def test_refl_and_lrpo_killed_and_resumed_end_as_straight_runs(kind: str, tmp_path: Path) -> None:
    """Each step draws from generators seeded by (seed, step, process), the faces come in an order
    that resumes mid-epoch, and the checkpoint brings back the weights and optimizers (the dynamic
    FRM's too): a kill after step 3 and a resume from step 2 end where 4 straight steps do."""
    from fakes import fine_tuning_assets

    from facerestore_cli.train.lrpo import train_lrpo
    from facerestore_cli.train.refl import train_refl

    train = train_refl if kind == "refl" else train_lrpo
    assets = fine_tuning_assets(tmp_path / "assets")
    train(tuning_config(kind, assets), tmp_path / "straight")

    def kill_in_step_3(step: int, terms: dict[str, float]) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(tuning_config(kind, assets), tmp_path / "killed", on_step=kill_in_step_3)
    resumed = train(tuning_config(kind, assets), tmp_path / "killed")
    assert resumed.finished and resumed.steps_this_run == 2, "must resume from step 2"
    want, got = tuning_state(tmp_path / "straight" / "checkpoint"), tuning_state(tmp_path / "killed" / "checkpoint")
    assert set(got) == set(want) and max(float(v.abs().max()) for k, v in want.items() if k.startswith("lora.") and "lora_B" in k) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
