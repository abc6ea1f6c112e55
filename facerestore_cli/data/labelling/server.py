"""A small local web app (standard library only) for labelling face pairs.

The page shows two faces of a candidate pair side by side; the maintainer clicks (or presses
1 / 2 / 0, or the arrow keys) which one looks more real and faithful, or a tie, or skips. Each answer
is appended at once to a JSONL file in the human-label format that `facerestore frm-import` reads,
so closing the browser loses nothing and restarting resumes after the last labelled pair.

Which image goes on the left is decided per pair by a seeded coin, so the label does not depend on
the order the pairs were written in (ground truth is often image a). The page never shows file
names, which could give away which image is the original. The server binds to 127.0.0.1 only and
serves only the images of the pairs it was given.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from facerestore_cli.data.annotations import AnnotationError, Pair, read_rows

STATIC_FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
CHOICES = ("left", "right", "tie", "skip")


def _key(a: Path, b: Path) -> frozenset:
    return frozenset((Path(a).resolve(), Path(b).resolve()))


class LabelSession:
    """The queue of unlabelled pairs and the output file; thread-safe."""

    def __init__(self, pairs: Sequence[Pair], out: Path, annotator: str = "", seed: int = 0) -> None:
        self.pairs = list(pairs)
        self.out = Path(out)
        self.annotator = annotator
        self.seed = seed
        self.lock = threading.Lock()
        done = self._already_labelled()
        self.queue = [i for i, p in enumerate(self.pairs) if _key(p.image_a, p.image_b) not in done]
        self.labelled = len(self.pairs) - len(self.queue)
        self.skipped = 0

    def _already_labelled(self) -> set[frozenset]:
        """Pairs already in the output file (a restarted session goes on after them)."""
        if not self.out.is_file():
            return set()
        base, done = self.out.parent, set()
        try:
            for _, row in read_rows(self.out):
                if "image_a" in row and "image_b" in row and row.get("preferred"):
                    done.add(_key(base / row["image_a"], base / row["image_b"]))
        except AnnotationError:
            pass
        return done

    def a_on_right(self, index: int) -> bool:
        """The seeded coin deciding whether image a is shown on the right."""
        return hashlib.sha256(f"{self.seed}/{index}".encode()).digest()[0] & 1 == 1

    def state(self) -> dict[str, Any]:
        with self.lock:
            return self._state()

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"total": len(self.pairs), "labelled": self.labelled, "skipped": self.skipped, "pair": None}
        if self.queue:
            i = self.queue[0]
            left, right = ("b", "a") if self.a_on_right(i) else ("a", "b")
            state["pair"] = {"id": i, "left": f"/image/{i}/{left}", "right": f"/image/{i}/{right}", "caption": self.pairs[i].caption}
        return state

    def image(self, index: int, side: str) -> Path | None:
        if side not in ("a", "b") or not 0 <= index < len(self.pairs):
            return None
        p = self.pairs[index]
        return Path(p.image_a if side == "a" else p.image_b)

    def record(self, index: int, choice: str) -> dict[str, Any]:
        """Store the answer for the pair on screen and move on; a stale or bad answer is an error."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        with self.lock:
            if not self.queue or self.queue[0] != index:
                raise ValueError("that pair is no longer the one on screen (reload the page)")
            self.queue.pop(0)
            if choice == "skip":
                self.skipped += 1
            else:
                self._append(index, choice)
                self.labelled += 1
            return self._state()

    def _append(self, index: int, choice: str) -> None:
        p, a_right = self.pairs[index], self.a_on_right(index)
        preferred = "tie" if choice == "tie" else ("a" if (choice == "left") != a_right else "b")
        labelled = Pair(p.image_a, p.image_b, preferred, "human", p.kind, p.group, p.caption, annotator=self.annotator)
        row = {**labelled.to_row(self.out.parent), "shown_left": "b" if a_right else "a", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


class _Handler(BaseHTTPRequestHandler):
    session: LabelSession  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: one line per image is noise
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path in STATIC_FILES:
            name = STATIC_FILES[path]
            body = resources.files(__package__).joinpath("static", name).read_bytes()
            self._send(HTTPStatus.OK, body, mimetypes.guess_type(name)[0] or "text/plain")
        elif path == "/api/state":
            self._json(self.session.state())
        elif path.startswith("/image/"):
            self._image(path)
        else:
            self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

    def _image(self, path: str) -> None:
        parts = path.split("/")
        file = self.session.image(int(parts[2]), parts[3]) if len(parts) == 4 and parts[2].isdigit() else None
        if file is None or not file.is_file():
            self._json({"error": "no such image"}, HTTPStatus.NOT_FOUND)
            return
        self._send(HTTPStatus.OK, file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/label":
            self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            self._json(self.session.record(int(body["id"]), str(body["choice"])))
        except (ValueError, KeyError, TypeError) as err:
            self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)


def make_server(session: LabelSession, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0 picks a free one); call `serve_forever()` on it."""
    handler = type("LabelHandler", (_Handler,), {"session": session})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
