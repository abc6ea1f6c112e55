"""`lrpo` and the few-step sampler it trains (tiny random models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like, fine_tuning_assets, run_torchrun

from facerestore_cli.cli import main
from facerestore_cli.models import OneStepRestorer
from facerestore_cli.models.lora import read_lora_metadata
from facerestore_cli.models.sampler import gaussian_log_prob, restore_latent, sample_trajectories, sampling_timesteps, transition_log_prob
from facerestore_cli.rewards.composite import CompositeReward, RewardWeights
from facerestore_cli.rewards.frm import load_frm
from facerestore_cli.train.lrpo import (
    LrpoConfig,
    LrpoObjective,
    build_lrpo,
    ground_truth_targets,
    group_advantages,
    ppo_loss,
    rollout,
    step_advantages,
    train_lrpo,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return fine_tuning_assets(tmp_path_factory.mktemp("lrpo_assets"))


def tiny_config(assets: dict[str, Path], steps: int = 2, **changes) -> LrpoConfig:
    raw = {
        "data": [str(assets["data"])],
        "model": str(assets["base"]),
        "frm": str(assets["frm"]),
        "lora_rank": 2,
        "steps": steps,
        "batch_size": 2,
        "group_size": 3,
        "sampling_steps": 2,
        "face_size": 64,
        "lr": 1e-3,
        "wavelet_levels": 2,
        "quality_metric": "frm",
        "num_workers": 0,
        "log_every": 1,
        "checkpoint_every": 2,
    }
    return LrpoConfig.from_dict(raw | changes)


def base_model(assets) -> OneStepRestorer:
    return OneStepRestorer.from_pretrained(assets["base"], torch_dtype=torch.float32).eval()


# ---------------------------------------------------------------- the sampler (the policy)
def test_one_sampling_step_is_the_one_step_restorer_and_more_steps_change_little(assets) -> None:
    model = base_model(assets)
    assert sampling_timesteps(250, 1) == [(250, -1)] and sampling_timesteps(250, 3) == [(250, 166), (166, 83), (83, -1)]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert torch.equal(restore_latent(model, z, 1), model.denoise_latent(z))
        one = model(x)
        model.config.sampling_steps = 3
        three, again = model(x), model(x)
    assert torch.equal(three, again), "restoring in few-step mode is deterministic"
    assert not torch.equal(one, three)
    with pytest.raises(ValueError, match="sampling_steps"):
        model.config.with_overrides(sampling_steps=0)


def test_transition_log_probs_are_gaussian_and_recomputable(assets) -> None:
    model = base_model(assets)
    assert torch.allclose(
        gaussian_log_prob(torch.zeros(1, 4), torch.zeros(1, 4), 0.5), torch.tensor([-math.log(0.5) - 0.5 * math.log(2 * math.pi)])
    )
    z = model.encode(torch.rand(3, 3, 64, 64) * 2 - 1)
    z0, path = sample_trajectories(model, z, 3, eta=1.0, final_std=0.05, generator=torch.Generator().manual_seed(0))
    assert len(path) == 3 and torch.equal(path[-1].z_next, z0)
    assert all(s.std > 0 for s in path) and path[0].noise_level > path[1].noise_level > path[2].noise_level
    for step in path:  # the policy update recomputes exactly what sampling drew from
        assert torch.allclose(transition_log_prob(model, step, 1.0, 0.05), step.log_prob, atol=1e-5)
    _, other = sample_trajectories(model, z, 3, eta=1.0, final_std=0.05, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other[-1].z_next, z0), "group samples of one face must differ"


# ---------------------------------------------------------------- advantages and losses
def test_advantages_are_group_relative_and_noise_level_weighted() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]) / rewards.std(), atol=1e-5), "divided by the whole batch's std"
    assert torch.equal(adv[1], torch.zeros(3)), "a face whose samples all score alike teaches nothing"
    steps = step_advantages(torch.tensor([1.0, -4.0]), [0.6, 0.3], noise_level_weighting=True, clip=5.0)
    assert torch.allclose(steps[0], torch.tensor([4 / 3, -5.0])) and torch.allclose(steps[1], torch.tensor([2 / 3, -8 / 3]))
    flat = step_advantages(torch.tensor([1.0, -4.0]), [0.6, 0.3], noise_level_weighting=False)
    assert all(torch.equal(s, torch.tensor([1.0, -4.0])) for s in flat)


def test_ppo_loss_pushes_toward_good_samples_and_clips() -> None:
    old = torch.zeros(4)
    new = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    loss, frac = ppo_loss(new, old, adv, clip_range=0.2)
    loss.backward()
    assert torch.isclose(loss, -adv.mean()) and frac == 0
    assert new.grad[0] < 0 < new.grad[1], "gradient descent raises the likelihood of better-than-average samples"
    moved = torch.tensor([0.5, 0.5, -0.5, 0.0], requires_grad=True)
    loss, frac = ppo_loss(moved, old, adv, clip_range=0.2)
    loss.backward()
    assert frac == 0.75
    assert moved.grad[0] == 0, "a good sample already pushed past the clip gives no more gradient"
    assert moved.grad[1] != 0 and moved.grad[2] != 0, "the pessimistic bound keeps correcting moves the wrong way"


def test_ground_truth_states_come_straight_from_q(assets) -> None:
    model = base_model(assets)
    z0 = torch.randn(1, 8, 4, 4).repeat(4000, 1, 1, 1)
    z_t, target = ground_truth_targets(model, z0, 166, 83, eta=1.0, gen=torch.Generator().manual_seed(0))
    a = float(model.alpha_bar(166, 1, torch.device("cpu")))
    assert torch.allclose(z_t.mean(0), math.sqrt(a) * z0[0], atol=0.05) and abs(float(z_t.std(0).mean()) - math.sqrt(1 - a)) < 0.02
    a83 = float(model.alpha_bar(83, 1, torch.device("cpu")))
    assert torch.allclose(target.mean(0), math.sqrt(a83) * z0[0], atol=0.05), "the target is distributed as q(z_prev | z0)"
    _, last = ground_truth_targets(model, z0[:2], 83, -1, eta=1.0)
    assert torch.equal(last, z0[:2].float())


def test_likelihood_term_raises_the_ground_truths_likelihood(assets) -> None:
    cfg = tiny_config(assets, likelihood_weight=1.0, sampling_steps=1, lr=3e-3)
    model, reward = build_lrpo(cfg)
    hq = torch.rand(2, 3, 64, 64)
    _, path, states = rollout(model, reward, cfg, hq, hq, torch.Generator().manual_seed(0))
    objective = LrpoObjective(model, cfg)
    opt = torch.optim.Adam(model.lora_parameters(), lr=cfg.lr)
    zero = [torch.zeros(len(path[0].log_prob))]
    first = float(objective(path, zero, states)["likelihood"].detach())
    for _ in range(10):
        terms = objective(path, zero, states)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    assert float(objective(path, zero, states)["likelihood"].detach()) < first


# ---------------------------------------------------------------- the composite reward
def test_composite_reward_scores_fidelity_and_reports_dropped_components(assets) -> None:
    model = base_model(assets)
    frm = load_frm(assets["frm"])
    reward = CompositeReward(RewardWeights(), frm, model.vae.encoder, quality_metric="pyiqa:musiq")
    report = "\n".join(reward.report())
    assert "quality: dropped" in report and "frm: 0.3" in report and "structure: 0.3" in report
    gt = torch.from_numpy(np.stack([face_like(64, i) for i in range(2)])).permute(0, 3, 1, 2).float() / 255
    noisy = (gt + 0.3 * torch.randn_like(gt)).clamp(0, 1)
    same, worse = reward(gt, gt), reward(noisy, gt)
    assert set(same) == {"frm", "fidelity", "structure", "total"}
    assert torch.allclose(same["structure"], torch.ones(2)) and torch.allclose(same["fidelity"], torch.ones(2), atol=1e-5)
    assert (worse["fidelity"] < same["fidelity"]).all() and (worse["structure"] < same["structure"]).all()
    assert torch.allclose(same["total"], 0.3 * same["frm"] + 0.3 * same["fidelity"] + 0.3 * same["structure"])
    with_niqe = CompositeReward(RewardWeights(), frm, model.vae.encoder, quality_metric="niqe")
    assert "quality" in with_niqe.active
    with pytest.raises(ValueError, match="niqe cannot score"):
        with_niqe(gt, gt)  # 64 px faces are smaller than one NIQE patch
    with pytest.raises(ValueError, match="no-reference"):
        CompositeReward(RewardWeights(), frm, model.vae.encoder, quality_metric="psnr")


# ---------------------------------------------------------------- runs
def test_config_rejects_settings_that_cannot_train(assets) -> None:
    for bad, match in [
        ({"group_size": 1}, "group_size"),
        ({"eta": 0.0}, "eta"),
        ({"likelihood_steps": 3}, "likelihood_steps"),
        ({"lora_rank": 0}, "lora_rank"),
    ]:
        with pytest.raises(ValueError, match=match):
            tiny_config(assets, **bad)
    with pytest.raises(ValueError, match="unknown"):
        LrpoConfig.from_dict({"grup_size": 4})


def test_lrpo_trains_unet_lora_logs_rewards_and_resumes(assets, tmp_path: Path) -> None:
    first = train_lrpo(tiny_config(assets, steps=2), tmp_path)
    assert first["finished"] and first["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "reward_total",
        "reward_frm",
        "reward_fidelity",
        "reward_quality",
        "reward_structure",
        "policy",
        "likelihood",
        "clip_fraction",
        "restorations_per_s",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    meta = read_lora_metadata(tmp_path / "lora.safetensors")
    assert meta["sampling_steps"] == 2 and meta["rank_vae"] == 0, "UNet LoRA only, tuned in 2-step mode"
    more = train_lrpo(tiny_config(assets, steps=3), tmp_path)
    assert more["step"] == 3 and more["steps_this_run"] == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    base = base_model(assets)
    tuned = OneStepRestorer.from_pretrained(tmp_path / "final", torch_dtype=torch.float32)
    assert tuned.config.sampling_steps == 2
    assert all(
        torch.equal(a, b)
        for a, b in zip(base.vae.state_dict().values(), tuned.vae.float().state_dict().values())
        if a.dtype == torch.float16
    )
    changed = [k for k, v in base.unet.state_dict().items() if not torch.allclose(v, tuned.unet.state_dict()[k].float(), atol=1e-3)]
    assert changed, "the merged UNet must differ from the base"


def test_cli_lrpo_then_restore_with_the_lora_in_its_sampling_mode(assets, tmp_path: Path) -> None:
    cfg = tmp_path / "lrpo.toml"
    raw = tiny_config(assets).to_dict()
    raw.pop("degradation"), raw.pop("rewards")
    cfg.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in raw.items() if v is not None) + "\n[rewards]\nquality = 0.0\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["lrpo", "--config", str(cfg), "--out", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "quality: dropped (weight 0)" in result.output and "lrpo summary" in result.output
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "face.png"), cv2.resize(face_like(64, 9), (512, 512), interpolation=cv2.INTER_CUBIC))
    common = ["--aligned", "--device", "cpu", "--color-fix", "none"]
    outs = {}
    for name, extra in {
        "lora": ["--model", str(assets["base"]), "--lora", str(run / "lora.safetensors")],
        "base": ["--model", str(assets["base"])],
    }.items():
        r = CliRunner().invoke(main, ["restore", str(src), "-o", str(tmp_path / name), *common, *extra])
        assert r.exit_code == 0, r.output
        outs[name] = cv2.imread(str(tmp_path / name / "face.png")).astype(np.float32)
    tuned = base_model(assets)
    tuned.load_lora(run / "lora.safetensors")
    assert tuned.config.sampling_steps == 2, "the LoRA file carries the mode it was tuned in"
    assert np.abs(outs["lora"] - outs["base"]).mean() > 0, "the adapter (and its sampling mode) must change the output"


def test_two_process_lrpo_through_torchrun(assets, tmp_path: Path) -> None:
    """Each process samples its own faces; advantages share the batch's std (2 CPU processes, gloo)."""
    printed, rows = run_torchrun("lrpo", tiny_config(assets, steps=2, batch_size=1), tmp_path / "run")
    assert printed.count("lrpo summary") == 1, "only the main process reports"
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["reward_total"]) for r in rows)
    assert (tmp_path / "run" / "lora.safetensors").is_file()
