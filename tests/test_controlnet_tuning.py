"""Tuning a DiffBIR model's ControlNet (train/controlnet.py) on tiny files in the upstream layout:
what trains, where ReFL's gradient flows, the regulariser, and the saved result loading back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from test_diffbir import identity_stage1, tiny_models, write_tiny_files
from upstream_fakes import TINY_SD

from facerestore_cli.models.controlnet import HINT_PREFIX, load_controlnet
from facerestore_cli.models.diffbir import DiffBIRRestorer
from facerestore_cli.train.controlnet import TunableControlNet, estimated_peak_bytes, refl_prediction

FACE = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_files(tmp_path_factory.mktemp("tuning"), tiny_models())


def diffbir(files: dict[str, Path]) -> DiffBIRRestorer:
    return DiffBIRRestorer.from_files(files["sd"], files["controlnet"], identity_stage1, preset="diffusionreward", sd_configs=TINY_SD)


def condition(model: DiffBIRRestorer) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_condition(torch.rand(2, 3, FACE, FACE) * 2 - 1)


def test_full_tuning_trains_the_controlnet_alone_and_keeps_the_hint_at_zero(files: dict[str, Path]) -> None:
    tuning = TunableControlNet(diffbir(files))
    trained = {n for n, p in tuning.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("controlnet.") and not n.startswith(f"controlnet.{HINT_PREFIX}") for n in trained)
    assert not any(p.requires_grad for p in tuning.fixed.parameters())
    assert estimated_peak_bytes(tuning, batch=1, face_size=512) > sum(p.numel() * 4 for p in tuning.model.parameters())
    base = estimated_peak_bytes(tuning, batch=1, face_size=512)
    judge = torch.nn.Linear(100, 10)  # 1,010 fp32 weights
    with_judge = estimated_peak_bytes(tuning, batch=1, face_size=512, judges=[judge, tuning.model, judge])
    assert with_judge - base == 1010 * 4, "a judge's weights count once; the tuned model's are counted already"
    assert estimated_peak_bytes(tuning, 1, 512, judges=[judge], judge_trained=1010) - with_judge == 1010 * 12, (
        "Adam state of a trained judge"
    )


def test_refl_gradient_flows_only_through_step_m(files: dict[str, Path]) -> None:
    """No gradient before m (the no-grad prefix): the ControlNet runs with grad enabled exactly
    once per trajectory, and the reward's gradient reaches only its parameters."""
    tuning = TunableControlNet(diffbir(files))
    with_grad = []
    tuning.controlnet.register_forward_hook(lambda *_: with_grad.append(torch.is_grad_enabled()))
    pred = refl_prediction(tuning, condition(tuning.model), steps=4, last_steps=2, rng=random.Random(3))
    assert pred.step in (2, 3) and with_grad.count(True) == 1 and with_grad.count(False) == pred.step
    pred.x0.mean().backward()
    got = {n for n, p in tuning.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(n.startswith("controlnet.") for n in got)


def test_regulariser_is_zero_at_the_start_and_grows_with_training(files: dict[str, Path]) -> None:
    tuning = TunableControlNet(diffbir(files))
    c_img = condition(tuning.model)
    pred = refl_prediction(tuning, c_img, steps=2, last_steps=1)
    assert float(tuning.regulariser(pred.residuals, pred.fixed_residuals).detach()) < 1e-10, "the same weights (float rounding only)"
    with torch.no_grad():
        for p in tuning.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pred = refl_prediction(tuning, c_img, steps=2, last_steps=1)
    assert float(tuning.regulariser(pred.residuals, pred.fixed_residuals).detach()) > 1e-6


def test_lora_tuning_saves_a_merged_controlnet_restore_loads(files: dict[str, Path], tmp_path: Path) -> None:
    """With lora_rank only the adapters train; the saved file is the merged ControlNet in the
    upstream flat layout, which gives the tuned model's residuals when loaded back."""
    tuning = TunableControlNet(diffbir(files), lora_rank=2)
    assert all(".lora_" in n for n, p in tuning.controlnet.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in tuning.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loaded = load_controlnet(tuning.save(tmp_path / "controlnet.pth"), TINY_SD["unet"])
    model, c_img = tuning.model, condition(tuning.model)
    x_t, t = torch.randn(2, 4, FACE // 8, FACE // 8), torch.tensor(500)
    with torch.no_grad():
        tuned, again = model.control_residuals(x_t, c_img, t), model.control_residuals(x_t, c_img, t, controlnet=loaded)
        start = model.control_residuals(x_t, c_img, t, controlnet=tuning.fixed)
    assert torch.allclose(tuned[1], again[1], atol=1e-4) and not torch.allclose(tuned[1], start[1], atol=1e-4)
