"""Training data: aligned face crops built with the project's own detector, and their loader.

`prepare_faces` turns folders of photos and face crops into aligned crops at the model's face
size, dropping faces too small or too blurry to serve as ground truth and near-duplicates, and
writes a manifest (one JSON line per kept crop) so a training set is described and rebuildable.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facerestore_cli.data.captions import CaptionLookup
from facerestore_cli.errors import InputError, MissingFileError
from facerestore_cli.faces.align import estimate_affine, warp_faces
from facerestore_cli.faces.detector import detect_padded
from facerestore_cli.faces.face import Detector
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image
from facerestore_cli.io.inputs import IMAGE_EXTS

MANIFEST = "manifest.jsonl"


@dataclass
class CropRecord:
    """One kept aligned crop and where it came from."""

    file: str
    source: str
    face_index: int
    score: float
    eye_distance: float
    sharpness: float
    dhash: str


def sharpness(crop: np.ndarray, size: int = 128) -> float:
    """Variance of the Laplacian at a fixed scale, so crops from sources of any size compare."""
    grey = cv2.cvtColor(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def dhash(crop: np.ndarray) -> int:
    """64-bit difference hash: near-identical crops (resaved, resized copies) get near hashes."""
    grey = cv2.cvtColor(cv2.resize(crop, (9, 8), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _is_duplicate(h: int, seen: list[int], max_distance: int) -> bool:
    return any(bin(h ^ s).count("1") <= max_distance for s in seen)


def iter_image_files(sources: Iterable[Path]) -> Iterator[Path]:
    """Image files under the given folders (recursive, sorted) or the files themselves."""
    for src in sources:
        src = Path(src)
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        yield from (p for p in files if p.suffix.lower() in IMAGE_EXTS)


@dataclass
class PrepareStats:
    files: int = 0
    unreadable: int = 0
    faces: int = 0
    too_small: int = 0
    too_blurry: int = 0
    duplicates: int = 0
    kept: int = 0


def prepare_faces(
    sources: Iterable[Path],
    out_dir: Path,
    detector: Detector,
    face_size: int = 512,
    min_eye_distance: float = 24.0,
    min_sharpness: float = 20.0,
    max_hash_distance: int = 3,
    on_file: Callable[[Path], None] | None = None,
) -> PrepareStats:
    """Detect, align, filter and de-duplicate faces; write PNG crops and the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, seen = PrepareStats(), []
    with open(out_dir / MANIFEST, "w") as manifest:
        for path in iter_image_files(sources):
            stats.files += 1
            if on_file:
                on_file(path)
            try:
                rgb = read_image(path).rgb
            except MediaError:
                stats.unreadable += 1
                continue
            for i, face in enumerate(detect_padded(detector, rgb)):
                stats.faces += 1
                eye_dist = float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))
                if eye_dist < min_eye_distance:
                    stats.too_small += 1
                    continue
                crop = warp_faces(rgb, [estimate_affine(face.landmarks, face_size)], face_size)[0]
                sharp = sharpness(crop)
                if sharp < min_sharpness:
                    stats.too_blurry += 1
                    continue
                h = dhash(crop)
                if _is_duplicate(h, seen, max_hash_distance):
                    stats.duplicates += 1
                    continue
                seen.append(h)
                name = f"{stats.kept:06d}.png"
                cv2.imwrite(str(out_dir / name), crop[:, :, ::-1])
                rec = CropRecord(name, str(path), i, float(face.score), eye_dist, sharp, f"{h:016x}")
                manifest.write(json.dumps(asdict(rec)) + "\n")
                stats.kept += 1
    return stats


def read_manifest(folder: Path) -> list[CropRecord]:
    """The crops of a prepared folder; a clear error if the folder was not prepared."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"{folder}: no {MANIFEST}; build it with `facerestore prepare-data`")
    with open(path) as f:
        return [CropRecord(**json.loads(line)) for line in f if line.strip()]


class CropDataset(Dataset):
    """HQ aligned crops as float tensors in [0,1], optionally as random patches with flips.

    `scales`: each crop is first shrunk by one of these factors, drawn at random (1.0 keeps it),
    so a model also learns faces seen at a smaller working size (`restore --face-size auto`
    restores small faces on 256-px crops of the same alignment).

    `captions`: items become (image, caption), each crop's caption looked up once here (by its
    file or its source photo, `data.captions`), for the Face Reward Model that judges them."""

    def __init__(
        self,
        folders: Iterable[Path],
        patch_size: int | None = None,
        flip: bool = True,
        min_sharpness: float = 0.0,
        scales: Sequence[float] = (1.0,),
        captions: CaptionLookup | None = None,
    ):
        kept = [(Path(f) / r.file, r.source) for f in folders for r in read_manifest(Path(f)) if r.sharpness >= min_sharpness]
        self.files = [file for file, _ in kept]
        if not self.files:
            raise InputError("no training crops found in the given folders (or none sharp enough)")
        self.captions = None if captions is None else [captions.caption(file, source) for file, source in kept]
        if captions is not None and captions.source and not captions.found:
            raise InputError(f"captions: none of the {len(kept)} crops has a caption in {captions.source} (by crop or source file)")
        self.patch_size = patch_size
        self.flip = flip
        self.scales = list(scales)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, str]:
        """Item `key`, or `(index, seed)`: its random scale, patch and flip from that seed
        (`data.order.ResumableOrder`), so they do not depend on the worker or on a resume."""
        idx, seed = key if isinstance(key, tuple) else (key, None)
        rng = random if seed is None else random.Random(seed)
        img = cv2.imread(str(self.files[idx]), cv2.IMREAD_COLOR)[:, :, ::-1]
        scale = rng.choice(self.scales)
        if scale != 1.0:
            side = max(1, round(img.shape[0] * scale))
            img = cv2.resize(np.ascontiguousarray(img), (side, side), interpolation=cv2.INTER_AREA)
            if self.patch_size and side < self.patch_size:
                raise InputError(f"{self.files[idx]}: shrunk by {scale} to {side} px, smaller than patch_size {self.patch_size}")
        if self.patch_size and self.patch_size < img.shape[0]:
            p = self.patch_size
            y, x = rng.randint(0, img.shape[0] - p), rng.randint(0, img.shape[1] - p)
            img = img[y : y + p, x : x + p]
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
        return image if self.captions is None else (image, self.captions[idx])
