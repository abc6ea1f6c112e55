"""Rebuild the bundled example inputs from scikit-image's public-domain `astronaut.png`.

The source is NASA's portrait of Eileen Collins (public domain), shipped as
`skimage/data/astronaut.png` inside the scikit-image wheel:

    pip download --no-deps scikit-image==0.26.0 -d /tmp/sk && unzip -o /tmp/sk/*.whl 'skimage/data/astronaut.png' -d /tmp/sk
    python examples/make_examples.py /tmp/sk/skimage/data/astronaut.png

Each example is degraded with the project's own degradation (fixed parameters and seed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from facerestore_cli.data.degrade import DegradationParams, apply_degradation
from facerestore_cli.io.images import read_image, write_image
from facerestore_cli.io.video import VideoWriter, ffmpeg_exe

HERE = Path(__file__).resolve().parent


def degrade(rgb: np.ndarray, sigma: float, scale: float, noise: float, quality: int, seed: int = 0) -> np.ndarray:
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255

    def one(v):
        return torch.tensor([float(v)])

    p = DegradationParams(one(sigma), one(sigma), one(0), one(scale), one(noise), torch.tensor([False]), one(quality))
    y = apply_degradation(x, p, 41, torch.Generator().manual_seed(seed))
    return (y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main(src: Path) -> None:
    rgb = read_image(src).rgb
    write_image(HERE / "astronaut_lq.jpg", degrade(rgb, 1.5, 4, 6, 45), quality=90)
    small = degrade(rgb, 1.0, 3, 4, 50)[::2, ::2]
    grey = np.repeat(small.mean(axis=2, keepdims=True).round().astype(np.uint8), 3, axis=2)
    write_image(HERE / "astronaut_grey.jpg", grey, like=None, quality=85)
    lq = degrade(rgb, 1.2, 3, 5, 50)
    audio = HERE / "_tone.mp4"  # VideoWriter copies the audio stream of a source video
    lavfi = ["-f", "lavfi", "-i", "color=black:s=64x64:d=2", "-f", "lavfi", "-i", "sine=frequency=440:duration=2"]
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", *lavfi, "-shortest", str(audio)], check=True)
    with VideoWriter(HERE / "astronaut_pan.mp4", 12, (320, 320), audio_from=audio) as writer:
        for i in range(24):
            y, x = 20 + i * 2, 60 + i * 3
            writer.write(np.ascontiguousarray(lq[y : y + 320, x : x + 320]))
    audio.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
