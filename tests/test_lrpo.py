"""`lrpo` and the few-step sampler it trains (tiny random models)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like, fine_tuning_assets, run_torchrun
from safetensors.torch import load_file

from facerestore_cli.cli import main
from facerestore_cli.models import OneStepRestorer
from facerestore_cli.models.lora import read_lora_metadata
from facerestore_cli.models.sampler import (
    ddim_posterior,
    gaussian_log_prob,
    restore_latent,
    sample_trajectories,
    sampling_timesteps,
    step_distribution,
    transition_log_prob,
)
from facerestore_cli.rewards.composite import CompositeReward, RewardSources, RewardWeights
from facerestore_cli.rewards.frm import load_frm
from facerestore_cli.train.lrpo import (
    LrpoConfig,
    LrpoMethod,
    LrpoObjective,
    build_lrpo,
    ground_truth_trajectory,
    group_advantages,
    likelihood_regulariser,
    noise_level_weights,
    ppo_loss,
    rollout,
    step_advantages,
    train_lrpo,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

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
        "fidelity_metric": "encoder",
        "allow_missing_rewards": True,
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
def test_advantages_are_group_relative_over_the_rounds_std_with_eps_1e4() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv.mean(1), torch.zeros(2), atol=1e-6)
    want = torch.tensor([-1.0, 0.0, 1.0]) / (rewards.std(unbiased=False) + 1e-4)  # the paper: numpy std of every sample + 1e-4
    assert torch.allclose(adv[0], want, atol=1e-6), "divided by the std over all samples of the round, plus 1e-4"
    assert torch.equal(adv[1], torch.zeros(3)), "a face whose samples all score alike teaches nothing"
    round_std = torch.tensor(0.5)  # gathered over every process of the round
    assert torch.allclose(group_advantages(rewards, round_std)[0], torch.tensor([-1.0, 0.0, 1.0]) / (0.5 + 1e-4))
    flat_group = group_advantages(torch.tensor([[2.0, 2.0], [2.0, 2.0]]))
    assert torch.equal(flat_group, torch.zeros(2, 2)), "eps keeps an all-equal round finite"
    steps = step_advantages(torch.tensor([1.0, -4.0]), [0.6, 0.3], noise_level_weighting=True, clip=5.0)
    assert torch.allclose(steps[0], torch.tensor([4 / 3, -5.0])) and torch.allclose(steps[1], torch.tensor([2 / 3, -8 / 3]))
    flat = step_advantages(torch.tensor([1.0, -4.0]), [0.6, 0.3], noise_level_weighting=False)
    assert all(torch.equal(s, torch.tensor([1.0, -4.0])) for s in flat)


def test_noise_level_weights_are_ddim_sigmas_at_eta_1_over_their_mean(assets) -> None:
    model = base_model(assets)
    z = model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    _, path = sample_trajectories(model, z, 3, eta=1.0, final_std=0.05, generator=torch.Generator().manual_seed(0))
    ac = model.scheduler.alphas_cumprod.double()
    # DDIM's sigma at eta = 1; the last move ends at timestep 0, as DDIM's schedule does
    pairs = [(t, max(p, 0)) for t, p in sampling_timesteps(model.config.timestep, 3)]
    assert [(s.t, max(s.t_prev, 0)) for s in path] == pairs
    want = [float(((1 - ac[p]) / (1 - ac[t])).sqrt() * (1 - ac[t] / ac[p]).sqrt()) for t, p in pairs]
    assert [s.noise_level for s in path] == pytest.approx(want, rel=1e-6)
    weights = noise_level_weights([s.noise_level for s in path])
    assert weights == pytest.approx([w / (sum(want) / 3) for w in want], rel=1e-6) and sum(weights) == pytest.approx(3)
    assert weights[0] > weights[1] > weights[2] > 0, "noisier steps get more of the advantage"
    assert noise_level_weights([0.0]) == [1.0], "one-step mode: the only step takes the whole advantage"


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


def test_ground_truth_trajectory_starts_at_the_lq_and_follows_ddims_posterior(assets) -> None:
    model = base_model(assets)
    z_lq, z_gt = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    _, path = sample_trajectories(model, z_lq, 3, eta=1.0, final_std=0.05, generator=torch.Generator().manual_seed(0))
    many = 40000
    gt = ground_truth_trajectory(model, z_lq.repeat(many, 1, 1, 1), z_gt.repeat(many, 1, 1, 1), path, 1.0, torch.Generator().manual_seed(1))
    assert len(gt) == 3 and torch.equal(gt[0][0][0], z_lq[0]), "the policy's own first state: the LQ's latent"
    mean, std = ddim_posterior(model, z_lq, z_gt, path[0].t, path[0].t_prev, 1.0)
    assert torch.allclose(gt[0][1].mean(0), mean[0], atol=0.05) and abs(float(gt[0][1].std(0).mean()) - std) < 0.02
    assert std == pytest.approx(path[0].std), "the target is drawn with the policy's own sigma"
    assert torch.equal(gt[1][0], gt[0][1]), "one chain: each state is the previous target"
    assert torch.equal(gt[2][1], z_gt.repeat(many, 1, 1, 1)), "the last target is the ground truth's latent"


def test_likelihood_term_matches_the_formula_on_a_hand_computed_case(assets) -> None:
    # two samples, two dimensions, std 1: log N per dimension = -d^2 / 2 - log(sqrt(2 pi))
    c = 0.5 * math.log(2 * math.pi)
    d = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    log_prob = gaussian_log_prob(d, torch.zeros(2, 2), 1.0)
    assert torch.allclose(log_prob, torch.tensor([-c, -(0.5 + 4.5) / 2 - c]))
    want = ((1 - math.exp(-c / 40)) + (1 - math.exp((-2.5 - c) / 40))) / 2
    assert float(likelihood_regulariser(log_prob)) == pytest.approx(want, rel=1e-6)
    # through the objective: the policy's mean at g_t and its sigma; total = policy + 0.001 reg
    cfg = tiny_config(assets, sampling_steps=2)
    model, _ = build_lrpo(cfg)
    z = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1).float()
    _, path = sample_trajectories(model, z, 2, 1.0, 0.05, torch.Generator().manual_seed(0))
    g_t, g_prev = torch.randn_like(z), torch.randn_like(z)
    terms = LrpoObjective(model, cfg)(path[0], torch.zeros(2), (g_t, g_prev))
    with torch.no_grad():
        dist = step_distribution(model, g_t, path[0].t, path[0].t_prev, 1.0, 0.05)
    expected = (1 - torch.exp(gaussian_log_prob(g_prev, dist.mean, dist.std) / 40)).mean()
    assert torch.allclose(terms["likelihood"].detach(), expected, atol=1e-6)
    assert torch.allclose(terms["total"].detach(), terms["policy"].detach() + 1e-3 * expected, atol=1e-7)


def test_likelihood_term_raises_the_ground_truths_likelihood(assets) -> None:
    cfg = tiny_config(assets, likelihood_weight=1.0, sampling_steps=1, final_std=0.5, lr=3e-3)
    model, reward = build_lrpo(cfg)
    hq = torch.rand(2, 3, 64, 64)
    _, path, gt = rollout(model, reward, cfg, hq, hq, torch.Generator().manual_seed(0))
    assert len(gt) == 1 and torch.equal(gt[0][0], path[0].z_t), "one-step mode: the GT's likelihood from the LQ's state"
    objective = LrpoObjective(model, cfg)
    opt = torch.optim.Adam(model.lora_parameters(), lr=cfg.lr)
    zero = torch.zeros(len(path[0].log_prob))
    first = float(objective(path[0], zero, gt[0])["likelihood"].detach())
    for _ in range(10):
        terms = objective(path[0], zero, gt[0])
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    assert float(objective(path[0], zero, gt[0])["likelihood"].detach()) < first


def test_inner_steps_move_the_ratio_clip_and_drop_zero_advantage_samples(assets, tmp_path: Path) -> None:
    """The optimizer steps after every trained timestep, so the second step's ratio is no longer 1."""
    cfg = tiny_config(assets, sampling_steps=3, clip_range=1e-6, lr=1e-2, likelihood_weight=1e-3)
    method = LrpoMethod(cfg)
    from facerestore_cli.train.runner import accelerator

    method.acc, method.run_dir = accelerator("cpu"), tmp_path
    method.build(None)
    method.start(0)
    hq = torch.rand(2, 3, 64, 64)
    _, path, gt = rollout(method.model, method.reward, cfg, hq, hq, torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5, 0.0])
    seen: list[int] = []
    original = method.objective.forward

    def spy(step, advantages, ground_truth=None, scale=1.0):
        seen.append(len(advantages))
        return original(step, advantages, ground_truth, scale)

    method.objective.forward = spy
    terms = method.policy_updates(path, adv, torch.nonzero(adv != 0).flatten(), gt)
    assert method.optimizer_steps == 3 and seen == [4, 4, 4], "one optimizer step per timestep, zero-advantage samples dropped"
    assert terms["approx_kl"][0] == 0 and terms["clip_fraction"][0] == 0, "the first step's policy is the sampling policy"
    assert terms["approx_kl"][1] > 0 and terms["clip_fraction"][1] > 0, "after one inner step the ratio has left 1 and clips"
    assert "likelihood" in terms and len(terms["likelihood"]) == 3, "the last 5 trained steps: all 3 here"


