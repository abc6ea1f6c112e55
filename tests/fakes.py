"""Small synthetic inputs shared by the tests (no data files needed)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

#: A Face Reward Model small enough to train in a second.
TINY_FRM = {"image_size": 32, "channels": [8, 16], "embed_dim": 16}


def face_like(size: int, seed: int) -> np.ndarray:
    """A smooth random uint8 RGB image: multi-scale noise with the soft structure of a photo."""
    rng = np.random.default_rng(seed)
    img = sum(cv2.resize(rng.uniform(0, 255, (size // s, size // s, 3)), (size, size), interpolation=cv2.INTER_CUBIC) for s in (2, 4, 8))
    return np.clip(img / 3, 0, 255).astype(np.uint8)


def fine_tuning_assets(root: Path) -> dict[str, Path]:
    """What `refl` and `lrpo` tests tune: a tiny base restorer folder, a tiny FRM folder and a
    prepared folder of 6 face-like 64 px crops."""
    from facerestore_cli.models import OneStepRestorer, configs
    from facerestore_cli.rewards.frm import FaceRewardModel, FrmConfig
    from facerestore_cli.train.data import MANIFEST, CropRecord

    small = configs.get_config("tiny").with_overrides(
        vae={"block_out_channels": [8, 8, 16, 16], "latent_channels": 8},
        unet={"block_out_channels": [16, 32, 32], "in_channels": 8, "out_channels": 8,
              "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 8},
    )  # fmt: skip
    torch.manual_seed(0)
    OneStepRestorer.from_config(small).save_pretrained(root / "base")
    torch.manual_seed(1)
    FaceRewardModel(FrmConfig.from_dict(TINY_FRM)).save_pretrained(root / "frm")
    data = root / "faces"
    data.mkdir()
    with open(data / MANIFEST, "w") as f:
        for i in range(6):
            cv2.imwrite(str(data / f"{i:06d}.png"), face_like(64, i))
            f.write(json.dumps(CropRecord(f"{i:06d}.png", "synthetic", 0, 1.0, 20.0, 200.0, "0").__dict__) + "\n")
    return {"base": root / "base", "frm": root / "frm", "data": data}


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed port can still be held
    by the previous run's socket)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
