"""OSEDiff from the SD 2.1 ldm single file or a diffusers folder, plus the upstream `.pkl`.

Tiny random models are written in the exact upstream layouts (upstream_fakes): the ldm file and
a diffusers folder of the same weights, and an OSEDiff pkl made with peft the way OSEDiff makes
it. The full-size pkl layout is checked on the meta device against the upstream key list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakes import face_like
from upstream_fakes import TINY_SD, tiny_sd_models, write_ldm_file, write_osediff_pkl, write_sd_folder

from facerestore_cli.models import sd21
from facerestore_cli.models.checkpoints import CheckpointError
from facerestore_cli.models.upstream import (
    OSEDiffCheckpointError,
    apply_osediff_checkpoint,
    load_osediff,
    load_sd21_restorer,
    read_osediff_pkl,
)

KEYS = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "keys"
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny SD 2.1 as the ldm file and as a folder, an OSEDiff pkl for it, and the pkl's
    adapted reference models."""
    root = tmp_path_factory.mktemp("osediff")
    models = tiny_sd_models(seed=0)
    ref_unet, ref_vae = write_osediff_pkl(root / "osediff_face.pkl", models["unet"], models["vae"])
    return {
        "models": models,
        "ldm": write_ldm_file(root / "v2-1_512-ema-pruned.ckpt", models),
        "folder": write_sd_folder(root / "sd21", models),
        "pkl": root / "osediff_face.pkl",
        "ref_unet": ref_unet,
        "ref_vae": ref_vae,
    }


def face_batch(h: int = 64, w: int = 64) -> torch.Tensor:
    img = torch.from_numpy(face_like(max(h, w), seed=3)[:h, :w]).permute(2, 0, 1).float()
    return (img / 127.5 - 1)[None]


