"""Tests for facerestore_cli.models: configs, the one-step restorer, LoRA and upstream loaders.

Everything is built from random tiny modules; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from fakes import randomize_fusion, tiny_model_config
from upstream_fakes import osediff_module_lists, write_osediff_pkl

from facerestore_cli.models import configs
from facerestore_cli.models.loading import load_model_folder
from facerestore_cli.models.lora import LoraMismatchError, read_lora_metadata, unet_lora_target_groups, vae_encoder_lora_targets
from facerestore_cli.models.restorer import OneStepRestorer, architecture_fingerprint, count_parameters
from facerestore_cli.models.upstream import load_osediff_checkpoint, load_sd21_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(name: str = "tiny", **changes) -> configs.RestorerConfig:
    """The tiny config shrunk further so LoRA/persistence tests take milliseconds."""
    return tiny_model_config(name=name, **changes)


def make_model(seed: int = 0, cfg: configs.RestorerConfig | None = None) -> OneStepRestorer:
    torch.manual_seed(seed)
    return OneStepRestorer.from_config(cfg or small_config()).eval()


def images(b: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def randomize_lora(model: torch.nn.Module, std: float = 0.02, seed: int = 3) -> None:
    """Give LoRA B matrices non-zero values (they start at zero, i.e. as a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------------------------ configs
def test_named_configs() -> None:
    assert {"tiny", "sd21"} <= set(configs.list_configs())
    sd = configs.get_config("sd21")
    assert sd.vae["block_out_channels"] == [128, 256, 512, 512] and sd.latent_channels == 4
    assert sd.unet["cross_attention_dim"] == 1024 and sd.unet["attention_head_dim"] == [5, 10, 20, 20]
    assert sd.prediction_type == "epsilon" and sd.timestep == 999 and sd.vae["scaling_factor"] == 0.18215
    assert (sd.lora_rank_unet, sd.lora_rank_vae) == (4, 4)
    tiny = configs.get_config("tiny")
    assert tiny.prediction_type == "v_prediction" and tiny.latent_channels == 16 and tiny.vae_scale_factor == 8
    with pytest.raises(ValueError, match="unknown restorer config"):
        configs.get_config("nope")
    with pytest.raises(ValueError, match="divisible"):
        tiny.with_overrides(unet={"norm_num_groups": 24})
    assert configs.RestorerConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny


def test_tiny_forward_and_size() -> None:
    model = make_model(cfg=configs.get_config("tiny"))
    for module in (model.vae, model.unet):  # fp16 weights must fit in 16 MiB per file
        assert count_parameters(module) * 2 < 16 * 2**20
    with torch.no_grad():
        out = model(images(2, 64))
        odd = model(images(1, 40)[..., :36])  # padded to the size multiple and cropped back
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    assert odd.shape == (1, 3, 40, 36)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_matches_scheduler(kind: str) -> None:
    model = make_model(cfg=small_config(scheduler={"prediction_type": kind}))
    z_t, out = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    ref_sched = DDPMScheduler(**model.config.scheduler)
    for t in (999, 500, 10):
        ref = ref_sched.step(out, t, z_t).pred_original_sample
        torch.testing.assert_close(model.predict_x0(z_t, t, out), ref, rtol=1e-5, atol=1e-5)
    per_sample = model.predict_x0(z_t, torch.tensor([999, 500, 10]), out)
    ref_500 = ref_sched.step(out, 500, z_t).pred_original_sample
    torch.testing.assert_close(per_sample[1], ref_500[1], rtol=1e-5, atol=1e-5)


def test_encode_mode_vs_sample() -> None:
    model = make_model()
    x = images(1, 32)
    with torch.no_grad():
        assert torch.equal(model.encode(x), model.encode(x))
        a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = make_model()
    x = images(2, 32)
    with torch.no_grad():
        ref = model(x)
    model.save_pretrained(tmp_path / "m")
    assert {"restorer_config.json", "vae", "unet", "scheduler", "prompt_embeds.safetensors"} <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded = OneStepRestorer.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert loaded.config == model.config
    assert architecture_fingerprint(loaded) == architecture_fingerprint(model)
    model.save_pretrained(tmp_path / "h", dtype=torch.float16)
    half = tmp_path / "h" / "unet" / "diffusion_pytorch_model.safetensors"
    assert half.stat().st_size < (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size * 0.6
    with torch.no_grad():
        err = (OneStepRestorer.from_pretrained(tmp_path / "h")(x) - ref).abs()
    assert err.mean() < 5e-3 and err.max() < 0.1  # fp16 rounding of the weights only
    with pytest.raises(FileNotFoundError, match="not a restorer folder"):
        OneStepRestorer.from_pretrained(tmp_path / "h" / "vae")


# ------------------------------------------------------------------------------------ skip fusion
def test_skip_fusion_starts_as_a_no_op_then_feeds_the_input_to_the_decoder(tmp_path: Path) -> None:
    model = make_model()
    x = images(2, 32)
    with torch.no_grad():
        plain = model(x)
        model.add_skip_fusion([1, 2, 3])
        # the fused decoder is our own walk through diffusers' blocks, not its forward: a float
        # tolerance far below what any fusion weight moves (randomised below: > 1e-3)
        torch.testing.assert_close(model(x), plain, atol=1e-6, rtol=0, msg="fresh fusion must leave the output unchanged")
        randomize_fusion(model)
        fused = model(x)
        assert (fused - plain).abs().max() > 1e-3
        z, skips = model.encode_with_skips(x)
        assert torch.equal(z, model.encode(x)) and [s.shape[-1] for s in skips[:4]] == [32, 16, 8, 4]
        z0, raw = model.restore_one_step(x)
        assert torch.allclose(raw.clamp(-1, 1), fused, atol=1e-6), "training's step must be the restore step"
        assert not torch.allclose(model.decode(z0), fused, atol=1e-3), "a latent alone decodes without the input's features"
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "skip_fusion.safetensors").is_file()
    loaded = OneStepRestorer.from_pretrained(tmp_path / "m")
    assert loaded.config.skip_levels == [1, 2, 3]
    assert architecture_fingerprint(loaded) != architecture_fingerprint(make_model()), "a LoRA of the plain model must not fit"
    with torch.no_grad():
        assert torch.equal(loaded(x), fused)
    (tmp_path / "m" / "skip_fusion.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="skip fusion"):
        OneStepRestorer.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="skip_levels"):
        make_model().add_skip_fusion([5])  # 4 up blocks: levels 0-3, and 4 for the output gate


def test_output_gate_joins_trained_fusion_and_can_hand_back_the_input(tmp_path: Path) -> None:
    """Adding the gate (level 4) to a fused model keeps its trained fusion and its output; a gate
    that opens fully returns the input pixels themselves (a face that needs nothing keeps them)."""
    model = make_model()
    x = images(2, 32)
    with torch.no_grad():
        model.add_skip_fusion([1, 2, 3])
        randomize_fusion(model)
        fused = model(x)
        model.add_skip_fusion([1, 2, 3, 4])
        assert model.config.skip_levels == [1, 2, 3, 4] and torch.equal(model(x), fused)
        model.skip_fusion.blocks["4"].body[-1].bias.fill_(20.0)  # tanh -> 1: out = input
        assert torch.allclose(model(x), x, atol=1e-5)
        model.skip_fusion.blocks["4"].body[-1].bias.fill_(0.0)
        randomize_fusion(model, seed=3)
        gated = model(x)
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(OneStepRestorer.from_pretrained(tmp_path / "m")(x), gated)
    with pytest.raises(ValueError, match="cannot be removed"):
        model.add_skip_fusion([1, 2])


# ------------------------------------------------------------------------------------ LoRA
def test_lora_add_save_load_merge(tmp_path: Path) -> None:
    model = make_model()
    x = images(2, 32)
    with torch.no_grad():
        base = model(x)
    model.add_lora(train_conv_in=True)
    names = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert any(n.startswith("unet.") for n in names) and any(n.startswith("vae.encoder.") for n in names)
    assert not any(n.startswith("vae.decoder.") or "post_quant_conv" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base)  # B = 0 at init: a no-op
    randomize_lora(model)
    with torch.no_grad():
        tuned = model(x)
    assert (tuned - base).abs().max() > 1e-3
    assert len(model.lora_parameters()) == len(names) + 2  # + conv_in weight and bias
    model.freeze_base()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(names) + 2 and "prompt_embeds" not in trainable
    with pytest.raises(RuntimeError, match="merge_lora"):
        model.save_pretrained(tmp_path / "x")

    path = model.save_lora(tmp_path / "lora.safetensors")
    meta = read_lora_metadata(path)
    assert (meta["config_name"], meta["rank_unet"], meta["rank_vae"]) == ("tiny", 4, 4)
    fresh = make_model()  # same seed -> same base weights
    fresh.load_lora(path)
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
        fresh.merge_lora()
        merged = fresh(x)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in fresh.named_parameters())
    torch.testing.assert_close(merged, tuned, atol=1e-4, rtol=0)
    fresh.save_pretrained(tmp_path / "merged")  # plain folder again


