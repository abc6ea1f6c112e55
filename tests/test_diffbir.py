"""DiffBIR v1 stage 2 on diffusers parts: layouts, the IRControlNet mapping, samplers, the pipeline.

Full-size layouts are checked on the meta device against the upstream key lists (no memory);
everything that runs uses tiny random models written in the exact upstream layouts (ldm names,
`{"state_dict": ...}` container, flat IRControlNet), made by renaming tiny diffusers models'
tensors back to upstream names. That renaming is itself checked against the full-size lists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from upstream_fakes import TINY_SD as TINY
from upstream_fakes import ldm_vae_key, tiny_sd_models, write_ldm_file

from facerestore_cli.errors import FacerestoreError
from facerestore_cli.models import controlnet as cn
from facerestore_cli.models import sd21
from facerestore_cli.models.checkpoints import CheckpointError
from facerestore_cli.models.diffbir import PRESETS, DiffBIRRestorer, SamplerSettings, make_scheduler, respaced_timesteps

KEYS = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "keys"


# ------------------------------------------------------------------------------ tiny upstream files


def tiny_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The tiny SD parts of upstream_fakes and a ControlNet whose output convs are not zero."""
    from diffusers import ControlNetModel

    models = tiny_sd_models(seed)
    net = ControlNetModel(**cn.controlnet_config(TINY["unet"]))
    with torch.no_grad():  # diffusers zero-initialises the output convs: make the residuals count
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.05)
            elif name.startswith(cn.HINT_PREFIX):
                p.zero_()
    return {**models, "controlnet": net}


def write_tiny_files(root: Path, models: dict[str, torch.nn.Module]) -> dict[str, Path]:
    paths = {"sd": write_ldm_file(root / "v2-1_512-ema-pruned.ckpt", models), "controlnet": root / "v1_face.pth"}
    cn.save_controlnet(models["controlnet"], paths["controlnet"])
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    models = tiny_models()
    return {"models": models, **write_tiny_files(tmp_path_factory.mktemp("diffbir"), models)}


def identity_stage1(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------ full-size layouts (meta)
@pytest.fixture(scope="module")
def layout() -> dict:
    if not (KEYS / "diffbir_modules_layout.json").is_file():
        pytest.skip(f"upstream key lists absent: {KEYS} (shared/upstream/keys is outside the repository)")
    return {
        "modules": json.loads((KEYS / "diffbir_modules_layout.json").read_text()),
        "irc": json.loads((KEYS / "irc_controlnet_to_diffusers.json").read_text()),
    }


def meta_state(entries: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(shape, device="meta") for k, (shape, _dtype) in entries.items()}


def shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if v is not None}


def test_full_size_sd_layout_converts_exactly(layout: dict) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    L, cfgs = layout["modules"], sd21.sd21_configs()
    state = {
        **meta_state(L["unet"], sd21.LDM_UNET_PREFIX),
        **meta_state(L["vae"], sd21.LDM_VAE_PREFIX),
        **meta_state(L["clip"], "cond_stage_model."),
    }
    unet, vae = sd21._on_meta(UNet2DConditionModel, cfgs["unet"]), sd21._on_meta(AutoencoderKL, cfgs["vae"])
    text = sd21._on_meta(CLIPTextModel, {"config": CLIPTextConfig(**cfgs["text_encoder"])})
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724  # SPEC §0
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    for model, converted in (
        (unet, sd21.convert_unet(state, cfgs["unet"])),
        (vae, sd21.convert_vae(state, cfgs["vae"])),
        (text, sd21.convert_clip(state, 23)),
    ):
        assert shapes(converted) == shapes(model.state_dict())
    # the renaming the tiny files are written with gives exactly the upstream names
    assert {cn.diffusers_to_ldm_key(k) for k in unet.state_dict()} == set(L["unet"])
    assert {ldm_vae_key(k, 4) for k in vae.state_dict()} == set(L["vae"])