@torch.no_grad()
def osediff_forward(unet: torch.nn.Module, vae: torch.nn.Module, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """OSEDiff's test-time forward written out: encoder mode, one ε step at t = 999, decoder."""
    sched = sd21.build_scheduler("ddpm")
    sf = vae.config.scaling_factor
    z = vae.encode(x).latent_dist.mode() * sf
    eps = unet(z, torch.tensor([999]), encoder_hidden_states=context).sample
    a = sched.alphas_cumprod[999]
    z0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return vae.decode(z0 / sf).sample.clamp(-1, 1)


@torch.no_grad()
def empty_context(text: torch.nn.Module) -> torch.Tensor:
    """SD 2's context of "": the penultimate block of the tower, then its final layer norm."""
    hidden = text(input_ids=sd21.empty_prompt_ids(), output_hidden_states=True).hidden_states[-2]
    return text.final_layer_norm(hidden)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------ loading and restoring
def test_osediff_from_the_ldm_file_restores_as_osediff_does(tiny: dict, one_thread: None) -> None:
    model = load_osediff(tiny["ldm"], tiny["pkl"], configs=TINY_SD)
    assert not model.lora_adapters and model.config.timestep == 999 and model.config.name == "sd21"
    assert model.dtype == torch.float32 and not model.training
    x = face_batch()
    with torch.no_grad():
        out = model(x)
    context = empty_context(tiny["models"]["text"])
    torch.testing.assert_close(model.prompt_embeds.data, context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, osediff_forward(tiny["ref_unet"], tiny["ref_vae"], context, x), atol=1e-4, rtol=0)
    with torch.no_grad():  # any size: padded to the size multiple and cropped back
        odd = model(face_batch(72, 56))
        base = load_sd21_restorer(tiny["ldm"], configs=TINY_SD)(x)
    assert odd.shape == (1, 3, 72, 56) and torch.isfinite(odd).all() and odd.abs().max() <= 1
    assert (out - base).abs().mean() > 1e-3, "the LoRA must change the output"


def test_ldm_file_and_folder_give_the_same_restorer(tiny: dict, one_thread: None) -> None:
    x = face_batch()
    from_file = load_sd21_restorer(tiny["ldm"], configs=TINY_SD)
    from_folder = load_sd21_restorer(tiny["folder"])
    torch.testing.assert_close(from_file.prompt_embeds.data, from_folder.prompt_embeds.data, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_file.scheduler.alphas_cumprod, from_folder.scheduler.alphas_cumprod)
    with torch.no_grad():
        torch.testing.assert_close(from_file(x), from_folder(x), atol=1e-5, rtol=0)
        tuned_file = load_osediff(tiny["ldm"], tiny["pkl"], configs=TINY_SD)(x)
        tuned_folder = load_osediff(tiny["folder"], tiny["pkl"])(x)
    torch.testing.assert_close(tuned_file, tuned_folder, atol=1e-5, rtol=0)


def test_lora_scale_is_two(tiny: dict) -> None:
    """peft's default alpha 8 at OSEDiff's rank 4: merged W = W0 + 2·B·A, checked by hand."""
    base = load_sd21_restorer(tiny["ldm"], configs=TINY_SD)
    tuned = load_osediff(tiny["ldm"], tiny["pkl"], configs=TINY_SD)
    ckpt = torch.load(tiny["pkl"], weights_only=True)
    assert ckpt["rank_unet"] == 4
    checks = [
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "default_encoder", "state_dict_unet"),
        ("unet", "up_blocks.1.resnets.0.conv1", "default_decoder", "state_dict_unet"),
        ("unet", "mid_block.attentions.0.proj_in", "default_others", "state_dict_unet"),
        ("vae", "encoder.mid_block.attentions.0.to_q", "default_encoder", "state_dict_vae"),
        ("vae", "quant_conv", "default_encoder", "state_dict_vae"),
    ]
    for part, name, adapter, key in checks:
        a = ckpt[key][f"{name}.lora_A.{adapter}.weight"]
        b = ckpt[key][f"{name}.lora_B.{adapter}.weight"]
        w0 = getattr(base, part).get_submodule(name).weight
        delta = (b.flatten(1) @ a.flatten(1)).reshape(w0.shape)  # a conv's B is 1x1: a matrix product
        torch.testing.assert_close(getattr(tuned, part).get_submodule(name).weight, w0 + 2.0 * delta, atol=1e-6, rtol=1e-5)
    # conv_in is trained in full: the pkl's base weight, then its LoRA on top
    a, b = (ckpt["state_dict_unet"][f"conv_in.lora_{s}.default_encoder.weight"] for s in "AB")
    w0 = ckpt["state_dict_unet"]["conv_in.base_layer.weight"]
    want = w0 + 2.0 * (b.flatten(1) @ a.flatten(1)).reshape(w0.shape)
    torch.testing.assert_close(tuned.unet.conv_in.weight, want, atol=1e-6, rtol=1e-5)
    assert not torch.equal(tuned.unet.conv_in.weight, base.unet.conv_in.weight)
    assert torch.equal(tuned.unet.time_embedding.linear_1.weight, base.unet.time_embedding.linear_1.weight)
    for n, p in base.vae.decoder.named_parameters():  # OSEDiff leaves the decoder alone
        assert torch.equal(tuned.vae.decoder.get_parameter(n), p), n


