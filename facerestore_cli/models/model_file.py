"""Model files: the small TOML file `--model` takes to name a model's upstream checkpoint files.

    kind = "diffbir-v1"            # SwinIR + SD 2.1 + ControlNet, multi-step
    sd = "v2-1_512-ema-pruned.ckpt" # the ldm single file, or a diffusers SD 2.1-base folder
    swinir = "face_swinir_v1.ckpt"
    controlnet = "diffbir_refl.pt"

Relative paths are relative to the model file, so a folder holding the file and its checkpoints
can be moved as one. Optional parts: `preset` (a diffbir-v1 model's sampler defaults, the
paper's: diffbir_v1, diffusionreward or lrpo; diffbir_v1 when absent), `base` (another model file or store name whose slots fill
the ones not given here, e.g. a fine-tuned ControlNet on top of `diffbir-v1-face`), `[files.SLOT]`
tables recording each file's sha256 and size, and a `[meta]` table of free text.

`facerestore models import/pull` write these files into the store, `$FACERESTORE_HOME` (else
`~/.cache/facerestore`) under `models/`, so that `--model NAME` finds them by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from facerestore_cli.errors import InputError, MissingFileError

#: The slots each kind of model file needs, in the order they are written.
KIND_SLOTS: dict[str, tuple[str, ...]] = {
    "diffbir-v1": ("sd", "swinir", "controlnet"),
    "osediff": ("sd", "osediff"),
    "frm": ("frm",),
}
ALL_SLOTS: tuple[str, ...] = ("sd", "swinir", "controlnet", "osediff", "frm")
OTHER_KEYS = ("kind", "base", "preset", "files", "meta")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_BASE_DEPTH = 8


def store_dir() -> Path:
    """`$FACERESTORE_HOME`, else `~/.cache/facerestore`: read each call, so a changed variable counts."""
    return Path(os.environ.get("FACERESTORE_HOME") or "~/.cache/facerestore").expanduser()


def models_dir() -> Path:
    return store_dir() / "models"


def is_model_name(value: str) -> bool:
    """A bare name a model file can be stored under (no path separators, no dots in front)."""
    return bool(_NAME.fullmatch(value)) and not value.endswith(".toml")


def model_file_path(name: str) -> Path:
    """Where the store keeps the model file of `name`."""
    if not is_model_name(name):
        raise InputError(f"{name!r} is not a model name (letters, digits, '.', '_' and '-')")
    return models_dir() / f"{name}.toml"


@dataclass
class FileRecord:
    """What a file was when it was imported: lets a later check notice a changed file."""

    sha256: str | None = None
    size: int | None = None


def file_record(path: Path, on_bytes: Callable[[int], None] | None = None) -> FileRecord:
    """sha256 and size of a file, read in 8 MiB chunks (checkpoints are gigabytes); a folder
    (a diffusers SD folder) gets no record. `on_bytes` is told each chunk's length, for a bar."""
    if path.is_dir():
        return FileRecord()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return FileRecord(digest.hexdigest(), path.stat().st_size)


@dataclass
class ModelFile:
    """A parsed model file: the kind, one path per slot (absolute once read), and the records."""

    kind: str
    sd: Path | None = None
    swinir: Path | None = None
    controlnet: Path | None = None
    osediff: Path | None = None
    frm: Path | None = None
    base: str | None = None
    #: The sampler defaults of a diffbir-v1 model (`models.diffbir.PRESETS`); None: diffbir_v1.
    preset: str | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    #: The file this was read from (None when built in code).
    path: Path | None = None

    @property
    def slots(self) -> tuple[str, ...]:
        return KIND_SLOTS[self.kind]

    def slot_paths(self) -> dict[str, Path]:
        """The path of every slot that is set, in the kind's order."""
        return {s: p for s in self.slots if (p := getattr(self, s)) is not None}

    def missing_slots(self) -> list[str]:
        """Slots whose file or folder is not (or no longer) there."""
        return [s for s, p in self.slot_paths().items() if not p.exists()]

    def check_files(self) -> None:
        """A one-line MissingFileError naming the first slot whose file is gone."""
        for slot in self.missing_slots():
            hint = ""
            if self.path is not None and self.path.parent == models_dir():
                hint = f"; run `facerestore models pull {self.path.stem}` or import it again"
            raise MissingFileError(f"{self.path or 'model file'}: the {slot} file {getattr(self, slot)} is not there{hint}")

    @classmethod
    def read(cls, path: str | Path) -> ModelFile:
        """Parse and validate a model file; every problem is one InputError line naming the file."""
        return _read(Path(path), depth=0, seen=())

    def to_toml(self, relative_to: Path | None = None) -> str:
        """The file's text. Paths under `relative_to` (the file's folder) are written relative."""
        lines = [f"kind = {_quote(self.kind)}"]
        if self.base:
            lines.append(f"base = {_quote(self.base)}")
        if self.preset:
            lines.append(f"preset = {_quote(self.preset)}")
        for slot, p in self.slot_paths().items():
            lines.append(f"{slot} = {_quote(_portable(p, relative_to))}")
        for slot, rec in self.files.items():
            if rec.sha256 is None and rec.size is None:
                continue
            lines += ["", f"[files.{slot}]"]
            if rec.sha256 is not None:
                lines.append(f"sha256 = {_quote(rec.sha256)}")
            if rec.size is not None:
                lines.append(f"size = {rec.size}")
        if self.meta:
            lines += ["", "[meta]"] + [f"{_key(k)} = {_quote(v)}" for k, v in self.meta.items()]
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the file (atomically: a reader never sees half a model file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml(relative_to=path.parent.absolute()), encoding="utf-8")
        os.replace(tmp, path)
        self.path = path
        return path


