"""Atomic output files, and the error every file problem is reported as.

Outputs are written to a temp file in the destination folder, then `os.replace`d, so an
interrupted run never leaves a half-written file under a final name. A kill (SIGKILL, a power
cut) can still leave the hidden temp file itself; its name carries the host and process that wrote
it, so the next run into the folder can tell it is orphaned and remove it
(`remove_orphaned_temps`) without touching the temp files of a run still going, here or on
another host sharing the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from contextlib import suppress
from functools import lru_cache
from pathlib import Path
from typing import Iterable

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


@lru_cache(maxsize=1)
def _host_tag() -> str:
    """8 hex digits naming this host: a pid says nothing about a process on another machine."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


#: `.{stem}.frtmp-{host}-{pid}-{random}.tmp{suffix}`, as `temp_path_for` names its files.
_TEMP_NAME = re.compile(r"^\..*\.frtmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^.]*\.tmp(\.[^.]*)?$")


def temp_path_for(path: Path) -> Path:
    """A fresh hidden temp file next to ``path`` (same filesystem, so os.replace is atomic), named
    after the host and process writing it (module doc)."""
    prefix = f".{path.stem}.frtmp-{_host_tag()}-{os.getpid()}-"
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _orphaned(name: str) -> bool:
    """A temp file of ours whose writer, on this host, is gone."""
    found = _TEMP_NAME.match(name)
    return bool(found) and found["host"] == _host_tag() and not _process_alive(int(found["pid"]))


def remove_orphaned_temps(folders: Iterable[Path]) -> int:
    """Delete, in ``folders`` (not below them), the temp files that killed runs on this host
    left; how many. A run sweeps only the folders it writes into, so `-o ~` reads no whole tree."""
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not made yet, or unreadable: nothing of ours in it
            continue
        for entry in entries:
            if entry.name.startswith(".") and _orphaned(entry.name) and entry.is_file(follow_symlinks=False):
                with suppress(FileNotFoundError):  # another rank removed it first
                    os.unlink(entry.path)
                    removed += 1
    return removed


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