# ------------------------------------------------------------------------------ wrong files
def test_wrong_files_given_as_the_pkl(tiny: dict, tmp_path: Path) -> None:
    controlnet = tmp_path / "v1_face.pth"
    torch.save({"zero_convs.0.0.weight": torch.zeros(4, 4, 1, 1), "middle_block_out.0.bias": torch.zeros(4)}, controlnet)
    cut = tmp_path / "cut.pkl"
    data = tiny["pkl"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    absent_sd = tmp_path / "no_sd.ckpt"  # the pkl is read first: its error comes before any SD loading
    for pkl, what in (
        (tiny["ldm"], "Stable Diffusion ldm checkpoint"),
        (controlnet, "DiffBIR ControlNet"),
        (cut, "truncated"),
    ):
        with pytest.raises(CheckpointError) as err:
            load_osediff(absent_sd, pkl, configs=TINY_SD)
        msg = one_line(err)
        assert msg.startswith(f"osediff: {pkl}: ") and what in msg, msg
    with pytest.raises(FileNotFoundError, match="OSEDiff checkpoint not found"):
        load_osediff(tiny["ldm"], tmp_path / "none.pkl", configs=TINY_SD)
    torch.save({"state_dict_unet": {}, "rank_unet": 4}, tmp_path / "partial.pkl")
    with pytest.raises(OSEDiffCheckpointError) as err:
        read_osediff_pkl(tmp_path / "partial.pkl")
    assert "missing keys unet_lora_encoder_modules" in one_line(err) and isinstance(err.value, ValueError)
    with pytest.raises(CheckpointError) as err:  # an SD file in the sd slot of another kind is the sd loader's line
        load_sd21_restorer(controlnet, configs=TINY_SD)
    assert one_line(err).startswith("sd: ")


def test_checkpoint_tensors_must_all_land(tiny: dict) -> None:
    ckpt = dict(read_osediff_pkl(tiny["pkl"]))
    ckpt["state_dict_unet"] = {**ckpt["state_dict_unet"], "down_blocks.7.resnets.0.conv1.lora_A.default_encoder.weight": torch.zeros(4, 4)}
    with pytest.raises(OSEDiffCheckpointError) as err:
        apply_osediff_checkpoint(load_sd21_restorer(tiny["ldm"], configs=TINY_SD), ckpt, "x.pkl")
    assert "1 UNet tensors have no place in this model (e.g. down_blocks.7" in one_line(err)


# ------------------------------------------------------------------------------ full size (meta)
def test_full_size_pkl_layout_lands_on_sd21_base() -> None:
    """Every `state_dict_unet` / `state_dict_vae` key of the real osediff_face.pkl (SPEC §1.3)
    lands on a parameter of SD 2.1-base with the adapters added as the loader adds them."""
    layout = KEYS / "osediff_pkl_layout.json"
    if not layout.is_file():
        pytest.skip(f"upstream key lists absent: {KEYS} (shared/upstream/keys is outside the repository)")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from facerestore_cli.models.configs import get_config
    from facerestore_cli.models.restorer import OneStepRestorer

    L = json.loads(layout.read_text())
    cfgs, cfg = sd21.sd21_configs(), get_config("sd21")
    unet, vae = sd21._on_meta(UNet2DConditionModel, cfgs["unet"]), sd21._on_meta(AutoencoderKL, cfgs["vae"])
    model = OneStepRestorer(cfg, vae, unet, DDPMScheduler(**cfg.scheduler), torch.zeros(1, 77, 1024))

    def meta(entries: dict) -> dict[str, torch.Tensor]:
        return {k: torch.empty(shape, device="meta") for k, shape in entries.items()}

    ckpt = {
        "unet_lora_encoder_modules": L["enc"],
        "unet_lora_decoder_modules": L["dec"],
        "unet_lora_others_modules": L["oth"],
        "vae_lora_encoder_modules": L["vae_modules"],
        "rank_unet": 4,
        "rank_vae": 4,
        "state_dict_unet": meta(L["sd_unet"]),
        "state_dict_vae": meta(L["sd_vae"]),
    }
    assert (len(L["sd_unet"]), len(L["sd_vae"]), len(L["vae_modules"]), len(set(L["vae_modules"]))) == (518, 64, 65, 32)
    apply_osediff_checkpoint(model, ckpt, "osediff_face.pkl")  # raises on any key without a place, or a shape off
    adapters = {info["name"]: len(info["targets"]) for info in model.lora_adapters.values() if info["part"] == "unet"}
    assert adapters == {"default_encoder": 94, "default_decoder": 148, "default_others": 16}
