"""Captions of training faces for the Face Reward Model, which scores a face against its caption.

DiffusionReward's FRM (`FaceRewardModel.pth`) was trained on a caption per image (FFHQ's captions,
one `.txt` per image); scoring every face with one empty caption judges it against a text it
never saw. Two sources, matched to a prepared crop by its file or by the photo it was cut from
(the manifest's `source`), by path, name or stem:

- a JSONL file, one `{"image": ..., "caption": ...}` per line;
- `txt`: one `.txt` beside each image (beside the crop, or beside its source photo), as FFHQ's
  captions are shipped.

A face without a caption gets the fixed `default` caption, and the lookup counts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from facerestore_cli.errors import InputError, MissingFileError

#: the `captions` value that reads one .txt beside each image.
BESIDE = "txt"


def read_caption_file(path: Path) -> dict[str, str]:
    """image -> caption of a JSONL file; a bad line is an error naming it."""
    if not path.is_file():
        raise MissingFileError(f"captions: {path} not found")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = str(row["image"]), str(row["caption"])
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f'{path}:{n}: expected {{"image": ..., "caption": ...}} ({type(err).__name__}: {err})') from None
        out[image] = caption.strip()
    return out


def _keys(path: Path) -> list[str]:
    """The names an image may be listed under: as given, resolved, file name, stem."""
    keys = [str(path), path.name, path.stem]
    try:
        keys.insert(1, str(path.resolve()))
    except OSError:
        pass
    return keys


@dataclass
class CaptionLookup:
    """Caption of a crop (its file and its source photo); `default` when none is found."""

    source: str = ""
    default: str = ""
    table: dict[str, str] = field(default_factory=dict)
    found: int = 0
    missing: int = 0

    @classmethod
    def from_config(cls, captions: str, default: str) -> CaptionLookup:
        """`captions`: a JSONL file, `txt` (a .txt beside each image) or "" (the fixed caption only)."""
        if not captions or captions == BESIDE:
            return cls(captions, default)
        path = Path(captions)
        table = read_caption_file(path)
        # also index by resolved path, name and stem of each listed image
        full = {k: c for image, c in table.items() for k in reversed(_keys(Path(image)))}
        return cls(str(path), default, full)

    def lookup(self, crop: Path, source: str | None = None) -> str | None:
        """The caption of a crop or of its source photo, or None."""
        candidates = [crop] + ([Path(source)] if source else [])
        for image in candidates:
            if self.source == BESIDE:
                txt = image.with_suffix(".txt")
                if txt.is_file():
                    return txt.read_text().strip()
            else:
                for key in _keys(image):
                    if key in self.table:
                        return self.table[key]
        return None

    def caption(self, crop: Path, source: str | None = None) -> str:
        """The caption, counting whether one was found."""
        found = self.lookup(crop, source) if self.source else None
        if found is None:
            self.missing += 1
            return self.default
        self.found += 1
        return found

    def describe(self) -> str:
        """What the run's summary says about its captions."""
        if not self.source:
            return f"fixed: {self.default!r}"
        where = "a .txt beside each image" if self.source == BESIDE else self.source
        return f"{where}: {self.found} faces captioned, {self.missing} with the fixed {self.default!r}"
