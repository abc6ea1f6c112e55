"""Training data, degradations and the training loop (checkpoint, resume, time budget)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import run_torchrun, tiny_restorer

from facerestore_cli.cli import main
from facerestore_cli.data.crops import CropDataset, prepare_faces, read_manifest
from facerestore_cli.data.degrade import DegradationConfig, Degrader, gaussian_kernels, jpeg
from facerestore_cli.faces import build_detector
from facerestore_cli.models import OneStepRestorer
from facerestore_cli.train.restorer import RestorerTrainConfig, train_restorer


def face_batch(n: int = 4, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_degradation_is_seeded_and_degrades() -> None:
    hq = face_batch()
    a, pa = Degrader(seed=3)(hq)
    b, _ = Degrader(seed=3)(hq)
    c, _ = Degrader(seed=4)(hq)
    assert a.shape == hq.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b), "the same seed must rebuild the same LQ set"
    assert not torch.equal(a, c)
    assert (a - hq).abs().mean() > 0.01
    assert set(pa.row(0)) >= {"sigma_x", "scale", "noise", "quality"}


def test_mild_fraction_draws_gentle_samples_and_keeps_old_sets() -> None:
    from facerestore_cli.data.degrade import sample_params

    base = DegradationConfig(blur_sigma=(0.1, 10.0), downsample=(1.0, 10.0), noise_sigma=(0.0, 10.0), jpeg_quality=(30, 100))
    plain = sample_params(base, 400, torch.Generator().manual_seed(0))
    again = sample_params(DegradationConfig(**{**base.to_dict(), "mild_share": 0.1}), 400, torch.Generator().manual_seed(0))
    assert torch.equal(plain.sigma_x, again.sigma_x), "mild_fraction 0 must not change a seeded set"
    mixed = sample_params(
        DegradationConfig(**{**base.to_dict(), "mild_fraction": 0.5, "mild_share": 0.2}), 400, torch.Generator().manual_seed(0)
    )
    gentle = (mixed.sigma_x <= 2.08) & (mixed.scale <= 2.8) & (mixed.noise <= 2.0) & (mixed.quality >= 86)
    assert 0.4 < gentle.float().mean() < 0.6, "about half the samples must come from the gentle ends"
    assert mixed.sigma_x.max() > 5 and mixed.quality.min() < 60, "the rest still cover the whole range"


def test_blur_kernels_normalised_and_anisotropic() -> None:
    k = gaussian_kernels(torch.tensor([2.0, 2.0]), torch.tensor([2.0, 6.0]), torch.tensor([0.0, 0.5]), 21)
    assert torch.allclose(k.sum(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(k[0], k[0].T, atol=1e-6) and not torch.allclose(k[1], k[1].T, atol=1e-4)


@pytest.mark.parametrize("quality", [30, 75])
def test_torch_jpeg_matches_a_real_codec(quality: int) -> None:
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), (96, 96), interpolation=cv2.INTER_CUBIC)
    ours = jpeg(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, torch.tensor([quality]))
    ours = ours[0].permute(1, 2, 0).numpy() * 255
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    ref = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32)
    assert np.abs(ours - ref).mean() < 0.5 * np.abs(ref - img).mean() + 0.5


@pytest.fixture(scope="module")
def prepared(shared_data: Path, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    files = sorted((shared_data / "faces/train/lfw250").glob("*.jpg"))[:3]
    for f in files:
        shutil.copy(f, src / f.name)
    shutil.copy(files[0], src / "copy_of_first.jpg")  # a duplicate must be dropped
    cv2.imwrite(str(src / "blank.png"), np.full((64, 64, 3), 128, np.uint8))
    out = tmp_path_factory.mktemp("prepared")
    stats = prepare_faces([src], out, build_detector("mtcnn"), face_size=128, min_eye_distance=10)
    assert stats.files == 5 and stats.duplicates >= 1 and stats.kept >= 3  # LFW photos hold background faces too
    assert stats.kept == stats.faces - stats.duplicates - stats.too_small - stats.too_blurry
    return out


def test_the_training_order_resumes_anywhere_and_shards_by_process(tmp_path: Path) -> None:
    """Each data epoch a new permutation; the stream from key k is the whole stream's rest; the
    processes' shares of an epoch are disjoint; a key's crop is the same whatever the global
    random state (or the worker) it is read in."""
    import itertools
    import random

    from fakes import write_crops

    from facerestore_cli.data.order import ResumableOrder

    def stream(order: ResumableOrder, n: int) -> list[tuple[int, int]]:
        return list(itertools.islice(order, n))

    whole = stream(ResumableOrder(7, seed=3), 21)
    epochs = [sorted(i for i, _ in whole[e * 7 : (e + 1) * 7]) for e in range(3)]
    assert epochs == [list(range(7))] * 3 and whole[:7] != whole[7:14], "a new permutation every epoch"
    for start in (1, 6, 7, 10):
        assert stream(ResumableOrder(7, seed=3, start=start), 21 - start) == whole[start:]
    assert stream(ResumableOrder(7, seed=4), 7) != whole[:7], "the seed makes the order"
    shares = [stream(ResumableOrder(7, seed=3, process=r, processes=2), 3) for r in range(2)]
    assert not {i for i, _ in shares[0]} & {i for i, _ in shares[1]} and all(len(s) == 3 for s in shares)

    data = CropDataset([write_crops(tmp_path / "crops", 2)], patch_size=32)
    key = whole[0]
    random.seed(0)
    first = data[(key[0] % 2, key[1])]
    random.seed(1)
    assert torch.equal(first, data[(key[0] % 2, key[1])])
    assert any(not torch.equal(first, data[(key[0] % 2, s)]) for s in range(1, 9)), "the seed draws the patch"


def test_prepare_faces_writes_aligned_crops_and_manifest(prepared: Path) -> None:
    rows = read_manifest(prepared)
    assert len(rows) >= 3 and len({r.dhash for r in rows}) == len(rows)
    for r in rows:
        assert cv2.imread(str(prepared / r.file)).shape == (128, 128, 3)
        assert r.eye_distance > 10 and r.sharpness > 0
    patches = CropDataset([prepared], patch_size=64)
    assert patches[0].shape == (3, 64, 64) and 0 <= float(patches[0].min()) <= float(patches[0].max()) <= 1


def tiny_run_config(data: Path, steps: int, **changes) -> RestorerTrainConfig:
    raw = {
        "data": [str(data)],
        "steps": steps,
        "batch_size": 2,
        "patch_size": 64,
        "num_workers": 0,
        "log_every": 1,
        "checkpoint_every": 2,
        "warmup_steps": 1,
    }
    return RestorerTrainConfig.from_dict(raw | changes)


def test_training_checkpoints_resumes_and_exports(prepared: Path, tmp_path: Path, two_threads: None) -> None:
    first = train_restorer(tiny_run_config(prepared, 2), tmp_path)
    assert first["finished"] and (tmp_path / "checkpoint" / "model").is_dir()
    more = train_restorer(tiny_run_config(prepared, 4), tmp_path)
    assert more["finished"] and more["step"] == 4 and more["steps_this_run"] == 2, "must resume, not restart"
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    model = OneStepRestorer.from_pretrained(tmp_path / "final")
    out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_time_budget_stops_with_a_checkpoint(prepared: Path, tmp_path: Path) -> None:
    stopped = train_restorer(tiny_run_config(prepared, 50), tmp_path, max_minutes=1e-6)
    assert not stopped["finished"] and (tmp_path / "checkpoint" / "training_state.pt").is_file()
    assert not (tmp_path / "final").exists()


def test_two_stages_autoencoder_then_restorer_with_frozen_decoder(prepared: Path, tmp_path: Path) -> None:
    ae = train_restorer(tiny_run_config(prepared, 2, stage="autoencoder"), tmp_path / "ae")
    assert ae["finished"] and set(ae["last_losses"]) == {"recon_l1", "recon_edge", "kl", "total"}
    start = OneStepRestorer.from_pretrained(tmp_path / "ae" / "final", torch_dtype=torch.float32)
    cfg = tiny_run_config(prepared, 2, model=str(tmp_path / "ae" / "final"), freeze=["vae.decoder", "vae.post_quant_conv"])
    train_restorer(cfg, tmp_path / "restorer")
    end = OneStepRestorer.from_pretrained(tmp_path / "restorer" / "final", torch_dtype=torch.float32)
    before, after = start.vae.decoder.state_dict(), end.vae.decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen decoder must not change"
    assert any(not torch.equal(a, b) for a, b in zip(start.unet.parameters(), end.unet.parameters()))


def test_skip_fusion_stage_trains_decoder_and_fusion_only(prepared: Path, tmp_path: Path) -> None:
    base = train_restorer(tiny_run_config(prepared, 1), tmp_path / "base")
    assert base["finished"]
    start = OneStepRestorer.from_pretrained(tmp_path / "base" / "final", torch_dtype=torch.float32)
    frozen = ["vae.encoder", "vae.quant_conv", "unet", "prompt_embeds"]
    cfg = tiny_run_config(prepared, 2, model=str(tmp_path / "base" / "final"), skip_levels=[1, 2, 3], freeze=frozen)
    assert train_restorer(cfg, tmp_path / "skips")["finished"]
    end = OneStepRestorer.from_pretrained(tmp_path / "skips" / "final", torch_dtype=torch.float32)
    assert end.config.skip_levels == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(start.unet.parameters(), end.unet.parameters())), "the UNet was frozen"
    assert all(torch.equal(a, b) for a, b in zip(start.vae.encoder.parameters(), end.vae.encoder.parameters()))
    assert any(p.abs().sum() > 0 for n, p in end.skip_fusion.named_parameters() if n.endswith("body.3.weight")), "the fusion must learn"
    with pytest.raises(ValueError, match="skip_levels"):
        RestorerTrainConfig.from_dict({"stage": "prior", "skip_levels": [1]})


def test_training_on_shrunk_faces_records_the_working_size(prepared: Path, tmp_path: Path) -> None:
    """`scales` below 1 show the model smaller faces and record that size in its config, which
    is what lets `restore --face-size auto` use it; sizes the model cannot take are refused."""
    patches = CropDataset([prepared], patch_size=32, scales=[0.5])
    assert patches[0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        CropDataset([prepared], patch_size=96, scales=[0.5])[0]
    assert train_restorer(tiny_run_config(prepared, 1, scales=[1.0, 0.5]), tmp_path / "run")["finished"]
    assert OneStepRestorer.from_pretrained(tmp_path / "run" / "final").config.face_sizes == [256, 512]
    for bad in ([], [0.0], [1.5]):
        with pytest.raises(ValueError, match="scales"):
            RestorerTrainConfig.from_dict({"scales": bad})
    with pytest.raises(ValueError, match="scales .*multiples of 32"):  # 512 * 0.3 = 154 px
        train_restorer(tiny_run_config(prepared, 1, scales=[0.3]), tmp_path / "odd")


def test_gate_penalty_trains_the_output_gate_and_needs_one(prepared: Path, tmp_path: Path) -> None:
    """`losses.gate` is logged and trains a gate added to a finished model; without the gate
    level it is refused before any step."""
    assert train_restorer(tiny_run_config(prepared, 1), tmp_path / "base")["finished"]
    base, frozen = str(tmp_path / "base" / "final"), ["vae.encoder", "vae.quant_conv", "unet", "prompt_embeds"]
    with pytest.raises(ValueError, match="output gate"):
        train_restorer(tiny_run_config(prepared, 1, model=base, skip_levels=[1], losses={"gate": 0.1}), tmp_path / "no_gate")
    gated = train_restorer(
        tiny_run_config(prepared, 2, model=base, skip_levels=[1, 4], freeze=frozen, losses={"gate": 0.1}), tmp_path / "gate"
    )
    assert gated["finished"] and gated["last_losses"]["gate"] >= 0
    end = OneStepRestorer.from_pretrained(tmp_path / "gate" / "final", torch_dtype=torch.float32)
    assert end.config.skip_levels == [1, 4] and end.skip_fusion.output_gate.body[-1].weight.abs().sum() > 0


def test_restorer_losses_can_score_what_restore_delivers() -> None:
    """With `color_fix` the losses compare the colour-fixed restoration with HQ: a face whose
    coarse shapes the fix takes from the input is not penalised for the decoder's own."""
    from facerestore_cli.models.color import color_fix_unclamped
    from facerestore_cli.train.restorer import LossWeights, StageObjective

    model = tiny_restorer()
    hq = face_batch(2, 64) * 2 - 1
    lq = torch.nn.functional.avg_pool2d(hq, 3, 1, 1)
    raw, fixed = StageObjective(model, "restorer", LossWeights()), StageObjective(model, "restorer", LossWeights(), "wavelet:2")
    with torch.no_grad():
        restored = model.restore_one_step(lq)[1]
        expected = (color_fix_unclamped(restored, lq, "wavelet:2") - hq).abs().mean()
        assert fixed(lq, hq)["restore_l1"] == pytest.approx(expected.item(), rel=1e-5)
        assert fixed(lq, hq)["restore_l1"] < raw(lq, hq)["restore_l1"], (
            "an untrained decoder's colours are far off; the fix takes the input's"
        )
    for bad in ({"color_fix": "sepia"}, {"stage": "prior", "color_fix": "wavelet:3"}):
        with pytest.raises(ValueError, match="color"):
            RestorerTrainConfig.from_dict(bad)


