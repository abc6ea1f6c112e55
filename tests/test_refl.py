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
        "frm_warmup_steps": 1,
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
REFL_CONFIGS = [
    *sorted(CONFIGS.glob("refl*.toml")),
    *sorted(CONFIGS.glob("experiments/refl*.toml")),
    *sorted(CONFIGS.glob("paper/refl*.toml")),
]


def test_every_refl_config_is_tested() -> None:
    names = {p.name for p in REFL_CONFIGS}
    assert (
        "refl_tiny.toml" in names
        and {"refl_paper_no_dynamic_frm.toml", "refl_paper_no_structural.toml", "refl_paper_no_regulariser.toml"} <= names
        and {"refl_diffbir.toml", "refl_diffbir_no_dynamic_frm.toml", "refl_diffbir_no_structural.toml", "refl_diffbir_no_regulariser.toml"}
        <= names
    )


@pytest.mark.parametrize("path", REFL_CONFIGS, ids=lambda p: p.name)
def test_shipped_refl_configs_parse(path: Path) -> None:
    cfg = ReflConfig.from_file(path)
    assert cfg.steps > 0 and cfg.degradation.jpeg_quality[0] >= 1
    # the whole ControlNet (lora_rank 0) only for a DiffBIR base, with the paper's regulariser
    assert cfg.lora_rank > 0 or (cfg.model == "diffbir-v1-face" and cfg.regulariser == "control_residuals")


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


# ------------------------------------------------------------------ the paper's form (issue: ReFL parts)
def test_paper_defaults() -> None:
    cfg = ReflConfig()
    assert (cfg.refl_last_steps, cfg.structural_loss, cfg.dtcwt_levels, cfg.regulariser) == (2, "dtcwt", 3, "output_latent")
    assert (cfg.frm_update_every, cfg.frm_lr, cfg.frm_weight_decay, cfg.frm_warmup_steps) == (10, 2e-6, 0.35, 500)
    assert (cfg.frm_grad_clip, cfg.frm_loss_weight, cfg.frm_unlocked_image_groups, cfg.frm_unlocked_text_layers) == (1.0, 0.1, 20, 11)
    assert (cfg.losses.reward, cfg.losses.structural, cfg.losses.perceptual, cfg.losses.regulariser) == (0.005, 0.01, 0.01, 1e-4)


def unet_call_counter(model: OneStepRestorer) -> tuple[list[bool], list[int]]:
    """Per UNet call: whether its output carries a graph, and how often backward passed through it."""
    with_grad, backward = [], []

    def hook(module, args, out):
        i = len(with_grad)
        with_grad.append(out.sample.requires_grad)
        backward.append(0)
        if out.sample.requires_grad:
            out.sample.register_hook(lambda g: backward.__setitem__(i, backward[i] + 1))

    model.unet.register_forward_hook(hook)
    return with_grad, backward


def test_few_step_refl_trains_only_a_late_step_m_after_a_no_grad_prefix(assets, monkeypatch) -> None:
    from facerestore_cli.train import refl

    model, _, objective = build_refl(tiny_config(assets, sampling_steps=4))
    assert model.config.sampling_steps == 4
    assert not any(n.startswith("vae.") for n, _ in model.named_parameters() if ".lora_" in n), "few-step: LoRA on the UNet only"
    etas = []
    real = refl.step_distribution
    monkeypatch.setattr(refl, "step_distribution", lambda m, z, t, tp, eta, fs: etas.append(eta) or real(m, z, t, tp, eta, fs))
    with_grad, backward = unet_call_counter(model)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(8):
        with_grad.clear(), backward.clear(), etas.clear()
        terms, _ = objective(torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1, gen=gen)
        m = int(terms["refl_step"])
        seen.add(m)
        model.zero_grad(set_to_none=True)
        terms["total"].backward()
        calls = m + 1 + (1 if terms.get("regulariser") is not None else 0)  # the prefix, step m, the frozen base's step m
        assert len(with_grad) == calls and with_grad[: m + 1] == [False] * m + [True], "only step m runs with gradients"
        assert backward[:m] == [0] * m and backward[m] == 1, "backward passes through step m only"
        assert len(etas) == m and all(0 <= e <= 1 for e in etas)
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n), "the base stays frozen"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_" in n)
    assert seen == {2, 3}, "m is one of the last refl_last_steps = 2 steps"


