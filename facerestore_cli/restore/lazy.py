"""The face restorer of a `restore` run, built when the first file needs it.

`restore` checks its options, paths and device first (`options.check_before_loading`); the model
and detector (`build_face_restorer`, which imports torch) wait until a file is to be restored, so
a run in which every input is skipped (`--skip-existing` with nothing left to do) or fails before
it is restored (missing, not a photo or video, a video whose header cannot be read) neither
loads nor imports them, nor does a photo that proves unreadable (photos are read before they
are restored). A video whose header reads builds them before its first frame is decoded.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from facerestore_cli.restore.face_restorer import FaceRestorer


class BuildFailed(BaseException):
    """Building the face restorer failed, inside the file loop: that stops the whole run, it is
    not the error of the file that asked first, so it passes the loop's per-file `except
    Exception` (as KeyboardInterrupt does). `error` is what the build raised; `build_errors`
    turns it back into that."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


class LazyFaceRestorer:
    """Stands in for the `FaceRestorer` that `build()` makes, making it on first use.

    `batch_size` is the loop's first question (how many photos to restore together): a number
    given (`--batch-size N`) is answered without the model. Auto depends on the model's device and
    face size, so until the model is built it is 1: the first photo is read and restored alone
    (building the model only if it could be read), and the photos after it in batches of the
    model's size.
    """

    def __init__(self, build: Callable[[], FaceRestorer], batch_size: int | str = "auto"):
        self._build = build
        self._batch_size = batch_size
        self._restorer: FaceRestorer | None = None

    @property
    def built(self) -> bool:
        return self._restorer is not None

    def get(self) -> FaceRestorer:
        """The face restorer, built now if it is not yet (a failure: `BuildFailed`)."""
        if self._restorer is None:
            try:
                self._restorer = self._build()
            except Exception as err:
                raise BuildFailed(err) from err
        return self._restorer

    @property
    def batch_size(self) -> int:
        if self._restorer is None:
            return 1 if self._batch_size == "auto" else int(self._batch_size)
        return self._restorer.batch_size

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never build for private or special names (copy, pickle)
            raise AttributeError(name)
        return getattr(self.get(), name)


@contextmanager
def build_errors() -> Iterator[None]:
    """A `BuildFailed` comes out as the error the build raised: a user's error (a
    FacerestoreError) for `user_errors` to print as one line, anything else with its traceback."""
    try:
        yield
    except BuildFailed as failed:
        raise failed.error from None
