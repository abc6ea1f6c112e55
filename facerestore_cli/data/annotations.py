"""Preference annotations: the pairs the Face Reward Model learns from, and human labels.

One format for every source of labels (human, automatic, SVM), one JSON object per line::

    {"image_a": "faces/1.png", "image_b": "faces/2.png", "preferred": "a", "source": "human",
     "kind": "", "group": "face17", "caption": "", "weight": 1.0, "confidence": null}

`preferred` is "a", "b", "tie", or missing for an unlabelled candidate pair. Image paths are
relative to the annotation file's folder (or absolute). Human labels are imported from CSV (with a
header row) or JSONL, either as pairwise preferences (`image_a,image_b,preferred`) or as absolute
ratings (`image,rating`, turned into pairs between images of the same `group`). Every bad row
becomes one error naming the file, the line and the reason; the good rows are kept.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from facerestore_cli.errors import FacerestoreError
from facerestore_cli.io.inputs import IMAGE_EXTS

PREFERENCES = ("a", "b", "tie")
SOURCES = ("human", "auto", "svm")
PAIR_FIELDS = ("image_a", "image_b", "preferred")
RATING_FIELDS = ("image", "rating")
OPTIONAL_FIELDS = ("source", "kind", "group", "caption", "weight", "confidence", "annotator", "time", "shown_left")


class AnnotationError(FacerestoreError, ValueError):
    """A whole annotation file cannot be used (unreadable, unknown format, no usable columns)."""


@dataclass
class Pair:
    """Two aligned faces and which one is better (None: not labelled yet)."""

    image_a: Path
    image_b: Path
    preferred: str | None = None
    source: str = "human"
    kind: str = ""
    group: str = ""
    caption: str = ""
    weight: float = 1.0
    confidence: float | None = None
    annotator: str = ""

    @property
    def target(self) -> float:
        """Probability that a is preferred: 1, 0 or 0.5 (a tie)."""
        if self.preferred is None:
            raise ValueError(f"pair {self.image_a} / {self.image_b} is not labelled")
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.preferred]

    def to_row(self, relative_to: Path | None = None) -> dict[str, Any]:
        def rel(p: Path) -> str:
            if relative_to is None:
                return str(p)
            return Path(os.path.relpath(Path(p).resolve(), Path(relative_to).resolve())).as_posix()

        row: dict[str, Any] = {
            "image_a": rel(self.image_a),
            "image_b": rel(self.image_b),
            "preferred": self.preferred,
            "source": self.source,
        }
        for k in ("kind", "group", "caption", "annotator"):
            if getattr(self, k):
                row[k] = getattr(self, k)
        if self.weight != 1.0:
            row["weight"] = round(self.weight, 4)
        if self.confidence is not None:
            row["confidence"] = round(self.confidence, 4)
        return row


@dataclass
class RowError:
    """One unusable row: printed as `file:line: reason`."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class LoadResult:
    """What an annotation file gave: usable pairs, one error per bad row, and the file's kind."""

    pairs: list[Pair] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    kind: str = "pairs"
    rows: int = 0


# ------------------------------------------------------------------ reading tables
def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV file with a header or a JSONL file; bad JSON lines give `{"__error__"}`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise AnnotationError(f"{path}: file not found")
    if suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        yield from _jsonl_rows(path)
    else:
        raise AnnotationError(f"{path}: unknown annotation format '{suffix}' (use .csv with a header row or .jsonl)")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise AnnotationError(f"{path}: empty CSV (expected a header row)")
            for row in reader:
                if None in row:
                    yield reader.line_num, {"__error__": f"{len(row[None])} more value(s) than header columns"}
                    continue
                if all((v or "").strip() == "" for v in row.values()):
                    continue
                yield reader.line_num, {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None}
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err.reason})") from None
    except csv.Error as err:
        raise AnnotationError(f"{path}: not valid CSV ({err})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield n, {"__error__": f"not valid JSON ({err.msg})"}
                    continue
                yield n, row if isinstance(row, dict) else {"__error__": "not a JSON object"}
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err.reason})") from None