def test_full_size_controlnet_mapping(layout: dict) -> None:
    L, irc = layout["modules"]["controlnet"], layout["irc"]
    config = cn.controlnet_config(sd21.sd21_configs()["unet"])
    assert config["in_channels"] == 8 and config["conditioning_channels"] == 3
    expected = cn.irc_expected_shapes(config)
    assert len(expected) == 324 and expected == {k: tuple(s) for k, (s, _) in L.items()}
    converted = cn.irc_to_diffusers(meta_state(L), config)
    assert len(converted) == 340 and shapes(converted) == shapes(cn._meta_controlnet(config).state_dict())
    synthetic = {v[0]: tuple(v[1]) for k, v in irc.items() if k.startswith("(synthetic")}
    assert len(synthetic) == 16 and {k: shapes(converted)[k] for k in synthetic} == synthetic
    zeros = cn.hint_block_zeros(config)
    assert len(zeros) == 16 and all(float(t.abs().sum()) == 0 for t in zeros.values())
    for key, (target, shape) in irc.items():
        if not key.startswith("(synthetic"):
            assert target in converted and tuple(converted[target].shape) == tuple(shape)
            assert cn.diffusers_to_ldm_key(target) == key


# ------------------------------------------------------------------------------ ControlNet file
def test_controlnet_round_trip_and_containers(tiny: dict, tmp_path: Path) -> None:
    ref = tiny["models"]["controlnet"].state_dict()
    flat = torch.load(tiny["controlnet"], weights_only=True)
    assert not any(k.startswith(("input_hint_block", "controlnet_cond")) for k in flat)
    assert set(flat) == set(cn.irc_expected_shapes(cn.controlnet_config(TINY["unet"])))
    variants = {
        "flat": flat,
        "wrapped": {"state_dict": {f"module.{k}": v for k, v in flat.items()}},
        "lrpo": {**{f"controlnet.{k}": v for k, v in flat.items()}, "fixed_controlnet.x": torch.zeros(1)},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        net = cn.load_controlnet(tmp_path / f"{name}.pth", TINY["unet"])
        got = net.state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), name
    cn.save_controlnet(net, tmp_path / "tuned.safetensors", dtype=torch.float16)
    half = cn.load_controlnet(tmp_path / "tuned.safetensors", TINY["unet"])
    assert half.dtype == torch.float16 and torch.equal(half.state_dict()["conv_in.weight"], ref["conv_in.weight"].half())


