"""`lrpo` on a DiffBIR-kind model (train/lrpo_controlnet.py): the ControlNet policy's DDIM eta = 1
transitions, PPO's inner optimizer steps, what trains, and the CLI run's files, on tiny files in
the upstream layouts."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import cv2
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like, fine_tuning_assets
from safetensors.torch import load_file
from test_diffbir import tiny_models, write_tiny_files
from test_swinir import tiny_model as tiny_swinir

from facerestore_cli.cli import main
from facerestore_cli.models.diffbir import SamplerSettings, make_scheduler
from facerestore_cli.models.loading import load_tunable_diffbir
from facerestore_cli.models.sampler import gaussian_log_prob
from facerestore_cli.train.controlnet import STATE_FILE, TunableControlNet
from facerestore_cli.train.lrpo import LrpoConfig, train_lrpo
from facerestore_cli.train.lrpo_controlnet import ControlNetLrpoMethod, DiffBIRPolicy, rollout
from facerestore_cli.train.runner import accelerator

FACE = 64
pytestmark = pytest.mark.usefixtures("tiny_published_configs", "one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lrpo_cn")
    paths = write_tiny_files(root, tiny_models())
    paths["swinir"] = root / "face_swinir_v1.ckpt"
    torch.save({"state_dict": tiny_swinir().state_dict()}, paths["swinir"])
    paths["model"] = root / "tiny_diffbir.toml"
    lines = ['kind = "diffbir-v1"', f'sd = "{paths["sd"]}"', f'swinir = "{paths["swinir"]}"', f'controlnet = "{paths["controlnet"]}"']
    paths["model"].write_text("\n".join(lines) + "\n")
    return paths | fine_tuning_assets(root / "assets")


def config(files: dict[str, Path], **changes) -> LrpoConfig:
    raw = {
        "data": [str(files["data"])],
        "model": str(files["model"]),
        "frm": str(files["frm"]),
        "lora_rank": 2,
        "steps": 1,
        "batch_size": 1,
        "group_size": 2,
        "sampling_steps": 2,
        "face_size": FACE,
        "lr": 1e-2,
        "wavelet_levels": 2,
        "quality_metric": "frm",
        "fidelity_metric": "encoder",
        "allow_missing_rewards": True,
        "num_workers": 0,
        "log_every": 1,
        "checkpoint_every": 1,
    }
    return LrpoConfig.from_dict(raw | changes)


def built(files: dict[str, Path], tmp_path: Path, **changes) -> ControlNetLrpoMethod:
    cfg = config(files, **changes)
    method = ControlNetLrpoMethod(cfg, *load_tunable_diffbir(cfg.model))
    method.acc, method.run_dir = accelerator("cpu"), tmp_path
    method.build(None)
    method.start(0)
    return method


def test_transition_log_prob_is_ddim_eta_one_gaussian(files: dict[str, Path]) -> None:
    """By hand: eps from the ControlNet + UNet, x0, DDIM's sigma at eta = 1 and its mean; the
    log-prob of mean + sigma n is mean(-n^2 / 2) - log sigma - log(2 pi) / 2, and the mean is
    diffusers' DDIM step (DiffBIR's spacing) with zero noise."""
    model, _ = load_tunable_diffbir(files["model"])
    policy = DiffBIRPolicy(TunableControlNet(model), steps=2, eta=1.0)
    assert policy.timesteps == [(501, 1), (1, 0)]  # "leading" spacing + offset 1; below 0: alphas_cumprod[0]
    sched = make_scheduler(SamplerSettings("ddim", 2, 1.0), model.scheduler_config)
    torch.manual_seed(0)
    c_img = torch.randn(2, 4, FACE // 8, FACE // 8)
    z_t, n = torch.randn_like(c_img), torch.randn_like(c_img)
    for t, t_prev in policy.timesteps:
        with torch.no_grad():
            eps = model.predict_noise(z_t, c_img, torch.tensor(t)).float()
            mean, std = policy.distribution(z_t, c_img, t, t_prev)
            logp = policy.log_prob(mean + std * n, z_t, c_img, t, t_prev)
        a, a_prev = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t_prev])
        sigma = math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x0 = (z_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        assert std == pytest.approx(sigma, rel=1e-5)
        assert torch.allclose(mean, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps, atol=1e-4)
        by_hand = (-(n**2) / 2).flatten(1).mean(1) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        assert torch.allclose(logp, by_hand, atol=1e-3)
        assert torch.allclose(gaussian_log_prob(mean, mean, sigma), torch.full((2,), -math.log(sigma) - 0.5 * math.log(2 * math.pi)))
        step = sched.step(eps, t, z_t, eta=1.0, variance_noise=torch.zeros_like(z_t), return_dict=False)[0]
        assert torch.allclose(mean, step, atol=1e-4)


@pytest.mark.parametrize("lora_rank", [2, 0])
def test_ratio_leaves_one_after_the_first_step_and_only_the_controlnet_trains(files, tmp_path: Path, lora_rank: int) -> None:
    method = built(files, tmp_path, lora_rank=lora_rank, lr=0.1)
    model = method.tuning.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hq = torch.rand(1, 3, FACE, FACE)
    got = rollout(method.policy, method.reward, method.cfg, hq * 0.8, hq, torch.Generator().manual_seed(0))
    assert len(got.path) == 2 and len(got.ground_truth) == 2 and got.c_img.shape[0] == 2
    out = method.policy_updates(got.path, torch.tensor([1.0, -1.0]), torch.arange(2), got.ground_truth, got.c_img)
    assert method.optimizer_steps == 2 and len(out["ratio_deviation"]) == 2
    first, second = out["ratio_deviation"]
    assert first < 1e-5, "before any update the recomputed log-prob is the rollout's"
    assert second > 1e-4 and second > 100 * first, "after the first inner optimizer step the ratio has moved"
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}
    changed |= {n for n, p in model.named_parameters() if n not in before}
    assert changed and all(n.startswith("controlnet.") for n in changed)
    if lora_rank:
        assert all("lora_" in n for n in changed)


def test_lrpo_cli_writes_a_model_file_restore_runs(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config(files).to_dict()))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["lrpo", "--config", str(cfg), "--device", "cpu", "--model", str(files["model"]), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "estimated peak memory" in result.output
    assert (run / "controlnet.pth").is_file()
    spec = tomllib.loads((run / "model.toml").read_text())
    assert spec["kind"] == "diffbir-v1" and spec["preset"] == "lrpo" and spec["meta"]["base"] == str(files["model"])
    assert (run / spec["controlnet"]).resolve() == (run / "controlnet.pth").resolve()  # paths relative to the model file
    assert (run / spec["sd"]).resolve() == files["sd"].resolve()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"approx_kl", "clip_fraction", "policy", "likelihood", "reward_total"} <= set(rows[-1])
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), face_like(FACE, 3))
    restore = ["restore", str(face), "-o", str(tmp_path / "out"), "--aligned", "--face-size", str(FACE), "--device", "cpu"]
    restored = CliRunner().invoke(main, [*restore, "--model", str(run / "model.toml"), "--steps", "2"])
    assert restored.exit_code == 0, restored.output
    assert cv2.imread(str(tmp_path / "out" / "face.png")) is not None


def test_stops_on_max_minutes_and_resumes(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = config(files, steps=2)
    first = train_lrpo(cfg, tmp_path, max_minutes=1e-6)
    assert not first.finished and first.step == 1 and not (tmp_path / "model.toml").exists()
    saved = load_file(str(tmp_path / "checkpoint" / "model" / STATE_FILE))
    assert saved and all("lora_" in n for n in saved), "the checkpoint holds the trainable weights"
    again = train_lrpo(config(files, steps=2), tmp_path)
    assert again.finished and again.step == 2 and again.steps_this_run == 1
    assert again["optimizer_steps"] - first["optimizer_steps"] in (0, 2), "the count goes on from the checkpoint's"
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "model.toml").is_file() and (tmp_path / "controlnet.pth").is_file()
