"""What a restore run counts (`Summary`), and how it tells its progress (`Reporter`): the CLI
shows bars, other ranks of a torchrun only their errors, library callers nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from facerestore_cli.io.inputs import (
    InputItem,
)


@dataclass
class Summary:
    """What a run did; printed at the end and turned into the exit code."""

    files: int = 0
    images: int = 0
    videos: int = 0
    frames: int = 0
    faces_found: int = 0
    faces_restored: int = 0
    files_without_faces: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def faces_per_s(self) -> float:
        return self.faces_restored / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class Reporter(Protocol):
    """How the loop tells its caller what is happening (the CLI draws progress bars from it)."""

    def start(self, total_files: int) -> None: ...
    def file_started(self, item: InputItem, frames: int | None) -> None: ...
    def frames_done(self, n: int) -> None: ...
    def file_done(self, item: InputItem) -> None: ...
    def error(self, message: str) -> None: ...


class SilentReporter:
    def start(self, total_files: int) -> None: ...
    def file_started(self, item: InputItem, frames: int | None) -> None: ...
    def frames_done(self, n: int) -> None: ...
    def file_done(self, item: InputItem) -> None: ...
    def error(self, message: str) -> None: ...


class ErrorsOnlyReporter(SilentReporter):
    """No progress, but errors still shown as they happen (torchrun ranks other than 0)."""

    def __init__(self, show: Callable[[str], None]):
        self.show = show

    def error(self, message: str) -> None:
        self.show(message)