def test_zero_hint_contributes_exactly_nothing(tiny: dict) -> None:
    net = tiny["models"]["controlnet"]
    sample, ctx = torch.randn(1, 8, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert not net.controlnet_cond_embedding(torch.randn(1, 3, 64, 64)).any()
        a = net(sample, 10, ctx, controlnet_cond=torch.zeros(1, 3, 64, 64), return_dict=False)
        b = net(sample, 10, ctx, controlnet_cond=torch.rand(1, 3, 64, 64), return_dict=False)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    assert any(float(r.abs().max()) > 0 for r in a[0])


def test_saving_refuses_a_trained_hint_network(tiny: dict, tmp_path: Path) -> None:
    state = dict(tiny["models"]["controlnet"].state_dict())
    state["controlnet_cond_embedding.conv_out.bias"] = torch.ones_like(state["controlnet_cond_embedding.conv_out.bias"])
    with pytest.raises(FacerestoreError, match="hint network"):
        cn.diffusers_to_irc(state)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_wrong_files_in_the_slots(tiny: dict, tmp_path: Path) -> None:
    swinir = tmp_path / "face_swinir_v1.ckpt"
    torch.save({"state_dict": {"conv_first.1.weight": torch.zeros(4, 3, 3, 3), "patch_embed.norm.weight": torch.ones(4)}}, swinir)
    with pytest.raises(CheckpointError) as err:
        cn.load_controlnet(swinir, TINY["unet"])
    assert one_line(err).startswith("controlnet: ") and "SwinIR" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        cn.load_controlnet(tiny["sd"], TINY["unet"])
    assert one_line(err).startswith("controlnet: ") and "Stable Diffusion ldm checkpoint" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        sd21.load_sd21_ldm(tiny["controlnet"], configs=TINY)
    assert one_line(err).startswith("sd: ") and "DiffBIR ControlNet" in str(err.value)
    with pytest.raises(CheckpointError) as err:  # a ControlNet of another size
        cn.load_controlnet(tiny["controlnet"], sd21.sd21_configs()["unet"])
    assert one_line(err).startswith("controlnet: ") and "missing, e.g. input_blocks.7.0.skip_connection" in str(err.value)
    for name in ("controlnet", "sd"):
        cut = tmp_path / f"cut_{name}"
        data = tiny[name].read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as err:
            cn.load_controlnet(cut, TINY["unet"]) if name == "controlnet" else sd21.load_sd21_ldm(cut, configs=TINY)
        assert one_line(err).startswith(f"{'controlnet' if name == 'controlnet' else 'sd'}: ") and "truncated" in str(err.value)


# ------------------------------------------------------------------------------ SD parts and the prompt
def test_sd_parts_and_empty_prompt(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = sd21.empty_prompt_ids()
    assert ids.shape == (1, 77) and ids[0, :2].tolist() == [49406, 49407] and not ids[0, 2:].any()
    sd21._PROMPT_CACHE.clear()
    parts = sd21.load_sd21_ldm(tiny["sd"], configs=TINY, cache_dir=tmp_path)
    m = tiny["models"]
    for ours, ref in ((parts.unet, m["unet"]), (parts.vae, m["vae"])):
        want = ref.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in ours.state_dict().items())
    with torch.no_grad():  # SD 2's context: the penultimate block, then the final layer norm
        hidden = m["text"](input_ids=ids, output_hidden_states=True).hidden_states[-2]
        want = m["text"].final_layer_norm(hidden)
    assert parts.prompt_embeds.shape == (1, 77, 32)
    torch.testing.assert_close(parts.prompt_embeds, want, rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.glob("sd21_empty_prompt_*.safetensors"))) == 1
    # cached: neither memory nor the folder cache runs the text tower again
    monkeypatch.setattr(sd21, "encode_empty_prompt", lambda *a, **k: pytest.fail("re-encoded"))
    assert torch.equal(sd21.load_sd21_ldm(tiny["sd"], configs=TINY, cache_dir=tmp_path).prompt_embeds, parts.prompt_embeds)
    sd21._PROMPT_CACHE.clear()
    assert torch.equal(sd21.load_sd21_ldm(tiny["sd"], configs=TINY, cache_dir=tmp_path).prompt_embeds, parts.prompt_embeds)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(FacerestoreError) as err:
        sd21.empty_prompt_ids()
    assert "`clip` extra" in one_line(err)


def test_diffusers_folder(tiny: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tiny["models"]["vae"].save_pretrained(tmp_path / "vae")
    tiny["models"]["unet"].save_pretrained(tmp_path / "unet")
    save_file({"prompt_embeds": torch.ones(1, 77, 32)}, str(tmp_path / "prompt_embeds.safetensors"))
    parts = sd21.load_sd21(tmp_path)
    assert torch.equal(parts.prompt_embeds, torch.ones(1, 77, 32)) and parts.unet.config.cross_attention_dim == 32


# ------------------------------------------------------------------------------ sampler maths
def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_spaced_timesteps_match_iddpm() -> None:
    ts = respaced_timesteps(50)
    assert len(ts) == 50 and ts[:4] == [0, 20, 41, 61] and ts[-2:] == [979, 999]
    assert respaced_timesteps(1) == [0] and respaced_timesteps(1000) == list(range(1000))
    sched = make_scheduler(SamplerSettings("spaced", 50))
    assert sched.timesteps.tolist() == ts[::-1] and sched.config.variance_type == "fixed_small"
    # one spaced step is the DDPM posterior between the respaced neighbours (fixed-small variance)
    ac = alphas_cumprod()
    t, prev = 61, 41
    x, eps = torch.randn(1, 4, 2, 2, dtype=torch.float64), torch.randn(1, 4, 2, 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    got = sched.step(eps.float(), t, x.float(), generator=gen).prev_sample.double()
    beta = 1 - ac[t] / ac[prev]
    x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
    mean = ac[prev].sqrt() * beta / (1 - ac[t]) * x0 + (1 - beta).sqrt() * (1 - ac[prev]) / (1 - ac[t]) * x
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3)).double()
    var = (1 - ac[prev]) / (1 - ac[t]) * beta
    torch.testing.assert_close(got, mean + var.sqrt() * noise, rtol=1e-4, atol=1e-5)