def test_an_epochs_rounds_share_one_std_and_each_is_trained(assets, tmp_path: Path) -> None:
    """rounds_per_epoch = 2: both rounds' advantages divide by the std over all 2 x 4 samples (the
    paper's epoch-level std), and each round gets its own policy updates."""
    cfg = tiny_config(assets, rounds_per_epoch=2, group_size=2, batch_size=2)
    method = LrpoMethod(cfg)
    from facerestore_cli.train.runner import accelerator

    method.acc, method.run_dir = accelerator("cpu"), tmp_path
    method.build(None)
    method.start(0)
    drawn = iter([torch.tensor([[0.0, 1.0], [5.0, 5.0]]), torch.tensor([[2.0, 4.0], [1.0, 3.0]])])
    method.sample_round = lambda step, index: (r := next(drawn), [], [], None, {"total": r.flatten()})
    seen: list[torch.Tensor] = []
    method.policy_updates = lambda path, adv, keep, gt, ctx: seen.append(adv) or {"policy": [0.5]}
    terms, samples = method.train_step(0)
    epoch_std = torch.tensor([0.0, 1.0, 5.0, 5.0, 2.0, 4.0, 1.0, 3.0]).std(unbiased=False)
    assert samples == 8 and len(seen) == 2, "one runner step samples and trains both rounds"
    assert torch.allclose(seen[0], torch.tensor([-0.5, 0.5, 0.0, 0.0]) / (epoch_std + 1e-4))
    assert torch.allclose(seen[1], torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (epoch_std + 1e-4))
    assert terms["kept_fraction"] == 6 / 8 and terms["reward_total"] == 2.625


