"""A before/after grid that can be committed: no third-party faces, only NASA's public-domain astronaut.

    python benchmarks/make_grid.py                                  # -> benchmarks/grid_astronaut.png
    python benchmarks/make_grid.py out.png --model runs/x/final --model weights/restorer-tiny

The source is NASA's portrait of Eileen Collins (public domain) from scikit-image's
`skimage.data.astronaut()`, the image `examples/` is made from (see examples/README.md). Its face
is found with the project's MTCNN and aligned to 512 px (FFHQ layout) as `restore` does it; that
aligned crop is the ground truth. Note the face is small in the source (43 px between the eyes),
so alignment enlarges it about 3x and the ground truth itself is soft.

The crop is degraded at four strengths with the training degradation (ranges below, each with a
fixed seed, so the grid is rebuilt identically). Rows: strengths; columns: degraded input |
bicubic + unsharp | each --model | ground truth, 256 px tiles. Each row's drawn parameters are
written on its input tile, and PSNR / identity_dist against the ground truth go to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from facerestore_cli.data.degrade import DegradationConfig, Degrader
from facerestore_cli.data.testsets import EvalInputError, _single_thread
from facerestore_cli.devices import resolve_device
from facerestore_cli.evaluate import GRID_TILE, _labelled_grid, _restore, bicubic_unsharp, load_restorers, resize_for_scoring
from facerestore_cli.faces import build_detector, estimate_affine, warp_faces
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image, write_png
from facerestore_cli.io.tensors import to_images, to_tensor01
from facerestore_cli.metrics import MetricUnavailable, create_metric
from facerestore_cli.models.color import DEFAULT_COLOR_FIX, parse_color_fix
from facerestore_cli.models.loading import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent
FACE_SIZE = 512

#: (row label, seed, ranges): blur sigma, downsampling, noise sigma (of 255), JPEG quality.
STRENGTHS = [
    ("mild", 1, DegradationConfig(blur_sigma=(0.5, 1.5), downsample=(1.0, 2.0), noise_sigma=(0.0, 5.0), jpeg_quality=(70, 95))),
    ("medium", 2, DegradationConfig(blur_sigma=(1.5, 3.0), downsample=(2.0, 4.0), noise_sigma=(5.0, 10.0), jpeg_quality=(50, 70))),
    ("strong", 3, DegradationConfig(blur_sigma=(3.0, 6.0), downsample=(4.0, 8.0), noise_sigma=(10.0, 15.0), jpeg_quality=(35, 50))),
    ("very strong", 4, DegradationConfig(blur_sigma=(6.0, 10.0), downsample=(8.0, 12.0), noise_sigma=(15.0, 20.0), jpeg_quality=(20, 35))),
]


def load_source(path: Path | None) -> np.ndarray:
    """The astronaut (RGB uint8): from `path`, else from the installed scikit-image."""
    if path is not None:
        return read_image(path).rgb
    try:
        from skimage.data import astronaut
    except ImportError:
        raise EvalInputError("scikit-image is not installed: pip install scikit-image, or give --source astronaut.png") from None
    return astronaut()


def align_face(image: np.ndarray, device: str) -> np.ndarray:
    """The largest face of the image, aligned to FACE_SIZE as `restore` aligns it."""
    faces = build_detector("mtcnn", device=device).detect([image])[0]
    if not faces:
        raise EvalInputError("no face found in the source image")
    return warp_faces(image, [estimate_affine(faces[0].landmarks, FACE_SIZE)], FACE_SIZE)[0]


def degrade(hq: np.ndarray, cfg: DegradationConfig, seed: int) -> tuple[np.ndarray, dict]:
    """One seeded draw from the ranges, on one thread so the result does not depend on the machine."""
    with torch.no_grad(), _single_thread():
        lq, params = Degrader(cfg, seed=seed)(to_tensor01([hq]))
    return to_images(lq)[0], params.row(0)


def _caption(tile: np.ndarray, lines: list[str]) -> np.ndarray:
    """The tile with white-backed text lines at its bottom (the grid has column labels only)."""
    out = tile.copy()
    top = out.shape[0] - 18 * len(lines) - 4
    out[top:] = (255 + out[top:].astype(np.uint16)) // 2
    for i, text in enumerate(lines):
        cv2.putText(out, text, (6, top + 16 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def describe(p: dict) -> str:
    blur = f"{p['sigma_x']:.1f}" if p["sigma_x"] == p["sigma_y"] else f"{p['sigma_x']:.1f}/{p['sigma_y']:.1f}"
    return f"blur {blur} x{p['scale']:.1f} n{p['noise']:.0f} q{p['quality']:.0f}"


def _scorers(device: torch.device) -> dict:
    """PSNR and identity_dist, or the reason a metric cannot run here (printed, never estimated)."""
    out = {}
    for name in ("psnr", "identity_dist"):
        try:
            out[name] = create_metric(name, device)
        except MetricUnavailable as err:
            print(f"not computed: {err}", file=sys.stderr)
    return out


def make_grid(out: Path, models: list[Path], source: Path | None, device: str, color_fix: str) -> None:
    dev = resolve_device(device)
    hq = align_face(load_source(source), str(dev))
    restorers = load_restorers(models, dev, torch.float32)
    scorers = _scorers(dev)
    labels = ["degraded input", "bicubic_unsharp", *[label for label, _ in restorers], "ground truth"]
    print(
        "| strength | degradation | method | "
        + " | ".join(scorers)
        + " |\n| --- | --- | --- | "
        + " | ".join("---" for _ in scorers)
        + " |"
    )
    rows = []
    for name, seed, cfg in STRENGTHS:
        lq, params = degrade(hq, cfg, seed)
        outputs = {"degraded input": lq, "bicubic_unsharp": bicubic_unsharp(lq, hq.shape[:2])}
        outputs.update({label: _restore(model, [lq], color_fix)[0] for label, model in restorers})
        for method, img in outputs.items():
            scores = " | ".join(f"{metric(img, hq):.{2 if key == 'psnr' else 3}f}" for key, metric in scorers.items())
            print(f"| {name} | {describe(params)} | {method} | {scores} |")
        first = _caption(resize_for_scoring(lq, (GRID_TILE, GRID_TILE)), [name, describe(params)])
        rows.append([first, *list(outputs.values())[1:], hq])
    write_png(out, _labelled_grid(rows, labels))
    print(f"grid: {out}")


def _color_fix(spec: str) -> str:
    try:
        parse_color_fix(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "out", nargs="?", type=Path, default=HERE / "grid_astronaut.png", help="PNG to write [default: benchmarks/grid_astronaut.png]"
    )
    ap.add_argument(
        "--model", action="append", type=Path, help=f"restorer folder; repeat for several [default: weights/{DEFAULT_MODEL.name}]"
    )
    ap.add_argument("--source", type=Path, default=None, help="astronaut.png instead of scikit-image's copy")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--color-fix", default=DEFAULT_COLOR_FIX, type=_color_fix, help="wavelet[:N], adain or none, as `restore --color-fix`")
    args = ap.parse_args()
    try:
        make_grid(args.out, args.model or [DEFAULT_MODEL], args.source, args.device, args.color_fix)
    except (EvalInputError, MediaError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