def test_one_step_model_keeps_its_single_step(assets) -> None:
    model, _, objective = build_refl(tiny_config(assets))
    with_grad, backward = unet_call_counter(model)
    terms, _ = objective(torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1)
    terms["total"].backward()
    assert int(terms["refl_step"]) == 0 and with_grad[0] and backward[0] == 1


@pytest.mark.parametrize("steps", [1, 3])
def test_regulariser_is_zero_at_the_start(assets, steps: int) -> None:
    _, _, objective = build_refl(tiny_config(assets, sampling_steps=steps))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        terms, _ = objective(torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1, gen=gen)
        assert float(terms["regulariser"].detach()) == pytest.approx(0.0, abs=1e-10)
    assert objective.describe()["regulariser"] == "output_latent_vs_frozen_base"


def test_regulariser_is_pluggable(assets, monkeypatch) -> None:
    from facerestore_cli.train import refl_losses

    class Residuals:
        name = "control_residuals_vs_fixed"

        def __call__(self, model, step):
            return step.x0.float().pow(2).mean()

    monkeypatch.setitem(refl_losses.REGULARISERS, "residuals", Residuals)
    _, _, objective = build_refl(tiny_config(assets, regulariser="residuals"))
    terms, _ = objective(torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1)
    assert float(terms["regulariser"].detach()) > 0 and objective.describe()["regulariser"] == "control_residuals_vs_fixed"
    with pytest.raises(ValueError, match="regulariser must be one of"):
        build_refl(tiny_config(assets, regulariser="nope"))


def test_structural_loss_is_the_dtcwt_low_pass(assets) -> None:
    from facerestore_cli.train.refl_losses import LowPassL1, dtcwt_forward

    loss = LowPassL1("dtcwt", 3)
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    ref = dtcwt_forward(3, "near_sym_b", "qshift_b")
    assert float(loss(a, b)) == pytest.approx(float((ref(a)[0] - ref(b)[0]).abs().mean()), rel=1e-5)
    assert float(loss(a, a)) == 0.0 and loss.name == "dtcwt_lowpass(J=3, near_sym_b, qshift_b)"
    _, _, objective = build_refl(tiny_config(assets))
    assert objective.describe()["structural"].startswith("dtcwt_lowpass")
    _, _, objective = build_refl(tiny_config(assets, structural_loss="blur_pyramid"))
    assert objective.describe()["structural"] == "blur_pyramid(levels=2)"


class TinyVgg(torch.nn.Module):
    """lpips' vgg16 layout (slice1..5 holding vgg.features indices, same output channels), 1x1 convs."""

    def __init__(self, requires_grad: bool = False, pretrained: bool = True) -> None:
        super().__init__()
        assert not pretrained, "nothing may be downloaded"
        chans, first = [3, 64, 128, 256, 512, 512], [0, 5, 10, 17, 24]
        for k in range(5):
            setattr(self, f"slice{k + 1}", torch.nn.Sequential())
            getattr(self, f"slice{k + 1}").add_module(str(first[k]), torch.nn.Conv2d(chans[k], chans[k + 1], 1))
        self.N_slices = 5

    def forward(self, x):
        outs = []
        for k in range(5):
            x = getattr(self, f"slice{k + 1}")(x)
            outs.append(x)
        return outs


