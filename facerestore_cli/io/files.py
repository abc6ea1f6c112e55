"""Atomic output files, and the error every file problem is reported as.

Outputs are written to a temp file in the destination folder, then `os.replace`d, so an
interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

from facerestore_cli.errors import FacerestoreError


class MediaError(FacerestoreError):
    """A problem with one input or output file, reported to the user as ``PATH: reason``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        # Both in args so the error survives pickling (multiprocessing workers).
        super().__init__(str(path), reason)
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # always one line

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path_for(path: Path) -> Path:
    """A fresh hidden temp file next to ``path`` (same filesystem, so os.replace is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def publish(tmp: Path, path: Path) -> None:
    """Give the temp file normal permissions (mkstemp makes 0600) and move it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with suppress(FileNotFoundError):
            path.unlink()


def copy_file(src: Path, dst: Path) -> Path:
    """Copy bytes unchanged (an image without faces is passed through, not re-encoded), atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dst)
    try:
        shutil.copyfile(src, tmp)
        publish(tmp, dst)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return dst