def test_lora_mismatch_errors(tmp_path: Path) -> None:
    model = make_model()
    model.add_lora(rank_unet=2, rank_vae=0)
    path = model.save_lora(tmp_path / "lora.safetensors")
    with pytest.raises(LoraMismatchError, match="made for config 'tiny'.*'other'"):
        make_model(cfg=small_config(name="other")).load_lora(path)
    with pytest.raises(LoraMismatchError, match="different 'tiny' architecture"):
        make_model(cfg=small_config(unet={"block_out_channels": [16, 16, 32]})).load_lora(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraMismatchError, match="not a safetensors file"):
        make_model().load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        make_model().load_lora(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------ upstream
_VOCAB_WORDS = ["a", "face", "photo", "of", "high", "quality"]


def _write_tokenizer(folder: Path, max_len: int) -> int:
    """Minimal CLIP BPE files: every letter (+ end-of-word form) and the words above as merges."""
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in _VOCAB_WORDS:  # merge left to right: f a -> fa, fa c -> fac, fac e</w> -> face</w>
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{left} {right}")
            left = left + right
            vocab.setdefault(left, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_len, **special}))
    return len(vocab)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-2.1-shaped diffusers folder with tiny random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd21")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
        use_linear_projection=True,
    ).save_pretrained(root / "unet")
    # SD 2.1-base ships a PNDM scheduler config; the restorer reads its beta schedule.
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "PNDMScheduler",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "clip_sample": False,
                "num_train_timesteps": 1000,
                "prediction_type": "epsilon",
                "set_alpha_to_one": False,
                "skip_prk_steps": True,
                "steps_offset": 1,
                "trained_betas": None,
            }
        )
    )
    vocab_size = _write_tokenizer(root / "tokenizer", max_len=8)
    text_cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    CLIPTextModel(text_cfg).save_pretrained(root / "text_encoder")
    return root