def test_train_config_rejects_unknown_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("steps = 3\nlearning_rate = 0.1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "learning_rate" in result.output


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("train_tiny*.toml")) + sorted(CONFIGS.glob("experiments/tiny_*.toml")), ids=lambda p: p.name
)
def test_shipped_training_configs_parse(path: Path) -> None:
    cfg = RestorerTrainConfig.from_file(path)
    assert cfg.stage in ("autoencoder", "prior", "restorer") and cfg.steps > 0
    assert isinstance(cfg.degradation, DegradationConfig) and cfg.degradation.jpeg_quality[0] >= 1


def test_prior_then_restorer_with_vsd_perceptual_and_lora_resumes(prepared: Path, tmp_path: Path) -> None:
    prior_cfg = tiny_run_config(prepared, 2, stage="prior", freeze=["vae"])
    prior = train_restorer(prior_cfg, tmp_path / "prior")
    assert prior["finished"] and set(prior["last_losses"]) == {"diffusion", "total"}
    start = OneStepRestorer.from_pretrained(tmp_path / "prior" / "final", torch_dtype=torch.float32)
    changes = dict(
        model=str(tmp_path / "prior" / "final"),
        freeze=["vae.decoder", "vae.post_quant_conv"],
        timestep=250,
        lora_rank=2,
        losses={"perceptual": 0.1, "vsd": 1.0},
    )
    first = train_restorer(tiny_run_config(prepared, 2, **changes), tmp_path / "r")
    assert (tmp_path / "r" / "checkpoint" / "model" / "lora.safetensors").is_file(), "a LoRA run checkpoints its adapters"
    more = train_restorer(tiny_run_config(prepared, 3, **changes), tmp_path / "r")
    assert first["step"] == 2 and more["steps_this_run"] == 1 and more["finished"]
    assert {"restore_l1", "perceptual", "vsd", "fake_score"} <= set(more["last_losses"])
    assert all(np.isfinite(v) for v in more["last_losses"].values())
    end = OneStepRestorer.from_pretrained(tmp_path / "r" / "final", torch_dtype=torch.float32)
    assert end.config.timestep == 250 and not end.lora_adapters
    assert torch.equal(start.vae.decoder.conv_out.weight, end.vae.decoder.conv_out.weight)
    assert not torch.allclose(start.unet.conv_out.weight, end.unet.conv_out.weight), "merged LoRA must change the UNet"


def test_bf16_mixed_precision_trains(prepared: Path, tmp_path: Path) -> None:
    result = train_restorer(tiny_run_config(prepared, 2, precision="bf16"), tmp_path)
    assert result["finished"] and np.isfinite(result["last_losses"]["total"])


def test_two_process_training_through_torchrun(prepared: Path, tmp_path: Path) -> None:
    """accelerate shards the batches over processes (here 2 CPU processes with gloo, as on 2 GPUs)."""
    printed, rows = run_torchrun("train", tiny_run_config(prepared, 2, timestep=250), tmp_path / "run")
    assert printed.count("final model:") == 1, "only the main process reports"
    assert [r["step"] for r in rows] == [1, 2], "one log line per step, from the main process only"
    assert OneStepRestorer.from_pretrained(tmp_path / "run" / "final").config.timestep == 250
