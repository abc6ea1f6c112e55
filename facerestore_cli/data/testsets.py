"""Rebuildable degraded test sets: pair folders of ground truth and its degraded copy.

`degrade_folder` turns aligned HQ crops into a pair folder::

    OUT/hq/<name>.png          the ground truth (as read, optionally resized)
    OUT/lq/<name>.png          its degraded copy (same size; blur, downsampling, noise, JPEG)
    OUT/degradations.jsonl     one line per image: file, source, its seed and drawn parameters
    OUT/degrade_config.json    the parameter ranges, master seed and size

Each image is degraded with its own generator seeded from (master seed, file name), on one CPU
thread, so a set is rebuilt bit for bit from the same sources, seed and ranges (with the same torch
build), independent of order, of other files and of the thread count, and `degradations.jsonl`
says what each image went through.

`find_pairs` / `find_lq` find a set's images for `evaluate` (evaluate.py), which scores them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch

from facerestore_cli import __version__
from facerestore_cli.configfile import check_keys, read_config
from facerestore_cli.data.degrade import DegradationConfig, Degrader
from facerestore_cli.errors import FacerestoreError
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image, write_png
from facerestore_cli.io.inputs import IMAGE_EXTS
from facerestore_cli.io.tensors import to_images, to_tensor01

HQ_DIR, LQ_DIR = "hq", "lq"
DEGRADATIONS = "degradations.jsonl"
DEGRADE_CONFIG = "degrade_config.json"
MANIFEST = "manifest.jsonl"


class EvalInputError(FacerestoreError, ValueError):
    """A folder or option that evaluation cannot use; the message is one line for the user."""


# ------------------------------------------------------------------ finding images
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def source_images(src: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of the HQ crops in a folder, a prepared folder's manifest, or a manifest file."""
    src = Path(src)
    if src.is_file() and src.name.endswith(".jsonl"):
        manifest, root = src, src.parent
    elif src.is_dir() and (src / MANIFEST).is_file():
        manifest, root = src / MANIFEST, src
    elif src.is_dir():
        files = _image_files(src)
        if not files:
            raise EvalInputError(f"{src}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
        return [(p.relative_to(src).as_posix(), p) for p in files]
    else:
        raise EvalInputError(f"{src}: not a folder of aligned crops or a manifest.jsonl")
    rows = []
    with open(manifest) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)["file"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalInputError(f'{manifest}:{n}: not a manifest line with a "file" field') from None
    missing = [r for r in rows if not (root / r).is_file()]
    if missing:
        raise EvalInputError(f"{manifest}: {len(missing)} listed crop(s) missing, e.g. {root / missing[0]}")
    if not rows:
        raise EvalInputError(f"{manifest}: lists no crops")
    return [(r, root / r) for r in rows]


def image_seed(seed: int, name: str) -> int:
    """The per-image seed: a hash of the master seed and the image's relative name."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _png_name(rel: str) -> str:
    return str(Path(rel).with_suffix(".png").as_posix())


# ------------------------------------------------------------------ degrade
@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: float sums in a fixed order, so the uint8 output does not depend on
    the machine's thread count (with several threads a few pixels per million differ by 1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@dataclass
class DegradeSummary:
    out_dir: Path
    images: int = 0
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0


def degrade_folder(
    src: Path | str,
    out_dir: Path | str,
    cfg: DegradationConfig | None = None,
    seed: int = 0,
    size: int | None = None,
    limit: int | None = None,
    on_image: Callable[[str], None] | None = None,
) -> DegradeSummary:
    """Write HQ/LQ PNG pairs and the parameters of every degradation (see the module docstring).

    src: a folder of aligned crops (searched recursively), a prepared folder with manifest.jsonl,
    or a manifest file. size: resize every HQ crop to size x size first (None keeps each size).
    """
    cfg = cfg or DegradationConfig()
    out_dir = Path(out_dir)
    files = source_images(Path(src))
    if limit is not None:
        files = files[: max(0, int(limit))]
    if (out_dir / DEGRADATIONS).exists():
        raise EvalInputError(f"{out_dir}: already holds a degraded set ({DEGRADATIONS}); choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, t0 = DegradeSummary(out_dir), time.perf_counter()
    meta = {"facerestore": __version__, "source": str(src), "seed": int(seed), "size": size, "images": len(files), "config": cfg.to_dict()}
    with open(out_dir / DEGRADATIONS, "w") as log:
        for rel, path in files:
            if on_image:
                on_image(rel)
            try:
                hq = read_image(path).rgb
            except MediaError:
                summary.unreadable.append(rel)
                continue
            if size:
                hq = resize_for_scoring(hq, (size, size))
            s = image_seed(seed, rel)
            with torch.no_grad(), _single_thread():
                lq_t, params = Degrader(cfg, seed=s)(to_tensor01([hq]))
            name = _png_name(rel)
            write_png(out_dir / HQ_DIR / name, hq)
            write_png(out_dir / LQ_DIR / name, to_images(lq_t)[0])
            row = {"file": name, "source": str(path), "seed": s, "height": hq.shape[0], "width": hq.shape[1], **params.row(0)}
            row["grey_noise"] = bool(row["grey_noise"])
            log.write(json.dumps(row) + "\n")
            summary.images += 1
    meta["images"] = summary.images
    (out_dir / DEGRADE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    summary.seconds = time.perf_counter() - t0
    return summary


def load_degradation_config(path: Path | str) -> DegradationConfig:
    """Ranges from a TOML/JSON file: a `[degradation]` table (as in training configs) or top-level keys."""
    path = Path(path)
    try:
        raw = read_config(path)
    except (OSError, ValueError) as err:
        raise EvalInputError(f"{path}: cannot read a degradation config ({err})") from None
    raw = raw.get("degradation", raw.get("config", raw))
    try:
        check_keys(raw, DegradationConfig, "degradation")
    except ValueError as err:
        raise EvalInputError(f"{path}: {err}") from None
    return DegradationConfig.from_dict(raw)


# ------------------------------------------------------------------ evaluate: finding images
@dataclass
class EvalItem:
    name: str
    lq: Path
    hq: Path | None


def find_pairs(pairs_dir: Path | str) -> list[EvalItem]:
    """The LQ/HQ pairs of a folder made by `degrade_folder` (lq/ and hq/ with the same names)."""
    root = Path(pairs_dir)
    if not root.is_dir():
        raise EvalInputError(f"{root}: not a folder")
    lq_dir, hq_dir = root / LQ_DIR, root / HQ_DIR
    if not lq_dir.is_dir() or not hq_dir.is_dir():
        raise EvalInputError(f"{root}: no {LQ_DIR}/ and {HQ_DIR}/ subfolders (make a pair folder with `facerestore degrade`, or use --lq)")
    lq = {p.relative_to(lq_dir).with_suffix("").as_posix(): p for p in _image_files(lq_dir)}
    hq = {p.relative_to(hq_dir).with_suffix("").as_posix(): p for p in _image_files(hq_dir)}
    if not lq:
        raise EvalInputError(f"{lq_dir}: no images")
    missing = sorted(set(lq) - set(hq))
    if missing:
        raise EvalInputError(f"{hq_dir}: no ground truth for {len(missing)} LQ image(s), e.g. {missing[0]}")
    return [EvalItem(k, lq[k], hq[k]) for k in sorted(lq)]


def as_folders(lq_dirs: Path | str | Sequence[Path | str]) -> list[Path]:
    return [Path(lq_dirs)] if isinstance(lq_dirs, (str, Path)) else [Path(d) for d in lq_dirs]


def find_lq(lq_dirs: Path | str | Sequence[Path | str]) -> list[EvalItem]:
    """The images under one or several LQ folders (each searched recursively), each file once.

    Names are relative to the folders' common parent, so `CodeFormer/.../cropped_faces/0143` and
    `GFPGAN/.../cropped_faces/0143` stay apart when both folders are given.
    """
    roots = as_folders(lq_dirs)
    if not roots:
        raise EvalInputError("no LQ folder given")
    found: list[tuple[Path, list[Path]]] = []
    for root in roots:
        if not root.is_dir():
            raise EvalInputError(f"{root}: not a folder")
        files = _image_files(root)
        if not files:
            raise EvalInputError(f"{root}: no images")
        found.append((root, files))
    base = Path(os.path.commonpath([str(r.resolve()) for r in roots]))
    items: dict[Path, EvalItem] = {}
    for root, files in found:
        for p in files:
            full = root.resolve() / p.relative_to(root)
            items.setdefault(full, EvalItem(full.relative_to(base).with_suffix("").as_posix(), p, None))
    return list(items.values())


# ------------------------------------------------------------------ evaluate: baselines


# ------------------------------------------------------------------ evaluate: result


# ------------------------------------------------------------------ evaluate: metrics


# ------------------------------------------------------------------ evaluate: restorers


# ------------------------------------------------------------------ evaluate: one batch


# ------------------------------------------------------------------ evaluate: tables and grid


def resize_for_scoring(rgb: np.ndarray, size: tuple[int, int], interp: int | None = None) -> np.ndarray:
    """Resize to (height, width): area when shrinking, bicubic when enlarging, unless told. How
    test sets are brought to the model's size for scoring; `media.resize_image` (Lanczos up)
    is for what `restore` writes, and the recorded eval numbers depend on this one's filter."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    if interp is None:
        interp = cv2.INTER_AREA if h < rgb.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(rgb, (w, h), interpolation=interp)