def _manual_embeds(root: Path, prompt: str) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    ids = tok(prompt, max_length=8, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return CLIPTextModel.from_pretrained(root / "text_encoder")(ids)[0]


def _osediff_reference(root: Path, x: torch.Tensor, embeds: torch.Tensor, vae=None, unet=None) -> torch.Tensor:
    """OSEDiff's test-time forward written out with diffusers parts: encode, one UNet step, scheduler.step, decode.

    OSEDiff calls set_timesteps(1) then step(...).prev_sample; with a single inference step the
    previous alpha_bar is 1, so prev_sample is exactly pred_original_sample (newer diffusers
    refuse step() at a timestep outside the inference schedule, hence pred_original_sample here).
    """
    vae = vae or AutoencoderKL.from_pretrained(root / "vae")
    unet = unet or UNet2DConditionModel.from_pretrained(root / "unet")
    sched = DDPMScheduler.from_pretrained(root / "scheduler")
    sf = vae.config.scaling_factor
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * sf
        pred = unet(z, torch.tensor([999]), encoder_hidden_states=embeds.expand(x.shape[0], -1, -1)).sample
        z0 = sched.step(pred, 999, z).pred_original_sample
        return vae.decode(z0 / sf).sample.clamp(-1, 1)


def test_load_sd21_folder(sd_folder: Path, tmp_path: Path) -> None:
    x = images(2, 16)
    model = load_sd21_folder(sd_folder, prompt="a face photo")
    embeds = _manual_embeds(sd_folder, "a face photo")
    torch.testing.assert_close(model.prompt_embeds.data, embeds)
    assert model.config.name == "sd21" and model.config.prompt_tokens == 8
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, _osediff_reference(sd_folder, x, embeds), atol=1e-5, rtol=1e-5)

    routed = load_model_folder(sd_folder)  # no restorer_config.json -> upstream loader
    torch.testing.assert_close(routed.prompt_embeds.data, _manual_embeds(sd_folder, ""))

    from safetensors.torch import save_file

    save_file({"prompt_embeds": embeds[0].contiguous()}, str(tmp_path / "p.safetensors"))
    no_text = tmp_path / "sd_no_text"
    no_text.mkdir()
    for part in ("vae", "unet", "scheduler"):
        (no_text / part).symlink_to(sd_folder / part)
    with pytest.raises(FileNotFoundError, match="missing text_encoder/config.json, tokenizer"):
        load_sd21_folder(no_text)
    from_file = load_sd21_folder(no_text, prompt_embeds_file=tmp_path / "p.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(from_file(x), out)
    with pytest.raises(FileNotFoundError, match="missing vae/config.json"):
        load_sd21_folder(tmp_path)

    model.save_pretrained(tmp_path / "converted")  # SD folder -> restorer folder round trip
    with torch.no_grad():
        assert torch.equal(OneStepRestorer.from_pretrained(tmp_path / "converted")(x), out)


def _fake_osediff_pkl(root: Path, out: Path) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """An OSEDiff checkpoint for the SD folder's weights (upstream_fakes), and the adapted VAE and
    UNet an OSEDiff forward runs on."""
    unet, vae = write_osediff_pkl(out, UNet2DConditionModel.from_pretrained(root / "unet"), AutoencoderKL.from_pretrained(root / "vae"))
    return vae.eval(), unet.eval()


def test_osediff_targets_match_upstream_rules(sd_folder: Path) -> None:
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    lists = osediff_module_lists(unet, vae)
    groups = unet_lora_target_groups(unet)
    for part in ("encoder", "decoder", "others"):
        assert groups[part] == list(dict.fromkeys(lists[f"unet_lora_{part}_modules"]))
    assert set(vae_encoder_lora_targets(vae)) == set(lists["vae_lora_encoder_modules"])
    assert any("mid_block.attentions.0.to_q" in n for n in vae_encoder_lora_targets(vae))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_load_osediff_checkpoint(sd_folder: Path, tmp_path: Path) -> None:
    ref_vae, ref_unet = _fake_osediff_pkl(sd_folder, tmp_path / "osediff.pkl")
    x = images(2, 16)
    model = load_sd21_folder(sd_folder)
    with torch.no_grad():
        before = model(x)
    load_osediff_checkpoint(model, tmp_path / "osediff.pkl")
    expected = _osediff_reference(sd_folder, x, model.prompt_embeds.data, vae=ref_vae, unet=ref_unet)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)

    model.save_lora(tmp_path / "as_ours.safetensors")  # OSEDiff adapters + conv_in survive our format
    again = load_sd21_folder(sd_folder)
    again.load_lora(tmp_path / "as_ours.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(x), after, atol=1e-6, rtol=0)
        model.merge_lora()
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)


