"""Automatic preference pairs from aligned ground-truth faces, labelled by rules that always hold.

For every face, one set of degradation parameters is drawn (the training ranges, as for the
restorer) and applied at several *strengths*: strength s moves every parameter from "clean" to the
drawn value (blur sigma, downsampling, noise, JPEG quality), so a milder level is milder in every
respect, not just on average. That gives, per face:

- ground truth > each degraded level                         (kind `gt>degraded`)
- milder level > stronger level                              (kind `milder>stronger`)

and for the faces given to the restorer (the full-strength level is made at 512 px, exactly as the
restorer's test sets are, and restored):

- ground truth > restored, restored > its degraded input     (kinds `gt>restored`, `restored>degraded`)

Pairs no rule can order are written as unlabelled *candidates* for the labelling page and the
SVM: the middle level against an independent degradation of the same strength, and the
restoration against the mildest level.

Degradations are made at `work_size` (parameters given for 512 px crops are scaled to it, so the
result matches a 512 px degradation seen at that size) and every image is stored at `size`
with the FRM's own resize.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facerestore_cli import __version__
from facerestore_cli.data.annotations import Pair, load_annotations
from facerestore_cli.data.degrade import (
    DegradationConfig,
    DegradationParams,
    blur,
    gaussian_kernels,
    jpeg,
    resize_each,
    sample_params,
)
from facerestore_cli.data.testsets import EvalInputError, image_seed, source_images
from facerestore_cli.errors import InputError
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image, write_png
from facerestore_cli.io.tensors import to_images, to_tensor01
from facerestore_cli.rewards.frm import resize_for_model

REFERENCE_SIZE = 512
PAIRS_FILE = "pairs.jsonl"
CANDIDATES_FILE = "candidates.jsonl"
SETTINGS_FILE = "autopairs.json"


@dataclass
class AutoPairsConfig:
    """How the automatic pairs are made; saved beside them so a set can be rebuilt."""

    size: int = 160
    work_size: int = 256
    levels: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    restore_limit: int = 0
    restore_batch: int = 1
    #: faces per append to the partial files: at most this many are made again after an interruption.
    write_every: int = 8
    candidates: bool = True
    seed: int = 0
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def __post_init__(self) -> None:
        levels = sorted(float(s) for s in self.levels)
        if not levels or levels[0] <= 0 or levels[-1] > 1 or len(set(levels)) != len(levels):
            raise InputError(f"levels must be distinct strengths in (0, 1], got {self.levels}")
        self.levels = levels


# ------------------------------------------------------------------ graded degradations
def graded_params(p: DegradationParams, strengths: Sequence[float], cfg: DegradationConfig) -> DegradationParams:
    """One face's drawn parameters (batch of 1) at each strength: clean + s * (drawn - clean)."""
    s = torch.tensor([float(x) for x in strengths])
    n = len(s)
    lo = float(cfg.blur_sigma[0])
    return DegradationParams(
        sigma_x=lo + s * (p.sigma_x - lo),
        sigma_y=lo + s * (p.sigma_y - lo),
        theta=p.theta.expand(n).clone(),
        scale=1 + s * (p.scale - 1),
        noise=s * p.noise,
        grey_noise=p.grey_noise.expand(n).clone(),
        quality=(100 - s * (100 - p.quality)).round(),
    )


def degrade_at(hq: torch.Tensor, p: DegradationParams, kernel_size: int, gen: torch.Generator) -> torch.Tensor:
    """The training degradation of Bx3xHxW in [0, 1] (parameters for 512 px crops) at size H.

    At H = 512 this is `apply_degradation`; at other sizes blur and downsampling are scaled so the
    degraded image's resolution, noise and JPEG blocks are those of the 512 px pipeline.
    """
    b, c, h, w = hq.shape
    r = h / REFERENCE_SIZE
    k = max(3, int(round(kernel_size * r)) | 1)
    x = blur(hq, gaussian_kernels(p.sigma_x * r, p.sigma_y * r, p.theta, k))
    small = [(max(8, round(h / float(s * r))), max(8, round(w / float(s * r)))) for s in p.scale]
    out = []
    for i, xi in enumerate(resize_each(x, small)):
        shape = (1, 1 if p.grey_noise[i] else c, *xi.shape[-2:])
        xi = (xi + torch.randn(shape, generator=gen, device=gen.device).to(xi.device) * float(p.noise[i]) / 255).clamp(0, 1)
        xi = jpeg(xi, p.quality[i : i + 1])
        out.append(F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out).clamp(0, 1)


# ------------------------------------------------------------------ one face
@dataclass
class _Face:
    name: str
    hq: np.ndarray
    seed: int


def _level_dir(s: float) -> str:
    return f"degraded_{s:g}"