def test_lpips_vgg_from_a_local_file_else_the_named_fallback(assets, monkeypatch, tmp_path: Path) -> None:
    lpips = pytest.importorskip("lpips")
    from facerestore_cli.train.refl_losses import LpipsLoss

    monkeypatch.setattr(lpips.pretrained_networks, "vgg16", TinyVgg)
    vgg = {f"features.{n.split('.', 1)[1]}": v.normal_() for n, v in TinyVgg(pretrained=False).state_dict().items()}
    torch.save(vgg, tmp_path / "vgg16.pth")
    loss = LpipsLoss(tmp_path / "vgg16.pth")
    assert torch.equal(loss.lpips.net.slice3.get_submodule("10").weight, vgg["features.10.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0.0 and float(loss(x, -x)) > 0
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not torchvision's VGG16"):
        LpipsLoss(tmp_path / "bad.pth")
    _, _, objective = build_refl(tiny_config(assets, lpips_vgg=str(tmp_path / "vgg16.pth")))
    assert objective.describe()["perceptual"] == "lpips_vgg"
    _, _, objective = build_refl(tiny_config(assets))
    assert objective.describe()["perceptual"].startswith("encoder_features (fallback")


def test_fallbacks_and_captions_are_named_in_log_and_summary(assets, tmp_path: Path) -> None:
    result = train_refl(tiny_config(assets, steps=1, caption="a photo of a face"), tmp_path)
    assert result["perceptual"].startswith("encoder_features (fallback") and result["structural"].startswith("dtcwt_lowpass")
    assert result["regulariser"] == "output_latent_vs_frozen_base" and result["trained_step"] == "the single step"
    assert result["captions"] == "unused (this FRM reads no captions)"
    row = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert row["setup"]["perceptual"] == result["perceptual"]


@pytest.fixture()
def captioned_frm(tmp_path: Path) -> Path:
    from fakes import TINY_FRM

    from facerestore_cli.rewards.frm import FaceRewardModel, FrmConfig

    torch.manual_seed(2)
    return FaceRewardModel(FrmConfig.from_dict(TINY_FRM | {"text": "hash"})).save_pretrained(tmp_path / "frm_hash")


def test_captions_feed_the_frm(assets, captioned_frm: Path, tmp_path: Path, monkeypatch) -> None:
    from facerestore_cli.data.captions import CaptionLookup
    from facerestore_cli.data.crops import CropDataset
    from facerestore_cli.rewards.frm import FaceRewardModel

    rows = [{"image": f"{i:06d}.png", "caption": f"face number {i}"} for i in range(5)]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lookup = CaptionLookup.from_config(str(tmp_path / "caps.jsonl"), "a face")
    data = CropDataset([assets["data"]], captions=lookup)
    assert data[1][1] == "face number 1" and data[5][1] == "a face" and (lookup.found, lookup.missing) == (5, 1)
    seen: list[str] = []
    real = FaceRewardModel.forward
    monkeypatch.setattr(FaceRewardModel, "forward", lambda self, x, caps=None: seen.extend(caps or []) or real(self, x, caps))
    cfg = tiny_config(assets, steps=1, frm=str(captioned_frm), captions=str(tmp_path / "caps.jsonl"), caption="a face")
    result = train_refl(cfg, tmp_path / "run")
    assert result["captions"] == f"{tmp_path / 'caps.jsonl'}: 5 faces captioned, 1 with the fixed 'a face'"
    assert set(seen) <= {r["caption"] for r in rows} | {"a face"} and any(c.startswith("face number") for c in seen)
    fixed = train_refl(tiny_config(assets, steps=1, frm=str(captioned_frm), caption="a face"), tmp_path / "fixed")
    assert fixed["captions"] == "fixed: 'a face'"


def test_captions_beside_each_image(assets, tmp_path: Path) -> None:
    import shutil

    from facerestore_cli.data.captions import CaptionLookup
    from facerestore_cli.data.crops import CropDataset

    data = tmp_path / "faces"
    shutil.copytree(assets["data"], data)
    (data / "000002.txt").write_text("smiling woman\n")
    ds = CropDataset([data], captions=CaptionLookup.from_config("txt", ""))
    assert ds[2][1] == "smiling woman" and ds[0][1] == ""
    with pytest.raises(ValueError, match="none of the 6 crops"):
        (tmp_path / "empty.jsonl").write_text(json.dumps({"image": "other.png", "caption": "x"}) + "\n")
        CropDataset([data], captions=CaptionLookup.from_config(str(tmp_path / "empty.jsonl"), ""))


def test_dynamic_frm_trains_only_its_last_groups_with_the_papers_decay(assets, tmp_path: Path) -> None:
    from facerestore_cli.train.refl import frm_optimizer

    cfg = tiny_config(assets, steps=2, frm_unlocked_compact_groups=1)
    _, frm, _ = build_refl(cfg)
    opt = frm_optimizer(frm, cfg)
    names = {id(p): n for n, p in frm.named_parameters()}
    decay, other = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.35, 0.0]
    assert decay and all(n.endswith(".weight") and "visual.head" in n for n in decay)
    assert "backbone.logit_scale" in other and all(n.endswith("bias") or "logit_scale" in n or "query" in n for n in other)
    assert not any("stem" in n or "stages" in n for n in decay | other), "stem and stages are locked"
    result = train_refl(cfg, tmp_path)
    assert result["frm_updates"] == 2
    start, after = frm_state(assets["frm"]), frm_state(tmp_path / "frm_final")
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all("visual.head" in k or "query" in k or "logit_scale" in k for k in changed)
    assert all(torch.equal(start[k], after[k]) for k in start if "stem" in k or "stages" in k), "locked layers do not change"


def test_dynamic_frm_warms_up_then_stays_constant(assets) -> None:
    from facerestore_cli.train.refl import ReflMethod

    method = ReflMethod(tiny_config(assets, frm_lr=2e-6, frm_warmup_steps=500))
    rates = []
    for updates in (0, 249, 499, 1000):
        method.frm_updates = updates
        rates.append(method.frm_lr_now())
    assert rates == pytest.approx([2e-6 / 500, 1e-6, 2e-6, 2e-6])


def test_open_clip_frm_unlocks_the_last_image_groups_and_text_layers() -> None:
    pytest.importorskip("open_clip")
    from test_rewards_frm import TINY_CLIP

    from facerestore_cli.rewards.frm import FaceRewardModel, FrmConfig
    from facerestore_cli.train.refl import frm_optimizer

    frm = FaceRewardModel(FrmConfig(backbone="open_clip", clip=TINY_CLIP))
    opt = frm_optimizer(frm, ReflConfig(frm_unlocked_image_groups=2, frm_unlocked_text_layers=2))
    names = {id(p): n for n, p in frm.named_parameters()}
    decay, other = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    trained = decay | other
    assert "backbone.clip.logit_scale" in other and not any("ln_" in n or n.endswith("bias") for n in decay)
    # open_clip's groups: the last 2 are [last block, final LayerNorm] and the projection, in each tower
    for tower in ("backbone.clip.visual.transformer", "backbone.clip.transformer"):
        assert any(n.startswith(f"{tower}.resblocks.1.") for n in trained) and not any(
            n.startswith(f"{tower}.resblocks.0.") for n in trained
        )
    assert {"backbone.clip.visual.proj", "backbone.clip.text_projection", "backbone.clip.ln_final.weight"} <= trained
    assert not any("token_embedding" in n or "conv1" in n for n in trained)
    assert not any(p.requires_grad for p in frm.parameters()), "the FRM needs no grads outside its own step"


def test_refl_stops_on_time_and_resumes(assets, tmp_path: Path) -> None:
    stopped = train_refl(tiny_config(assets, steps=3), tmp_path, max_minutes=1e-6)
    assert not stopped.finished and stopped.step == 1 and not (tmp_path / "final").exists()
    done = train_refl(tiny_config(assets, steps=3), tmp_path)
    assert done.finished and done.step == 3 and done.steps_this_run == 2 and done["frm_updates"] == 3