def test_osediff_checkpoint_errors(sd_folder: Path, tmp_path: Path) -> None:
    model = load_sd21_folder(sd_folder)
    with pytest.raises(FileNotFoundError, match="OSEDiff checkpoint not found"):
        load_osediff_checkpoint(model, tmp_path / "none.pkl")
    torch.save({"state_dict_unet": {}}, tmp_path / "bad.pkl")
    with pytest.raises(ValueError, match="missing keys unet_lora_encoder_modules"):
        load_osediff_checkpoint(model, tmp_path / "bad.pkl")
    wrong = {k: ["down_blocks.9.nothing"] for k in ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")}
    torch.save({**wrong, "rank_unet": 4, "state_dict_unet": {}}, tmp_path / "wrong.pkl")
    with pytest.raises(ValueError, match="cannot apply unet adapter"):
        load_osediff_checkpoint(load_sd21_folder(sd_folder), tmp_path / "wrong.pkl")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_restore_loads_upstream_sd_folder_and_osediff(sd_folder: Path, tmp_path: Path) -> None:
    """What `restore --model SD_FOLDER --osediff PKL` loads (tiny random stand-ins of the upstream layout)."""
    from click.testing import CliRunner

    from facerestore_cli.cli import main
    from facerestore_cli.models.loading import load_restorer

    _fake_osediff_pkl(sd_folder, tmp_path / "osediff.pkl")
    x = images(1, 32)
    cpu = torch.device("cpu")
    base = load_restorer(sd_folder, None, cpu, torch.float32)
    tuned = load_restorer(sd_folder, None, cpu, torch.float32, osediff=tmp_path / "osediff.pkl")
    with torch.no_grad():
        assert (base(x) - tuned(x)).abs().mean() > 1e-3
    assert not tuned.lora_adapters, "OSEDiff LoRA must be merged for inference"
    result = CliRunner().invoke(main, ["restore", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "is not a restorer folder" in result.output


def test_color_fixes_keep_input_colours() -> None:
    """A restoration with a colour cast gets the input's colours back; its detail stays."""
    from facerestore_cli.models.color import color_fix, low_frequency

    src = images(1, 64) * 0.5
    detail = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    cast = (src * 0.6 + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1) + detail).clamp(-1, 1)
    adain = color_fix(cast, src, "adain")
    torch.testing.assert_close(adain.mean((2, 3)), src.mean((2, 3)), atol=2e-3, rtol=0)
    wavelet = color_fix(cast, src, "wavelet")
    assert (low_frequency(wavelet) - low_frequency(src)).abs().mean() < 0.25 * (low_frequency(cast) - low_frequency(src)).abs().mean()

    def high(x):
        return x - low_frequency(x)

    assert (high(wavelet) - high(cast)).abs().mean() < 0.02
    assert torch.equal(color_fix(cast, src, "none"), cast)
    for bad in ("sepia", "wavelet:0", "wavelet:x", "adain:3", "wavelet:9"):
        with pytest.raises(ValueError, match="color fix"):
            color_fix(cast, src, bad)


def test_fewer_wavelet_levels_keep_more_of_the_input_and_all_keep_the_finest_detail() -> None:
    """wavelet:N takes the restorer's N finest bands: a restorer that moved mid-scale shapes gets
    the input's shapes back with fewer bands, and its finest detail survives at every N."""
    from facerestore_cli.models.color import DEFAULT_WAVELET_LEVELS, color_fix, low_frequency

    g = torch.Generator().manual_seed(0)
    src = images(1, 128) * 0.5
    moved = low_frequency(torch.randn(1, 3, 128, 128, generator=g), 3) * 2  # mid-scale change
    fine = torch.randn(1, 3, 128, 128, generator=g) * 0.05
    restored = (src + moved + fine).clamp(-1, 1)
    err = {n: (color_fix(restored, src, f"wavelet:{n}") - src).abs().mean() for n in (2, 3, 5)}
    assert err[2] < err[3] < err[5] < (restored - src).abs().mean()

    def finest(x):
        return x - low_frequency(x, 1)

    for n in (2, 3, 5):
        kept = (finest(color_fix(restored, src, f"wavelet:{n}")) - finest(restored)).abs().mean()
        assert kept < 0.2 * finest(fine).abs().mean()
    assert torch.equal(color_fix(restored, src, "wavelet"), color_fix(restored, src, f"wavelet:{DEFAULT_WAVELET_LEVELS}"))
