"""Tests for facerestore_cli.models.swinir: the SwinIR stage-1 restorer and its checkpoint loader.

Tiny random models on the CPU; the full-size layout is checked on the meta device against the
upstream key list (../shared/upstream/keys), and one full-size forward runs on a 64x64 input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from facerestore_cli.models.checkpoints import CheckpointError
from facerestore_cli.models.swinir import (
    FACE_SWINIR_V1,
    MASK_VALUE,
    SwinIR,
    SwinTransformerBlock,
    WindowAttention,
    load_face_swinir,
    relative_position_index,
    shifted_window_mask,
)

KEYS_DIR = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "keys"
#: Same layout as the published model (unshuffle, shifted blocks, nearest+conv tail), tiny sizes.
TINY = {
    **FACE_SWINIR_V1,
    "img_size": 16,
    "embed_dim": 12,
    "depths": [2, 2],
    "num_heads": [2, 2],
    "window_size": 4,
    "sf": 4,
    "unshuffle_scale": 4,
}


def tiny_model(seed: int = 0) -> SwinIR:
    torch.manual_seed(seed)
    return SwinIR(**TINY).eval()


def test_tiny_forward_keeps_size_on_odd_inputs(one_thread: None) -> None:
    model = tiny_model()
    for h, w in [(21, 19), (16, 16), (5, 33), (64, 64)]:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            y = model(x)
        assert y.shape == x.shape
        assert torch.isfinite(y).all()
        assert -1.0 < y.min() and y.max() < 2.0  # random weights: near the added-back mean


def test_batch_items_are_independent(one_thread: None) -> None:
    """The mask is repeated per image, not mixed across the batch."""
    model = tiny_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        both, first = model(x), model(x[:1])
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)


def test_save_pretrained_round_trip(tmp_path: Path, one_thread: None) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    again = SwinIR.from_pretrained(tmp_path).eval()
    assert dict(again.config)["depths"] == [2, 2]
    x = torch.rand(1, 3, 23, 30)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_full_size_layout_equals_upstream_keys() -> None:
    path = KEYS_DIR / "diffbir_modules_layout.json"
    if not path.is_file():
        pytest.skip(f"upstream key list {path} is absent (../shared/upstream is not committed)")
    expected = json.loads(path.read_text())["swinir"]
    with torch.device("meta"):
        model = SwinIR(**FACE_SWINIR_V1)
    mine = {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}
    assert len(expected) == 732
    assert list(mine) == list(expected)  # same keys, same order
    assert mine == expected  # same shapes and dtypes
    assert sum(p.numel() for p in model.parameters()) == 15_792_587  # SPEC §2.4


def write_upstream_file(model: SwinIR, path: Path) -> Path:
    """The exact upstream container: {"state_dict": {"module." + key: tensor}}."""
    torch.save({"state_dict": {"module." + k: v.clone() for k, v in model.state_dict().items()}}, path)
    return path


def test_loads_upstream_layout_file(tmp_path: Path, one_thread: None) -> None:
    model = tiny_model(seed=3)
    path = write_upstream_file(model, tmp_path / "face_swinir_v1.ckpt")
    loaded = load_face_swinir(path, config=TINY)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.layers[0].residual_group.blocks[0].attn.relative_position_index.dtype == torch.int64
    x = torch.rand(1, 3, 37, 29)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    half = load_face_swinir(path, dtype=torch.float16, config=TINY)
    assert half.conv_last.weight.dtype == torch.float16


def test_sd_file_given_as_swinir_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "v2-1_512-ema-pruned.ckpt"
    torch.save(
        {
            "state_dict": {
                "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
                "first_stage_model.quant_conv.weight": torch.zeros(8, 8, 1, 1),
            }
        },
        path,
    )
    with pytest.raises(CheckpointError) as err:
        load_face_swinir(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("swinir:") and str(path) in message and "Stable Diffusion" in message


def test_swinir_of_another_size_is_one_line(tmp_path: Path) -> None:
    path = write_upstream_file(tiny_model(), tmp_path / "tiny.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_face_swinir(path)  # the published config: 8 groups of 180 channels
    assert "\n" not in str(err.value) and "swinir" in str(err.value) and "missing" in str(err.value)
    bigger = {**TINY, "depths": [2], "num_heads": [2]}  # the file has an extra group
    with pytest.raises(CheckpointError, match="unexpected"):
        load_face_swinir(path, config=bigger)


def test_shifted_mask_by_hand() -> None:
    """A 4x8 grid, window 4, shift 2: two windows. After the roll, window 0 holds rows {0,1} and {2,3}
    from different regions; window 1 is split in rows and in columns {4,5} | {6,7}."""
    mask = shifted_window_mask(4, 8, ws=4, shift=2)
    assert mask.shape == (2, 16, 16)
    for window in range(2):
        for i in range(16):
            for j in range(16):
                (ri, ci), (rj, cj) = divmod(i, 4), divmod(j, 4)
                cross = (ri < 2) != (rj < 2) or (window == 1 and (ci < 2) != (cj < 2))
                assert mask[window, i, j] == (MASK_VALUE if cross else 0.0), (window, i, j)


def test_relative_position_index_by_offset() -> None:
    ws = 3
    index = relative_position_index(ws)
    assert index.dtype == torch.int64 and index.shape == (9, 9)
    for i in range(9):
        for j in range(9):
            (yi, xi), (yj, xj) = divmod(i, ws), divmod(j, ws)
            assert index[i, j] == (yi - yj + ws - 1) * (2 * ws - 1) + (xi - xj + ws - 1)
    assert sorted(set(index.flatten().tolist())) == list(range((2 * ws - 1) ** 2))


def test_window_attention_matches_formula() -> None:
    """softmax(q k^T / sqrt(d) + bias[index] + mask) v, then proj; written out by hand."""
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, ws=2, num_heads=2)
    torch.nn.init.normal_(attn.relative_position_bias_table)
    mask = shifted_window_mask(4, 4, ws=2, shift=1)  # 4 windows of 4 tokens
    x = torch.randn(8, 4, 8)  # 2 images x 4 windows
    q, k, v = attn.qkv(x).view(8, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(4, 4, 2).permute(2, 0, 1)
    logits = q @ k.transpose(-1, -2) * 4**-0.5 + bias + mask.repeat(2, 1, 1).unsqueeze(1)
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(8, 4, 8))
    torch.testing.assert_close(attn(x, mask), expected, atol=1e-5, rtol=1e-5)


def test_block_mask_recomputed_for_other_grids() -> None:
    """A shifted block built for an 8x8 grid, run on 16x16, equals one built for 16x16 (whose
    persistent mask is used), so the on-the-fly mask is the buffer's maths."""
    torch.manual_seed(0)
    small = SwinTransformerBlock(dim=8, resolution=8, num_heads=2, ws=4, shift=2, mlp_ratio=2.0)
    large = SwinTransformerBlock(dim=8, resolution=16, num_heads=2, ws=4, shift=2, mlp_ratio=2.0)
    large.load_state_dict(small.state_dict() | {"attn_mask": large.attn_mask})
    x = torch.randn(1, 256, 8)
    torch.testing.assert_close(small(x, (16, 16)), large(x, (16, 16)))


def test_full_size_forward_on_64() -> None:
    """The published size with random weights: 64x64 in, 64x64 out (about a second on 2 cores)."""
    torch.manual_seed(0)
    model = SwinIR(**FACE_SWINIR_V1).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64))
    assert y.shape == (1, 3, 64, 64) and torch.isfinite(y).all()