class AutoPairWriter:
    """Writes one face's images and returns its pairs (labelled) and candidates (unlabelled)."""

    def __init__(self, out_dir: Path, cfg: AutoPairsConfig, restorer=None) -> None:
        self.out = Path(out_dir)
        self.cfg = cfg
        self.restorer = restorer

    def _store(self, sub: str, name: str, x: torch.Tensor) -> Path:
        path = self.out / "images" / sub / f"{name}.png"
        write_png(path, to_images(resize_for_model(x, self.cfg.size))[0])
        return path

    def _levels(self, face: _Face, params: DegradationParams) -> torch.Tensor:
        work = resize_for_model(to_tensor01([face.hq]), self.cfg.work_size)
        gen = torch.Generator().manual_seed(face.seed)
        return degrade_at(
            work.expand(len(self.cfg.levels), -1, -1, -1),
            graded_params(params, self.cfg.levels, self.cfg.degradation),
            self.cfg.degradation.blur_kernel_size,
            gen,
        )

    def write(self, faces: Sequence[_Face], restore: Sequence[bool]) -> tuple[list[Pair], list[Pair]]:
        pairs: list[Pair] = []
        cands: list[Pair] = []
        full512 = {}
        cfg = self.cfg
        drawn = {}
        for face, do_restore in zip(faces, restore):
            gen = torch.Generator().manual_seed(face.seed)
            drawn[face.name] = sample_params(cfg.degradation, 1, gen)
            if do_restore:
                hq512 = resize_for_model(to_tensor01([face.hq]), REFERENCE_SIZE)
                strong = graded_params(drawn[face.name], [cfg.levels[-1]], cfg.degradation)
                full512[face.name] = degrade_at(
                    hq512, strong, cfg.degradation.blur_kernel_size, torch.Generator().manual_seed(face.seed + 1)
                )
        restored = self._restore(full512)
        for face in faces:
            p, c = self._face_pairs(face, drawn[face.name], full512.get(face.name), restored.get(face.name))
            pairs += p
            cands += c
        return pairs, cands

    def _restore(self, lq: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not lq or self.restorer is None:
            return {}
        from facerestore_cli.models.inference import restore_crops

        names = list(lq)
        crops = [to_images(lq[n])[0] for n in names]
        out = restore_crops(self.restorer, crops, batch_size=self.cfg.restore_batch)
        return {n: to_tensor01([o]) for n, o in zip(names, out)}

    def _face_pairs(
        self, face: _Face, params: DegradationParams, full512: torch.Tensor | None, restored: torch.Tensor | None
    ) -> tuple[list[Pair], list[Pair]]:
        cfg, name = self.cfg, face.name
        gt = self._store("gt", name, to_tensor01([face.hq]))
        levels = self._levels(face, params)
        paths = []
        for i, s in enumerate(cfg.levels):
            x = full512 if (full512 is not None and i == len(cfg.levels) - 1) else levels[i : i + 1]
            paths.append(self._store(_level_dir(s), name, x))
        pairs = [Pair(gt, d, "a", "auto", "gt>degraded", name) for d in paths]
        pairs += [
            Pair(paths[i], paths[j], "a", "auto", "milder>stronger", name) for i in range(len(paths)) for j in range(i + 1, len(paths))
        ]
        cands = []
        if restored is not None:
            r = self._store("restored", name, restored)
            pairs += [Pair(gt, r, "a", "auto", "gt>restored", name), Pair(r, paths[-1], "a", "auto", "restored>degraded", name)]
            if cfg.candidates:
                cands.append(Pair(r, paths[0], None, "auto", "restored-vs-mild", name))
        if cfg.candidates:
            cands.append(self._alternative(face, paths))
        return pairs, cands

    def _alternative(self, face: _Face, paths: list[Path]) -> Pair:
        """The middle level against an independent degradation of the same strength."""
        cfg = self.cfg
        mid = len(cfg.levels) // 2
        gen = torch.Generator().manual_seed(face.seed + 2)
        alt = graded_params(sample_params(cfg.degradation, 1, gen), [cfg.levels[mid]], cfg.degradation)
        work = resize_for_model(to_tensor01([face.hq]), cfg.work_size)
        x = degrade_at(work, alt, cfg.degradation.blur_kernel_size, gen)
        return Pair(paths[mid], self._store("alternative", face.name, x), None, "auto", "level-vs-alternative", face.name)


# ------------------------------------------------------------------ a whole folder
@dataclass
class AutoPairsSummary:
    out_dir: Path
    faces: int = 0
    restored: int = 0
    pairs: int = 0
    candidates: int = 0
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _restore_mask(n: int, limit: int) -> list[bool]:
    """Which faces to restore: `limit` of them spread evenly over the list (all sources get some)."""
    if limit <= 0:
        return [False] * n
    chosen = set(np.linspace(0, n - 1, min(limit, n)).round().astype(int).tolist())
    return [i in chosen for i in range(n)]


def check_out_dir(out_dir: Path | str) -> Path:
    """Refuse a folder that already holds a finished set (never mix two sets, never overwrite one)."""
    out = Path(out_dir)
    if (out / PAIRS_FILE).exists():
        raise EvalInputError(f"{out}: already holds {PAIRS_FILE}; choose another output folder")
    return out


def _partial(out: Path, name: str) -> Path:
    """Where a file is written until the run finishes (pairs.jsonl -> pairs.partial.jsonl)."""
    return out / name.replace(".jsonl", ".partial.jsonl")


#: settings that must match for an interrupted run to be resumed.
_RESUME_KEYS = ("source", "size", "work_size", "levels", "restore_limit", "candidates", "seed", "degradation")


def _append(path: Path, pairs: Sequence[Pair]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(p.to_row(path.parent)) + "\n" for p in pairs)
        f.flush()


def _rows(path: Path, labelled: bool) -> list[Pair]:
    """The readable rows of a partial file (a line torn by an interruption is dropped)."""
    if not path.is_file() or not path.read_text().strip():
        return []
    return load_annotations(path, require_label=labelled, default_source="auto", check_files=False).pairs


def _done_groups(out: Path, settings: dict, resume: bool) -> set[str]:
    """Faces already written by an interrupted run (resumed), or none after starting afresh."""
    part_pairs, part_cands = _partial(out, PAIRS_FILE), _partial(out, CANDIDATES_FILE)
    if not part_pairs.exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS_FILE).write_text(json.dumps({**settings, "complete": False}, indent=2) + "\n")
        part_pairs.write_text("")
        part_cands.write_text("")
        return set()
    if not resume:
        raise EvalInputError(f"{out}: holds an interrupted run ({part_pairs.name}); resume it or choose another output folder")
    saved = json.loads((out / SETTINGS_FILE).read_text()) if (out / SETTINGS_FILE).is_file() else {}
    changed = [k for k in _RESUME_KEYS if json.dumps(saved.get(k)) != json.dumps(settings[k])]
    if changed:
        raise EvalInputError(f"{out}: the interrupted run used other settings ({', '.join(changed)}); resume with the same options")
    done_pairs = _rows(part_pairs, True)
    if done_pairs:  # the last face written may be incomplete: make it again
        done_pairs = [p for p in done_pairs if p.group != done_pairs[-1].group]
    done = {p.group for p in done_pairs}
    cands = [c for c in _rows(part_cands, False) if c.group in done]
    for path, rows in ((part_pairs, done_pairs), (part_cands, cands)):
        path.write_text("")
        _append(path, rows)
    return done