# ------------------------------------------------------------------ validating rows
class _Bad(ValueError):
    """A row-level problem (message = the reason)."""


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _Bad(f"missing {key}")
        return ""
    if not isinstance(value, (str, int, float)):
        raise _Bad(f"{key} must be text")
    return str(value).strip()


def _image(row: dict[str, Any], key: str, root: Path, check_files: bool) -> Path:
    name = _text(row, key)
    path = Path(name) if Path(name).is_absolute() else root / name
    if Path(name).suffix.lower() not in IMAGE_EXTS:
        raise _Bad(f"{key} {name!r} is not an image file ({', '.join(sorted(IMAGE_EXTS))})")
    if check_files and not path.is_file():
        raise _Bad(f"{key} {name!r} not found")
    return path


def _number(row: dict[str, Any], key: str, default: float | None, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    value = row.get(key)
    if value is None or value == "":
        return default
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _Bad(f"{key} {value!r} is not a number") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise _Bad(f"{key} {value!r} must be at least {lo:g}" if hi == math.inf else f"{key} {value!r} is outside {lo:g}..{hi:g}")
    return x


def _preference(row: dict[str, Any], required: bool) -> str | None:
    value = row.get("preferred")
    if value is None or str(value).strip() == "":
        if required:
            raise _Bad("missing preferred (a, b or tie)")
        return None
    text = str(value).strip()
    if text.lower() in PREFERENCES:
        return text.lower()
    if text == str(row.get("image_a", "")).strip():
        return "a"
    if text == str(row.get("image_b", "")).strip():
        return "b"
    raise _Bad(f"preferred must be a, b or tie (or one of the two image paths), got {text!r}")


def parse_pair_row(row: dict[str, Any], root: Path, default_source: str, require_label: bool, check_files: bool) -> Pair:
    """One validated pair from a row, or _Bad with the reason."""
    if "__error__" in row:
        raise _Bad(row["__error__"])
    a, b = _image(row, "image_a", root, check_files), _image(row, "image_b", root, check_files)
    if a.resolve() == b.resolve():
        raise _Bad("image_a and image_b are the same file")
    source = _text(row, "source", required=False) or default_source
    if source not in SOURCES:
        raise _Bad(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    return Pair(
        image_a=a,
        image_b=b,
        preferred=_preference(row, require_label),
        source=source,
        kind=_text(row, "kind", required=False),
        group=_text(row, "group", required=False),
        caption=_text(row, "caption", required=False),
        weight=_number(row, "weight", 1.0, lo=0.0),
        confidence=_number(row, "confidence", None, lo=0.0, hi=1.0),
        annotator=_text(row, "annotator", required=False),
    )


# ------------------------------------------------------------------ loading files
def _columns(rows: list[tuple[int, dict[str, Any]]]) -> set[str]:
    return set().union(*(r.keys() for _, r in rows)) - {"__error__"} if rows else set()


def load_annotations(
    path: str | Path,
    *,
    root: str | Path | None = None,
    require_label: bool = True,
    check_files: bool = True,
    default_source: str = "human",
    min_rating_gap: float = 0.0,
    max_rating_pairs: int = 50_000,
    seed: int = 0,
) -> LoadResult:
    """Pairs from a pairwise or ratings file (CSV/JSONL), with one RowError per bad row.

    Image paths are relative to `root` (default: the file's folder). Ratings are averaged per
    image and turned into pairs between images of the same `group` (all images when no row has a
    group), skipping differences smaller than `min_rating_gap` and equal ratings.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    rows = list(read_rows(path))
    cols = _columns(rows)
    if {"image_a", "image_b"} <= cols:
        result = LoadResult(kind="pairs", rows=len(rows))
        for line, row in rows:
            try:
                result.pairs.append(parse_pair_row(row, base, default_source, require_label, check_files))
            except _Bad as err:
                result.errors.append(RowError(path, line, str(err)))
        return result
    if {"image", "rating"} <= cols:
        return _ratings_to_pairs(path, rows, base, check_files, min_rating_gap, max_rating_pairs, seed)
    if not rows:
        raise AnnotationError(f"{path}: no rows")
    raise AnnotationError(
        f"{path}: columns {', '.join(sorted(cols)) or '(none)'} are neither pairwise preferences "
        f"({', '.join(PAIR_FIELDS)}) nor ratings ({', '.join(RATING_FIELDS)})"
    )


@dataclass
class _Rated:
    path: Path
    group: str
    caption: str
    ratings: list[float] = field(default_factory=list)


def _ratings_to_pairs(
    path: Path, rows: list[tuple[int, dict[str, Any]]], base: Path, check_files: bool, min_gap: float, max_pairs: int, seed: int
) -> LoadResult:
    """Average the ratings of each image, then pair images of the same group by their means."""
    result = LoadResult(kind="ratings", rows=len(rows))
    rated: dict[tuple[Path, str, str], _Rated] = {}
    for line, row in rows:
        try:
            if "__error__" in row:
                raise _Bad(row["__error__"])
            image = _image(row, "image", base, check_files)
            rating = _number(row, "rating", None)
            if rating is None:
                raise _Bad("missing rating")
            group, caption = _text(row, "group", required=False), _text(row, "caption", required=False)
            rated.setdefault((image.resolve(), group, caption), _Rated(image, group, caption)).ratings.append(rating)
        except _Bad as err:
            result.errors.append(RowError(path, line, str(err)))
    by_group: dict[str, list[_Rated]] = {}
    for r in rated.values():
        by_group.setdefault(r.group, []).append(r)
    candidates = []
    for members in by_group.values():
        for x, y in itertools.combinations(members, 2):
            gap = sum(x.ratings) / len(x.ratings) - sum(y.ratings) / len(y.ratings)
            if gap != 0 and abs(gap) >= min_gap:
                candidates.append((x, y, gap))
    if len(candidates) > max_pairs:
        candidates = random.Random(seed).sample(candidates, max_pairs)
    for x, y, gap in candidates:
        caption = x.caption if x.caption == y.caption else ""
        result.pairs.append(Pair(x.path, y.path, "a" if gap > 0 else "b", "human", "rating", x.group, caption))
    return result


def read_pairs(path: str | Path, require_label: bool = True, check_files: bool = True) -> list[Pair]:
    """Pairs of a file this package wrote; any bad row is an AnnotationError naming it."""
    result = load_annotations(path, require_label=require_label, check_files=check_files, default_source="auto")
    if result.errors:
        more = f" (and {len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
        raise AnnotationError(f"{result.errors[0]}{more}")
    return result.pairs


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> Path:
    """Write pairs as JSONL, image paths relative to the file's folder (a portable folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for p in pairs:
            f.write(json.dumps(p.to_row(path.parent)) + "\n")
    tmp.replace(path)
    return path


def summarize(pairs: Sequence[Pair]) -> dict[str, int]:
    """Counts by source/kind and preference, for command summaries."""
    counts: dict[str, int] = {}
    for p in pairs:
        key = f"{p.source}:{p.kind or 'pair'}"
        counts[key] = counts.get(key, 0) + 1
    counts["ties"] = sum(1 for p in pairs if p.preferred == "tie")
    counts["unlabelled"] = sum(1 for p in pairs if p.preferred is None)
    return counts


def pair_group(p: Pair) -> str:
    """The unit of the train/validation split: the face (group), else the two images."""
    return p.group or "|".join(sorted([Path(p.image_a).name, Path(p.image_b).name]))


def is_validation(group: str, fraction: float, seed: int) -> bool:
    """A stable hash split: a group is always on the same side, across runs and resumes."""
    h = int.from_bytes(hashlib.sha256(f"{seed}/{group}".encode()).digest()[:4], "little")
    return h / 2**32 < fraction


def split_pairs(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    train, val = [], []
    for p in pairs:
        (val if is_validation(pair_group(p), fraction, seed) else train).append(p)
    return train, val


def load_pair_files(files: Sequence[str | Path]) -> tuple[list[Pair], list[RowError]]:
    """All labelled pairs of the given files; bad rows come back as errors, the rest is used."""
    pairs: list[Pair] = []
    errors: list[RowError] = []
    for f in files:
        result: LoadResult = load_annotations(f, default_source="auto")
        pairs += [p for p in result.pairs if p.preferred is not None]
        errors += result.errors
    return pairs, errors
