"""Finding the user's inputs (files, folders, globs) and where each one's output goes."""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from facerestore_cli.io.files import MediaError

log = logging.getLogger(__name__)


IMAGE_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


VIDEO_EXTS: frozenset[str] = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm"})


_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputItem:
    """One file to restore; ``rel`` is where it goes under the output folder."""

    path: Path
    rel: Path
    kind: Literal["image", "video"]


def media_kind(path: str | os.PathLike[str]) -> Literal["image", "video"] | None:
    """``"image"``/``"video"`` from the extension (case-insensitive), else None."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in _GLOB_CHARS)


def _is_excluded(path: Path, exclude: Sequence[Path]) -> bool:
    if not exclude:
        return False
    resolved = path.resolve()
    return any(resolved == ex or ex in resolved.parents for ex in exclude)


def _in_output_folder(path: Path, exclude: Sequence[Path]) -> MediaError | None:
    """The error for an input folder that ``exclude`` (the output folder) is, or holds: its files
    are left out, and saying "no images" would hide why."""
    if not _is_excluded(path, exclude):
        return None
    if path.resolve() in exclude:
        reason = "the output folder is this input folder: restored files would overwrite or mix with the originals"
    else:
        reason = "this input folder is inside the output folder: restored files would mix with the originals"
    return MediaError(path, f"{reason}; choose another output folder")


def _walk_folder(folder: Path, base: Path, exclude: Sequence[Path]) -> tuple[list[InputItem], int]:
    """All supported files under ``folder`` (sorted, hidden skipped) and how many were skipped."""
    items: list[InputItem] = []
    skipped = 0
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d) and not _is_excluded(root_path / d, exclude))
        for name in sorted(files):
            if _is_hidden(name):
                continue
            path = root_path / name
            kind = media_kind(path)
            if kind is None:
                skipped += 1
                continue
            if not _is_excluded(path, exclude):
                items.append(InputItem(path, path.relative_to(base), kind))
    items.sort(key=lambda item: item.rel.parts)  # path order, not os.walk's files-then-dirs
    return items, skipped


def _explicit_file(path: Path) -> InputItem:
    if not path.is_file():
        raise MediaError(path, "not a regular file")
    kind = media_kind(path)
    if kind is None:
        ext = path.suffix
        raise MediaError(
            path,
            f"unsupported file type '{ext}'" if ext else "unsupported file type (no extension)",
        )
    return InputItem(path, Path(path.name), kind)


def _expand_folder(folder: Path, exclude: Sequence[Path]) -> list[InputItem]:
    inside = _in_output_folder(folder, exclude)
    if inside is not None:
        raise inside
    items, skipped = _walk_folder(folder, folder, exclude)
    if skipped:
        log.info("%s: skipped %d file(s) that are not images or videos", folder, skipped)
    if not items:
        raise MediaError(folder, "folder contains no images or videos")
    return items


def _glob_base(spec: str) -> Path:
    """The folder part of a pattern before its first wildcard; ``rel`` is taken from here."""
    parts = Path(spec).parts
    fixed: list[str] = []
    for part in parts:
        if _has_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand_glob(spec: str, exclude: Sequence[Path]) -> list[InputItem]:
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise MediaError(spec, "no files match this pattern")
    base = _glob_base(spec)
    items: list[InputItem] = []
    left_out = 0  # media files and folders in the output folder
    for match in matches:
        path = Path(match)
        if path.is_dir():
            if _in_output_folder(path, exclude) is not None:
                left_out += 1
            else:
                items.extend(_walk_folder(path, base, exclude)[0])
            continue
        kind = media_kind(path)
        if kind is not None and path.is_file():
            if _is_excluded(path, exclude):
                left_out += 1
            else:
                items.append(InputItem(path, path.relative_to(base), kind))
    if not items and left_out:
        raise MediaError(spec, "pattern matches only files in the output folder; choose another output folder")
    if not items:
        raise MediaError(spec, "pattern matches no images or videos")
    return items


def _expand_spec(spec: str, exclude: Sequence[Path]) -> list[InputItem]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return _expand_folder(path, exclude)
    if path.exists():
        return [_explicit_file(path)]
    if _has_glob(spec):
        return _expand_glob(str(path), exclude)
    raise MediaError(path, "no such file or folder")


def _unique_rel(rel: Path, taken: set[str]) -> Path:
    """``rel`` or ``stem_2.ext``, ``stem_3.ext``... so two inputs never share an output."""
    candidate, n = rel, 1
    while str(candidate).lower() in taken:  # lower(): case-insensitive filesystems
        n += 1
        candidate = rel.with_name(f"{rel.stem}_{n}{rel.suffix}")
    return candidate


def discover_inputs(specs: Sequence[str], *, exclude: Sequence[str | os.PathLike[str]] = ()) -> tuple[list[InputItem], list[MediaError]]:
    """Expand files, folders (recursive) and globs into a de-duplicated list of inputs.

    Bad specs become errors rather than exceptions so one typo doesn't stop a batch.
    ``exclude`` lists output folders to leave out (the output folder when it sits inside an
    input folder, so a second run doesn't restore its own outputs); an input folder that is an
    output folder, or inside one, is an error that says so. When two inputs would
    land on the same output path, later ones get ``_2``, ``_3``... appended to their name.
    """
    excluded = [Path(p).expanduser().resolve() for p in exclude]
    items: list[InputItem] = []
    errors: list[MediaError] = []
    seen: set[Path] = set()
    taken: set[str] = set()
    for spec in specs:
        try:
            found = _expand_spec(spec, excluded)
        except MediaError as err:
            errors.append(err)
            continue
        for item in found:
            key = item.path.resolve()
            if key in seen:
                continue
            seen.add(key)
            rel = _unique_rel(item.rel, taken)
            taken.add(str(rel).lower())
            items.append(item if rel == item.rel else InputItem(item.path, rel, item.kind))
    return items, errors


def output_path_for(item: InputItem, outdir: Path, suffix: str | None = None, *, ext: str | None = None) -> Path:
    """``outdir/rel`` (with ``suffix`` before the extension, ``ext`` replacing it).

    Raises MediaError when that is the input file itself: inputs are never overwritten.
    """
    out = Path(outdir) / item.rel
    if suffix or ext:
        new_ext = out.suffix if ext is None else "." + ext.lstrip(".")
        out = out.with_name(f"{out.stem}{suffix or ''}{new_ext}")
    same = out.resolve() == item.path.resolve()
    if not same and out.exists():
        with suppress(OSError):
            same = os.path.samefile(out, item.path)  # hard links, case-insensitive FS
    if same:
        raise MediaError(item.path, "output would overwrite the input; choose another output folder or a suffix")
    return out


def check_outdir(outdir: Path) -> Path:
    """Create ``outdir`` and prove it is writable now, before hours of work are done."""
    outdir = Path(outdir).expanduser()
    if outdir.exists() and not outdir.is_dir():
        raise MediaError(outdir, "output folder path exists and is a file")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MediaError(outdir, f"cannot create output folder: {err.strerror or err}") from err
    try:
        with tempfile.TemporaryFile(dir=outdir):
            pass
    except OSError as err:
        raise MediaError(outdir, f"output folder is not writable: {err.strerror or err}") from err
    return outdir
