"""Quick full-reference check of a restorer on held-out aligned faces.

    facerestore prepare-data ../shared/data/faces/val -o data/val_faces
    python benchmarks/eval_val.py --data data/val_faces --model weights/restorer-tiny --grid benchmarks/val_grid.png

The held-out faces are degraded with a fixed seed (the training config's degradation ranges or
the milder ones below), restored, and compared with the ground truth by PSNR and SSIM (computed
on the luma channel at 512 px), beside the degraded input itself and a classical baseline
(the input sharpened by an unsharp mask). No training loss is SSIM, so SSIM is the fairer judge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from facerestore_cli.models import OneStepRestorer
from facerestore_cli.train.data import AlignedFaces
from facerestore_cli.train.degrade import DegradationConfig, Degrader

MILD = DegradationConfig(blur_sigma=(0.5, 4.0), downsample=(1.0, 4.0), noise_sigma=(0.0, 10.0), jpeg_quality=(50, 95))


def luma(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(x, cv2.COLOR_RGB2YCrCb)[:, :, 0].astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((luma(a) - luma(b)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of Wang et al. (Gaussian window 11, sigma 1.5) on luma."""
    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s[5:-5, 5:-5].mean())


def unsharp(x: np.ndarray) -> np.ndarray:
    blurred = cv2.GaussianBlur(x, (0, 0), 2.0)
    return cv2.addWeighted(x, 1.6, blurred, -0.6, 0)


def to_np(x: torch.Tensor) -> list[np.ndarray]:
    return list((x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())


@torch.inference_mode()
def evaluate(model: OneStepRestorer, data: Path, degradation: DegradationConfig, limit: int, seed: int) -> tuple[dict, list]:
    faces = AlignedFaces([data], patch_size=None, flip=False)
    degrader = Degrader(degradation, seed=seed)
    scores = {k: {"psnr": [], "ssim": []} for k in ("input", "unsharp", "restored")}
    examples = []
    for i in range(0, min(limit, len(faces)), 4):
        hq = torch.stack([faces[j] for j in range(i, min(i + 4, limit, len(faces)))])
        lq, _ = degrader(hq)
        out = (model(lq * 2 - 1) + 1) / 2
        for g, l, o in zip(to_np(hq), to_np(lq), to_np(out)):
            for name, img in (("input", l), ("unsharp", unsharp(l)), ("restored", o)):
                scores[name]["psnr"].append(psnr(img, g))
                scores[name]["ssim"].append(ssim(img, g))
            if len(examples) < 6:
                examples.append((l, o, g))
    return {k: {m: float(np.mean(v)) for m, v in d.items()} for k, d in scores.items()}, examples


def save_grid(examples: list, path: Path) -> None:
    """Rows of input | restored | ground truth at 256 px, for a person to look at."""
    rows = [np.concatenate([cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA) for im in ex], 1) for ex in examples]
    cv2.imwrite(str(path), np.concatenate(rows, 0)[:, :, ::-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=Path("weights/restorer-tiny"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--grid", type=Path, default=None)
    args = ap.parse_args()
    model = OneStepRestorer.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    for label, cfg in (("mild", MILD), ("training ranges", DegradationConfig(blur_sigma=(0.1, 8.0), downsample=(1.0, 8.0), jpeg_quality=(40, 100)))):
        scores, examples = evaluate(model, args.data, cfg, args.limit, args.seed)
        print(f"\n{label} degradation, {min(args.limit, 100)} faces, seed {args.seed}:")
        print("| | PSNR (dB) | SSIM |\n| --- | --- | --- |")
        for name, s in scores.items():
            print(f"| {name} | {s['psnr']:.2f} | {s['ssim']:.4f} |")
        if args.grid and label == "mild":
            save_grid(examples, args.grid)


if __name__ == "__main__":
    main()