def test_ablations_train_on_the_same_degraded_faces_and_samples(assets, tmp_path: Path) -> None:
    """The degradations and the sampling noise have their own generators per (step, round):
    without the GT likelihood (which draws the GT's trajectory noise) round 2 still gets the LQ
    faces, and the samples, that the full method gets."""
    from facerestore_cli.train.runner import accelerator, seed_everything

    seen: dict[float, list[torch.Tensor]] = {}
    for weight in (1e-3, 0.0):
        seed_everything(0)  # as run_training does: the same faces in the same order
        method = LrpoMethod(tiny_config(assets, rounds_per_epoch=2, likelihood_weight=weight))
        method.acc, method.run_dir = accelerator("cpu"), tmp_path / str(weight)
        method.run_dir.mkdir()
        method.build(None)
        method.start(0)
        keep, original = seen.setdefault(weight, []), method.sample

        def spy(lq, hq, captions, keep=keep, original=original):
            got = original(lq, hq, captions)
            keep += [lq, got[0]["total"], got[1][-1].z_next]  # LQ faces, rewards, final latents
            return got

        method.sample = spy
        method.train_step(0)
    assert len(seen[1e-3]) == 6 and all(torch.equal(a, b) for a, b in zip(seen[1e-3], seen[0.0]))


# ---------------------------------------------------------------- the composite reward
def test_composite_reward_scores_fidelity_and_reports_dropped_components(assets) -> None:
    model = base_model(assets)
    frm = load_frm(assets["frm"])
    reward = CompositeReward(RewardWeights(), frm, model.vae.encoder, quality_metric="pyiqa:musiq")
    report = "\n".join(reward.report())
    assert "quality: dropped" in report and "frm: 0.3333" in report and "structure: 0.3333" in report and "renormalised" in report
    gt = torch.from_numpy(np.stack([face_like(64, i) for i in range(2)])).permute(0, 3, 1, 2).float() / 255
    noisy = (gt + 0.3 * torch.randn_like(gt)).clamp(0, 1)
    same, worse = reward(gt, gt), reward(noisy, gt)
    assert set(same) == {"frm", "fidelity", "structure", "total"}
    assert torch.allclose(same["structure"], torch.ones(2)) and torch.allclose(same["fidelity"], torch.ones(2), atol=1e-5)
    assert (worse["fidelity"] < same["fidelity"]).all() and (worse["structure"] < same["structure"]).all()
    # quality is missing (not weight 0): the others are renormalised to sum to 1 (changed by the issue: they were kept at 0.3)
    assert torch.allclose(same["total"], (same["frm"] + same["fidelity"] + same["structure"]) / 3)
    with_niqe = CompositeReward(RewardWeights(), frm, model.vae.encoder, quality_metric="niqe")
    assert "quality" in with_niqe.active
    with pytest.raises(ValueError, match="niqe cannot score"):
        with_niqe(gt, gt)  # 64 px faces are smaller than one NIQE patch
    with pytest.raises(ValueError, match="no-reference"):
        CompositeReward(RewardWeights(), frm, model.vae.encoder, quality_metric="psnr")


