"""What a restore run counts (`Summary`), what it did with each input (`FileRecord`, the lines of
`restore --report`), and how it tells its progress (`Reporter`): the CLI shows bars, other ranks
of a torchrun only their errors, library callers nothing."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

from facerestore_cli.io.files import MediaError
from facerestore_cli.io.inputs import (
    InputItem,
)

#: What became of an input: restored (`ok`), left alone because its output exists (`skipped`),
#: not restored (`failed`, with the reason), or written through because no face was found in it.
Status = Literal["ok", "skipped", "failed", "no_faces"]


@dataclass
class FileRecord:
    """One input's outcome: a line of `restore --report`. `output` is None when nothing was written."""

    path: str
    output: str | None
    status: Status
    faces_found: int = 0
    faces_restored: int = 0
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # how the output's colour model or depth changed

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "seconds": round(self.seconds, 3)}, ensure_ascii=False)


@dataclass
class Summary:
    """What a run did; printed at the end and turned into the exit code."""

    files: int = 0  # inputs finished (restored, written through, skipped or failed)
    images: int = 0
    videos: int = 0
    frames: int = 0
    faces_found: int = 0
    faces_restored: int = 0
    skipped: int = 0
    left: int = 0  # inputs not finished because the run was interrupted
    temps_removed: int = 0  # hidden temp files that killed runs left in the output folder
    without_faces: list[str] = field(default_factory=list)  # inputs in which no face was found
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # "PATH: CMYK written as RGB": outputs whose colour model or depth changed
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def files_without_faces(self) -> int:
        return len(self.without_faces)

    @property
    def faces_per_s(self) -> float:
        return self.faces_restored / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at once (in the CLI, a second Ctrl-C): `summary` is what it finished.
    Still a KeyboardInterrupt, so a library caller's Ctrl-C stops its program as it always did."""

    def __init__(self, summary: Summary) -> None:
        super().__init__("interrupted")
        self.summary = summary


class Reporter(Protocol):
    """How the loop tells its caller what is happening (the CLI draws progress bars from it)."""

    def start(self, total_files: int) -> None: ...
    def file_started(self, item: InputItem, frames: int | None) -> None: ...
    def frames_done(self, n: int) -> None: ...
    def file_done(self, item: InputItem) -> None: ...
    def file_finished(self, record: FileRecord) -> None: ...
    def error(self, message: str) -> None: ...


class SilentReporter:
    def start(self, total_files: int) -> None: ...
    def file_started(self, item: InputItem, frames: int | None) -> None: ...
    def frames_done(self, n: int) -> None: ...
    def file_done(self, item: InputItem) -> None: ...
    def file_finished(self, record: FileRecord) -> None: ...
    def error(self, message: str) -> None: ...


class ErrorsOnlyReporter(SilentReporter):
    """No progress, but errors still shown as they happen (torchrun ranks other than 0)."""

    def __init__(self, show: Callable[[str], None]):
        self.show = show

    def error(self, message: str) -> None:
        self.show(message)


class JsonlReport:
    """`restore --report FILE`: one JSON line per input, written as the input finishes.

    Each line goes to the file in one `write` on a descriptor opened with O_APPEND, unbuffered, so
    whenever the run stops (Ctrl-C, a kill, a crash) the file is valid JSONL of what finished, and
    the processes of a torchrun can share one file without mixing their lines. `fresh` empties the
    file first (the first process of a run; the others append).
    """

    def __init__(self, path: Path, fresh: bool = True) -> None:
        self.path = Path(path).expanduser()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, flags, 0o666)
        except OSError as err:
            raise MediaError(self.path, f"cannot write the report: {err.strerror or err}") from err

    def write(self, record: FileRecord) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: report is closed")
        try:
            os.write(self._fd, (record.to_json() + "\n").encode("utf-8"))
        except OSError as err:
            raise MediaError(self.path, f"cannot write the report: {err.strerror or err}") from err

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlReport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReportingReporter:
    """A `Reporter` that also writes each finished input's record to a `JsonlReport`."""

    def __init__(self, inner: Reporter, report: JsonlReport) -> None:
        self.inner, self.report = inner, report

    def start(self, total_files: int) -> None:
        self.inner.start(total_files)

    def file_started(self, item: InputItem, frames: int | None) -> None:
        self.inner.file_started(item, frames)

    def frames_done(self, n: int) -> None:
        self.inner.frames_done(n)

    def file_done(self, item: InputItem) -> None:
        self.inner.file_done(item)

    def file_finished(self, record: FileRecord) -> None:
        self.report.write(record)
        self.inner.file_finished(record)

    def error(self, message: str) -> None:
        self.inner.error(message)
