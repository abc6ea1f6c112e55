"""Small synthetic inputs shared by the tests (no data files needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

#: A Face Reward Model small enough to train in a second.
TINY_FRM = {"image_size": 32, "channels": [8, 16], "embed_dim": 16}


def assert_images_close(got, want, levels: int = 1, fraction: float = 0.005, what: str = "") -> None:
    """Restored uint8 images that two computation paths should agree on (another batching, the
    fp32 decoder retry, a merged LoRA): on another CPU or torch build, float rounding moves a few
    pixels by one grey level (seen on an AMD EPYC: 0.016 % of a face), so every pixel may be off
    by `levels`, and at most `fraction` of them at all. A real regression (a bf16 decoder where an
    fp32 one belongs, a wrong batch, a missing adapter) moves most pixels and fails both."""
    got, want = list(got), list(want)
    assert len(got) == len(want), f"{what}: {len(got)} images, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"{what}: image {i} is {a.shape}, expected {b.shape}"
        diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
        off = float((diff > 0).mean())
        assert diff.max() <= levels and off <= fraction, f"{what}: image {i}: max {diff.max()} grey levels off, on {off:.3%} of pixels"


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

    small = configs.get_config("tiny").with_overrides(
        vae={"block_out_channels": [8, 8, 16, 16], "latent_channels": 8},
        unet={
            "block_out_channels": [16, 32, 32],
            "in_channels": 8,
            "out_channels": 8,
            "cross_attention_dim": 16,
            "attention_head_dim": 2,
            "norm_num_groups": 8,
        },
    )
    torch.manual_seed(0)
    OneStepRestorer.from_config(small).save_pretrained(root / "base")
    torch.manual_seed(1)
    FaceRewardModel(FrmConfig.from_dict(TINY_FRM)).save_pretrained(root / "frm")
    return {"base": root / "base", "frm": root / "frm", "data": write_crops(root / "faces", 6)}


def write_crops(data: Path, count: int, size: int = 64) -> Path:
    """A prepared crop folder (`prepare-data`'s layout: PNGs and their manifest) of `count` synthetic faces."""
    from facerestore_cli.data.crops import MANIFEST, CropRecord

    data.mkdir()
    with open(data / MANIFEST, "w") as f:
        for i in range(count):
            cv2.imwrite(str(data / f"{i:06d}.png"), face_like(size, i))
            f.write(json.dumps(CropRecord(f"{i:06d}.png", "synthetic", 0, 1.0, 20.0, 200.0, "0").__dict__) + "\n")
    return data


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed port can still be held
    by the previous run's socket)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 -m facerestore_cli.cli ARGS...` on the CPU (gloo), as on 2 GPUs,
    one thread per process; what it printed comes back."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([*launcher, "-m", "facerestore_cli.cli", *args], capture_output=True, text=True, timeout=300, env=env)


def run_torchrun(command: str, config, out: Path) -> tuple[str, list[dict]]:
    """A training COMMAND under `torchrun_cli`: the run config (a RunConfig) is written beside OUT;
    returns everything printed and OUT's log rows. A failure shows the failing rank's traceback
    (it comes before the launcher's summary)."""
    cfg = out.parent / f"{out.name}_config.json"
    cfg.write_text(json.dumps(config.to_dict()))
    done = torchrun_cli(command, "--config", str(cfg), "--out", str(out), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-8000:]
    return done.stdout + done.stderr, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def tiny_model_config(**changes):
    """The `tiny` restorer config shrunk further, so tests restore and train in milliseconds;
    `changes` are `with_overrides` fields (face_size, name, timestep, ...)."""
    from facerestore_cli.models import configs

    small = configs.get_config("tiny").with_overrides(
        vae={"block_out_channels": [8, 8, 16, 16], "latent_channels": 8},
        unet={
            "block_out_channels": [16, 32, 32],
            "in_channels": 8,
            "out_channels": 8,
            "cross_attention_dim": 16,
            "attention_head_dim": 2,
            "norm_num_groups": 8,
        },
    )
    return small.with_overrides(**changes) if changes else small  # vae/unet changes merge key by key


def randomize_fusion(model, std: float = 0.05, seed: int = 4) -> None:
    """Fresh skip fusion adds zero; give it seeded random weights so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.skip_fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def tiny_restorer(face_size: int = 64, seed: int = 0):
    """A random `OneStepRestorer` small enough to restore a few 64 px faces in a blink (CPU, fp32)."""
    from facerestore_cli.models import OneStepRestorer

    torch.manual_seed(seed)
    return OneStepRestorer.from_config(tiny_model_config(face_size=face_size)).eval()


def landmarks_at(center: tuple[float, float], eye_distance: float, angle: float = 0.0) -> np.ndarray:
    """Five FFHQ-template landmarks (5x2, image pixels) of a face centred at `center`, rotated by `angle`."""
    from facerestore_cli.faces.align import FFHQ_TEMPLATE_512

    t = FFHQ_TEMPLATE_512 - FFHQ_TEMPLATE_512.mean(0)
    scale = eye_distance / float(np.linalg.norm(t[1] - t[0]))
    c, s = np.cos(angle), np.sin(angle)
    return (t @ np.array([[c, s], [-s, c]]) * scale + np.asarray(center)).astype(np.float32)


class FixedFaces:
    """A `Detector` that finds the same faces (given by their landmarks) in every image."""

    def __init__(self, landmarks: list[np.ndarray]):
        self.landmarks = landmarks
        self.calls = 0

    def detect(self, images: list[np.ndarray]) -> list[list]:
        from facerestore_cli.faces.face import make_faces

        self.calls += 1
        pad = [[-10, -10, 10, 10]]
        boxes = [np.r_[lm.min(0), lm.max(0)] + pad[0] for lm in self.landmarks]
        return [make_faces(boxes, [0.99] * len(boxes), self.landmarks) for _ in images]

    def follow(self, image: np.ndarray, faces: list) -> list:
        return list(faces)  # the same faces in every image: they have not moved


def make_face_video(path: Path, face: np.ndarray, frames: int = 6, fps: int = 6) -> None:
    """A short clip of `face` (even width and height) drifting sideways, with a sine-wave audio track."""
    import subprocess

    from facerestore_cli.io.video import ffmpeg_exe

    h, w = face.shape[:2]
    lavfi = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / fps}"]
    cmd = [
        ffmpeg_exe(),
        "-y",
        "-loglevel",
        "error",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        str(fps),
        "-i",
        "-",
        *lavfi,
    ]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)]
    data = b"".join(np.roll(face, 4 * i, axis=1).tobytes() for i in range(frames))
    subprocess.run(cmd, input=data, check=True)


class NegativeModel:
    """A `RestoreModel` whose "restoration" is the negative of the face: a change anyone can see
    in the output, which moves no more than its input does (a grey level in, a grey level out).
    `takes_any_size=False` makes it stand in for an exported engine."""

    def __init__(self, face_size: int = 64, working_sizes: tuple[int, ...] = (), takes_any_size: bool = True):
        from types import SimpleNamespace

        self.takes_any_size = takes_any_size
        self.config = SimpleNamespace(face_size=face_size, face_sizes=sorted({*working_sizes, face_size}), size_multiple=8)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -x