def _quote(text: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes), which keeps Windows paths safe.
    return json.dumps(text, ensure_ascii=False)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _quote(key)


def _portable(p: Path, relative_to: Path | None) -> str:
    p = p.absolute()
    if relative_to is not None:
        try:
            return p.relative_to(relative_to).as_posix()
        except ValueError:
            pass
    return str(p)


def _read(path: Path, depth: int, seen: tuple[Path, ...]) -> ModelFile:
    if not path.is_file():
        raise MissingFileError(f"{path}: no such model file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a valid TOML file ({err})") from None
    kind = data.get("kind")
    if kind is None:
        raise InputError(f"{path}: no `kind` (one of {', '.join(KIND_SLOTS)})")
    if kind not in KIND_SLOTS:
        raise InputError(f"{path}: unknown kind {kind!r} (one of {', '.join(KIND_SLOTS)})")
    slots = KIND_SLOTS[kind]
    for key in data:
        if key in ALL_SLOTS and key not in slots:
            raise InputError(f"{path}: {key!r} is no slot of a {kind} model (it takes {', '.join(slots)})")
        if key not in ALL_SLOTS and key not in OTHER_KEYS:
            raise InputError(f"{path}: unknown key {key!r} (a {kind} model file takes kind, base, {', '.join(slots)}, [files], [meta])")
    model = ModelFile(kind=kind, path=path)
    for slot in slots:
        value = data.get(slot)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise InputError(f"{path}: {slot} must be a path (a non-empty string)")
        p = Path(value).expanduser()
        setattr(model, slot, p if p.is_absolute() else path.parent.absolute() / p)
    preset = data.get("preset")
    if preset is not None and (kind != "diffbir-v1" or not isinstance(preset, str)):
        raise InputError(f'{path}: preset is the sampler preset of a diffbir-v1 model (a name, e.g. "diffusionreward")')
    model.preset = preset
    model.files = _records(path, data.get("files", {}), slots)
    model.meta = _meta(path, data.get("meta", {}))
    base = data.get("base")
    if base is not None:
        if not isinstance(base, str) or not base:
            raise InputError(f"{path}: base must be a model name or a path to a model file")
        model.base = base
        _fill_from_base(model, path, depth, seen)
    absent = [s for s in slots if getattr(model, s) is None]
    if absent:
        raise InputError(f"{path}: no {', '.join(absent)} (a {kind} model file needs {', '.join(slots)})")
    return model


def _fill_from_base(model: ModelFile, path: Path, depth: int, seen: tuple[Path, ...]) -> None:
    """Take the slots this file leaves out from its base, which must be of the same kind."""
    assert model.base is not None
    key = path.resolve()
    if key in seen or depth >= _MAX_BASE_DEPTH:
        raise InputError(f"{path}: its base chain loops back or is too long ({model.base})")
    if model.base.endswith(".toml"):
        base_path = Path(model.base).expanduser()
        base_path = base_path if base_path.is_absolute() else path.parent.absolute() / base_path
    else:
        base_path = model_file_path(model.base)
        if not base_path.is_file():
            raise InputError(f"{path}: base {model.base!r} is not in the store ({models_dir()}); import or pull it first")
    base = _read(base_path, depth + 1, seen + (key,))
    if base.kind != model.kind:
        raise InputError(f"{path}: base {model.base!r} is a {base.kind} model, not {model.kind}")
    model.preset = model.preset or base.preset
    for slot in model.slots:
        if getattr(model, slot) is None:
            setattr(model, slot, getattr(base, slot))
            if slot in base.files and slot not in model.files:
                model.files[slot] = base.files[slot]


def _records(path: Path, table: object, slots: tuple[str, ...]) -> dict[str, FileRecord]:
    if not isinstance(table, dict):
        raise InputError(f"{path}: [files] must be a table of [files.SLOT] tables")
    records = {}
    for slot, rec in table.items():
        if slot not in slots:
            raise InputError(f"{path}: [files.{slot}] names no slot of this model ({', '.join(slots)})")
        if not isinstance(rec, dict) or set(rec) - {"sha256", "size"}:
            raise InputError(f"{path}: [files.{slot}] takes only sha256 and size")
        sha, size = rec.get("sha256"), rec.get("size")
        if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise InputError(f"{path}: [files.{slot}] sha256 must be 64 lowercase hex digits")
        if size is not None and not (isinstance(size, int) and size >= 0):
            raise InputError(f"{path}: [files.{slot}] size must be a byte count")
        records[slot] = FileRecord(sha, size)
    return records


def _meta(path: Path, table: object) -> dict[str, str]:
    if not isinstance(table, dict) or not all(isinstance(v, (str, int, float, bool)) for v in table.values()):
        raise InputError(f"{path}: [meta] must be a table of plain values")
    return {str(k): str(v) for k, v in table.items()}


def resolve_model_value(value: str | Path) -> ModelFile | None:
    """What a `--model` value names, as far as model files go.

    A path to a `.toml` file gives that ModelFile; a name with a model file in the store gives
    that one (an existing file or folder of the same name wins, since the user pointed at it);
    anything else gives None and stays the caller's business (a restorer folder, say). A
    returned ModelFile has every file present; otherwise a one-line MissingFileError.
    """
    value = str(value)
    if value.lower().endswith(".toml"):
        model = ModelFile.read(Path(value).expanduser())
    elif Path(value).exists() or not is_model_name(value) or not model_file_path(value).is_file():
        return None
    else:
        model = ModelFile.read(model_file_path(value))
    model.check_files()
    return model