def random_vgg16_file(path: Path) -> Path:
    """torchvision's VGG16 `features` layout with random weights (the real file is 528 MB)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path


def test_the_papers_reward_judges(assets, tmp_path: Path) -> None:
    from facerestore_cli.rewards.judges import ClipIqa, DtcwtLowpass

    gt = torch.from_numpy(np.stack([face_like(64, i) for i in range(2)])).permute(0, 3, 1, 2).float() / 255
    noisy = (gt + 0.2 * torch.randn_like(gt)).clamp(0, 1)
    sources = RewardSources(lpips_vgg_weights=str(random_vgg16_file(tmp_path / "vgg16.pth")), allow_missing=True)
    reward = CompositeReward(RewardWeights(), load_frm(assets["frm"]), sources=sources)
    report = "\n".join(reward.report())
    assert (
        "1 - lpips-vgg distance" in report and "DTCWT low-pass, J=3" in report and "quality: dropped (clipiqa: no clipiqa_weights" in report
    )
    assert sum(reward.active.values()) == pytest.approx(1.0), "renormalised without the missing quality component"
    assert reward.active["frm"] == pytest.approx(0.3 / 0.9)
    same, worse = reward(gt, gt), reward(noisy, gt)
    assert torch.allclose(same["fidelity"], torch.ones(2)) and torch.allclose(same["structure"], torch.ones(2))
    assert (worse["fidelity"] < 1).all() and (worse["structure"] < 1).all()
    dtcwt = DtcwtLowpass(3)
    want = (dtcwt.lowpass(noisy) - dtcwt.lowpass(gt)).abs().flatten(1).mean(1)
    assert torch.allclose(worse["structure"], torch.exp(-15 * want)) and dtcwt.lowpass(gt).shape[-1] == 16
    # every network judge and the FRM follow the reward to the restorations' device (a GPU run found them left on the CPU)
    moved = reward.to("meta")
    tensors = [t for m in [moved.frm, *moved.judges.values()] if isinstance(m, torch.nn.Module) for t in [*m.parameters(), *m.buffers()]]
    assert moved is reward and tensors and all(t.device.type == "meta" for t in tensors)

    class TwoWayClip(torch.nn.Module):  # image features along x, text features: "Good photo." = x, "Bad photo." = y
        def encode_text(self, tokens):
            return torch.tensor([[1.0, 0.0], [0.0, 1.0]])

        def encode_image(self, x):
            return torch.stack([x.mean((1, 2, 3)) * 0 + 1.0, x.mean((1, 2, 3)) * 0], 1)

    score = ClipIqa(TwoWayClip(), torch.zeros(2, 3), image_size=32)(gt)
    assert torch.allclose(score, torch.full((2,), 1 / (1 + math.exp(-100.0)))), "softmax of 100 x cosine, the positive prompt's share"


def test_a_missing_reward_component_refuses_to_start_without_the_allow_flag(assets, tmp_path: Path) -> None:
    strict = tiny_config(assets, allow_missing_rewards=False, fidelity_metric="lpips-vgg", quality_metric="clipiqa")
    with pytest.raises(ValueError, match="allow_missing_rewards") as err:
        build_lrpo(strict)
    assert "fidelity missing" in str(err.value) and "quality missing" in str(err.value)
    with pytest.raises(ValueError, match="fallback 'encoder'"):
        build_lrpo(tiny_config(assets, allow_missing_rewards=False, rewards={"quality": 0.0}))
    cfg = tmp_path / "strict.json"
    cfg.write_text(json.dumps(strict.to_dict()))
    result = CliRunner().invoke(main, ["lrpo", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code != 0 and "allow_missing_rewards" in result.output
    assert "Traceback" not in result.output and len([ln for ln in result.output.splitlines() if "allow_missing" in ln]) == 1
    allowed = tiny_config(assets, steps=1, fidelity_metric="lpips-vgg", quality_metric="clipiqa")
    _, reward = build_lrpo(allowed)
    assert set(reward.active) == {"frm", "structure"} and sum(reward.active.values()) == pytest.approx(1.0)
    result = train_lrpo(allowed, tmp_path / "allowed")
    assert result["finished"] and result["reward_weights"] == {"frm": 0.5, "structure": 0.5}
    said = "weights renormalised to sum to 1 without fidelity, quality"
    assert any(said in line for line in result["rewards"]) and said in (tmp_path / "allowed" / "rewards.txt").read_text()


LRPO_CONFIGS = sorted([*CONFIGS.glob("lrpo*.toml"), *(CONFIGS / "experiments").glob("lrpo*.toml"), *(CONFIGS / "paper").glob("lrpo*.toml")])


@pytest.mark.parametrize("path", LRPO_CONFIGS, ids=lambda p: p.name)
def test_every_lrpo_config_loads(path: Path) -> None:
    cfg = LrpoConfig.from_file(path)
    assert cfg.group_size >= 2 and cfg.sampling_steps >= 1
    if "paper" in path.parts:  # the paper's setting: 12 rounds an epoch, its judges (none missing), 49 of 50 steps trained
        assert cfg.rounds_per_epoch == 12 and not cfg.allow_missing_rewards and int(cfg.sampling_steps * cfg.timestep_fraction) == 49


# ---------------------------------------------------------------- runs
def test_config_rejects_settings_that_cannot_train(assets) -> None:
    for bad, match in [
        ({"group_size": 1}, "group_size"),
        ({"eta": 0.0}, "eta"),
        ({"likelihood_steps": 0}, "likelihood_steps"),  # was 3 > sampling_steps: now the last 5 trained steps, or all when fewer
        ({"timestep_fraction": 0.0}, "timestep_fraction"),
        ({"lora_rank": -1}, "lora_rank"),
    ]:
        with pytest.raises(ValueError, match=match):
            tiny_config(assets, **bad)
    with pytest.raises(ValueError, match="lora_rank = 0"):  # the whole ControlNet: DiffBIR-kind bases only
        build_lrpo(tiny_config(assets, lora_rank=0))
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
        "approx_kl",
        "optimizer_steps",
        "restorations_per_s",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    meta = read_lora_metadata(tmp_path / "lora.safetensors")
    assert meta["sampling_steps"] == 2 and meta["rank_vae"] == 0, "UNet LoRA only, tuned in 2-step mode"
    more = train_lrpo(tiny_config(assets, steps=3), tmp_path)
    assert more["step"] == 3 and more["steps_this_run"] == 1
    assert more["optimizer_steps"] == first["optimizer_steps"] + 2, "the checkpoint carries the optimizer's step count (2 per step)"
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    base = base_model(assets)
    tuned = OneStepRestorer.from_pretrained(tmp_path / "final", torch_dtype=torch.float32)
    assert tuned.config.sampling_steps == 2
    # The VAE has no adapter: every tensor of it is the base's, as stored (the final model is fp16,
    # so the base's fp32 values cast to the file's dtype, which is exact: nothing computed).
    stored = load_file(str(tmp_path / "final" / "vae" / "diffusion_pytorch_model.safetensors"))
    want = base.vae.state_dict()
    assert set(stored) == set(want) and len(want) > 20, "the saved VAE must hold every tensor of the base's"
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    for k, v in want.items():
        assert torch.equal(stored[k], v.to(stored[k].dtype)), f"vae.{k} changed: lrpo tunes a UNet LoRA only"
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
    # the base restoring in the LoRA's mode (2 steps), so the comparison sees the adapter alone
    two_step = tmp_path / "base_2step"
    shutil.copytree(assets["base"], two_step)
    config = json.loads((two_step / "restorer_config.json").read_text())
    (two_step / "restorer_config.json").write_text(json.dumps({**config, "sampling_steps": 2}))
    common = ["--aligned", "--device", "cpu", "--color-fix", "none"]
    outs = {}
    for name, extra in {
        "lora": ["--model", str(assets["base"]), "--lora", str(run / "lora.safetensors")],
        "base": ["--model", str(two_step)],
    }.items():
        r = CliRunner().invoke(main, ["restore", str(src), "-o", str(tmp_path / name), *common, *extra])
        assert r.exit_code == 0, r.output
        outs[name] = cv2.imread(str(tmp_path / name / "face.png")).astype(np.float32)
    tuned = base_model(assets)
    tuned.load_lora(run / "lora.safetensors")
    assert tuned.config.sampling_steps == 2, "the LoRA file carries the mode it was tuned in"
    # measured: 9.7 grey levels on average (the random tiny base moves a lot in 2 steps at lr 1e-3);
    # an adapter left out gives float noise, under a hundredth of a level
    effect = np.abs(outs["lora"] - outs["base"]).mean()
    assert effect > 2, f"the adapter must change the output in its own sampling mode: {effect:.2f} grey levels"


def test_two_process_lrpo_through_torchrun(assets, tmp_path: Path) -> None:
    """Each process samples its own faces; advantages share the batch's std (2 CPU processes, gloo)."""
    printed, rows = run_torchrun("lrpo", tiny_config(assets, steps=2, batch_size=1), tmp_path / "run")
    assert printed.count("lrpo summary") == 1, "only the main process reports"
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["reward_total"]) for r in rows)
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_captions_feed_the_reward_frm(assets, tmp_path: Path, monkeypatch) -> None:
    """LRPO's FRM component reads each face's caption as ReFL's does (one per group candidate);
    an FRM that reads none is told none, and the summary says which."""
    from fakes import TINY_FRM

    from facerestore_cli.rewards.frm import FaceRewardModel, FrmConfig

    torch.manual_seed(2)
    captioned = FaceRewardModel(FrmConfig.from_dict(TINY_FRM | {"text": "hash"})).save_pretrained(tmp_path / "frm_hash")
    rows = [{"image": f"{i:06d}.png", "caption": f"face number {i}"} for i in range(6)]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    seen: list[list[str] | None] = []
    real = FaceRewardModel.forward
    monkeypatch.setattr(FaceRewardModel, "forward", lambda self, x, caps=None: seen.append(caps) or real(self, x, caps))
    cfg = tiny_config(assets, steps=1, frm=str(captioned), captions=str(tmp_path / "caps.jsonl"))
    result = train_lrpo(cfg, tmp_path / "run")
    assert result["captions"] == f"{tmp_path / 'caps.jsonl'}: 6 faces captioned, 0 with the fixed ''"
    captioned_calls = [c for c in seen if c]
    assert captioned_calls and all(c.startswith("face number") for caps in captioned_calls for c in caps)
    assert len(captioned_calls[0]) == cfg.batch_size * cfg.group_size, "one caption per candidate"
    plain = train_lrpo(tiny_config(assets, steps=1), tmp_path / "plain")
    assert plain["captions"] == "unused (this FRM reads no captions)"