def make_auto_pairs(
    src: Path | str,
    out_dir: Path | str,
    cfg: AutoPairsConfig,
    restorer=None,
    limit: int | None = None,
    on_face: Callable[[str], None] | None = None,
    resume: bool = True,
) -> AutoPairsSummary:
    """Write OUT/images/..., OUT/pairs.jsonl, OUT/candidates.jsonl and OUT/autopairs.json.

    Pairs are appended face by face to `*.partial.jsonl` files, so an interrupted run continues where
    it stopped (`resume`, same settings) and only a finished one has `pairs.jsonl`.
    """
    out = check_out_dir(out_dir)
    if cfg.restore_limit and restorer is None:
        raise ValueError("restore_limit > 0 needs a restorer")
    files = source_images(Path(src))[: limit or None]
    settings = {"facerestore": __version__, "source": str(src), **asdict(cfg)}
    done = _done_groups(out, settings, resume)
    summary, t0 = AutoPairsSummary(out), time.perf_counter()
    writer = AutoPairWriter(out, cfg, restorer)
    batch: list[tuple[_Face, bool]] = []
    carry = False  # a face chosen for restoring was unreadable: restore the next one instead

    def flush() -> None:
        p, c = writer.write([f for f, _ in batch], [r for _, r in batch])
        _append(_partial(out, CANDIDATES_FILE), c)
        _append(_partial(out, PAIRS_FILE), p)
        batch.clear()

    with torch.no_grad():
        for (rel, path), chosen in zip(files, _restore_mask(len(files), cfg.restore_limit)):
            if on_face:
                on_face(rel)
            name = Path(rel).with_suffix("").as_posix()
            if name in done:
                continue
            try:
                face = _Face(name, read_image(path).rgb, image_seed(cfg.seed, rel))
            except MediaError:
                summary.unreadable.append(rel)
                carry = carry or chosen
                continue
            do_restore, carry = chosen or carry, chosen and carry
            batch.append((face, do_restore))
            if sum(r for _, r in batch) >= cfg.restore_batch or len(batch) >= cfg.write_every:
                flush()
        if batch:
            flush()
    return _finish(out, settings, summary, t0)


def _finish(out: Path, settings: dict, summary: AutoPairsSummary, t0: float) -> AutoPairsSummary:
    """Publish the partial files under their final names and record what the set holds."""
    _partial(out, CANDIDATES_FILE).replace(out / CANDIDATES_FILE)
    _partial(out, PAIRS_FILE).replace(out / PAIRS_FILE)
    pairs = load_annotations(out / PAIRS_FILE, check_files=False).pairs
    summary.faces = len({p.group for p in pairs})
    summary.restored = sum(1 for p in pairs if p.kind == "gt>restored")
    summary.pairs = len(pairs)
    summary.candidates = sum(1 for line in open(out / CANDIDATES_FILE) if line.strip())
    counts = {"faces": summary.faces, "pairs": summary.pairs, "candidates": summary.candidates}
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, **counts, "complete": True}, indent=2) + "\n")
    summary.seconds = time.perf_counter() - t0
    return summary
