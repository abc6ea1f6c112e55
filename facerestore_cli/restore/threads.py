"""Overlapping I/O with compute: read ahead of the consumer, write behind it, in one thread each.

A video is decoded, restored and encoded chunk by chunk; ffmpeg's pipes release the GIL, so
decoding the next chunk and encoding the previous one in background threads hides most of
their time behind the restorer. Queues are bounded (`depth` items), so memory stays a few
chunks whatever the video's length. An exception in a background thread is re-raised, as the
same object, in the caller's thread at its next call, so callers see the errors they always did.
Both helpers are context managers: leaving the `with` block early (an error, Ctrl-C) stops
their thread and closes what it was working on.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

#: How often a thread blocked on a full or empty queue checks whether it should stop.
_POLL_S = 0.05
_ITEM, _END, _ERROR = "item", "end", "error"


def _put_while(q: queue.Queue, message: tuple[str, object], waiting: Callable[[], bool]) -> bool:
    """Put `message` on `q`, waiting while it is full for as long as `waiting()` holds (checked
    every _POLL_S, so a stop or an error is noticed); False if it stopped holding first."""
    while waiting():
        try:
            q.put(message, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class Prefetch(Generic[T]):
    """Iterate `source` in a background thread, at most `depth` items ahead of the consumer.

    Items come out in order; when the source raises, the consumer gets that exception after
    the items before it. `close` (or leaving the `with` block) stops the thread and closes the
    source if it is a generator, so e.g. a video decoder is stopped.
    """

    def __init__(self, source: Iterable[T], depth: int = 1, name: str = "prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._source = source
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, kind: str, value: object) -> bool:
        """Queue one message, waiting while the queue is full; False once asked to stop."""
        return _put_while(self._queue, (kind, value), lambda: not self._stop.is_set())

    def _run(self) -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = iter(self._source)
            for item in iterator:
                if not self._put(_ITEM, item):
                    return
            self._put(_END, None)
        except BaseException as err:  # handed to the consumer, whatever it is
            self._put(_ERROR, err)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's cleanup (e.g. killing ffmpeg) runs in the thread that ran it

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value  # type: ignore[return-value]
        self._done = True
        self._thread.join()
        if kind == _ERROR:
            raise value  # type: ignore[misc]
        raise StopIteration

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (safe to call twice)."""
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class WriteBehind(Generic[T]):
    """Call `sink(item)` on each `put` item in a background thread, at most `depth` items behind.

    Items reach the sink in order. If the sink raises, nothing more is written and the
    exception is re-raised by the next `put` or by `close`. Leaving the `with` block normally
    waits until every item is written; leaving it with an exception drops what is still queued.
    """

    def __init__(self, sink: Callable[[T], None], depth: int = 1, name: str = "write-behind") -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._sink = sink
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if kind == _END:
                return
            try:
                self._sink(value)  # type: ignore[arg-type]
            except BaseException as err:
                self._error = err
                return

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._stop.set()
            raise err

    def _writing(self) -> bool:
        """Whether the thread still writes; raises the sink's error, if it had one."""
        self._raise_error()
        return self._thread.is_alive()

    def put(self, item: T) -> None:
        """Queue one item, waiting while `depth` items are queued; raises the sink's error, if any."""
        if not _put_while(self._queue, (_ITEM, item), self._writing):
            raise RuntimeError("WriteBehind is closed")

    def close(self) -> None:
        """Write everything queued, stop the thread, and raise the sink's error if it had one."""
        _put_while(self._queue, (_END, None), self._thread.is_alive)
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Stop without writing what is still queued (the item being written is finished)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> WriteBehind[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