def test_ddim_steps_match_closed_forms() -> None:
    ac = alphas_cumprod()
    sched = make_scheduler(SamplerSettings("ddim", 50, 0.0))
    assert sched.timesteps[:2].tolist() == [981, 961] and sched.timesteps[-1].item() == 1
    x, eps = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for t in (981, 501, 1):
        prev = t - 20
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else ac[0])  # set_alpha_to_one=False
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        want = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        got = sched.step(eps.float(), t, x.float(), eta=0.0).prev_sample.double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # eta = 1: the added noise has sigma_t = sqrt((1-a_prev)/(1-a_t)) * sqrt(1 - a_t/a_prev)
        n = torch.randn(2, 4, 4, 4)
        noisy = sched.step(eps.float(), t, x.float(), eta=1.0, variance_noise=n).prev_sample
        quiet = sched.step(eps.float(), t, x.float(), eta=1.0, variance_noise=torch.zeros_like(n)).prev_sample
        sigma = ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        torch.testing.assert_close((noisy - quiet).double(), sigma * n.double(), rtol=1e-4, atol=1e-6)


def test_settings_and_presets() -> None:
    assert PRESETS["diffbir_v1"] == SamplerSettings("spaced", 50, 0.0, 231)
    assert PRESETS["diffusionreward"] == SamplerSettings("ddim", 50, 1.0, 231)
    assert PRESETS["lrpo"] == SamplerSettings("ddim", 50, 0.8, 232)
    for bad in (SamplerSettings("euler"), SamplerSettings(steps=0), SamplerSettings("ddim", eta=1.5), SamplerSettings("spaced", eta=0.5)):
        with pytest.raises(FacerestoreError):
            bad.validated()


# ------------------------------------------------------------------------------ the pipeline
def test_pipeline_end_to_end(tiny: dict, one_thread: None) -> None:
    model = DiffBIRRestorer.from_files(tiny["sd"], tiny["controlnet"], identity_stage1, preset="lrpo", steps=2, sd_configs=TINY)
    assert (model.sampler, model.steps, model.eta, model.seed) == ("ddim", 2, 0.8, 232)
    assert model.config.face_size == 512 and model.config.size_multiple == 64 and model.takes_any_size
    assert model.config.extra["color_fix"] == "wavelet:5" and model.dtype == torch.float32
    calls: list[int] = []
    model.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    a = model(x)
    assert calls == [2, 2]  # both faces, every step together
    assert a.shape == x.shape and torch.isfinite(a).all() and a.abs().max() <= 1
    assert torch.equal(model(x), a)
    model.seed = 7
    assert not torch.equal(model(x), a)
    model.configure(preset="diffbir_v1", steps=2)
    calls.clear()
    b = model(x)
    assert calls == [2, 2] and model.config.extra["sampler"] == "spaced" and torch.isfinite(b).all()
    with pytest.raises(FacerestoreError):
        model(torch.zeros(1, 3, 48, 64))
    model.configure(steps=1).to(torch.bfloat16)  # dtype-generic: the latent stays float32 between steps
    c = model(x.to(torch.bfloat16))
    assert c.dtype == torch.bfloat16 and model.dtype == torch.bfloat16 and torch.isfinite(c.float()).all()
