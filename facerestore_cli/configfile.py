"""Config files of the training commands: TOML or JSON, and unknown keys are errors.

A misspelt key that is silently ignored costs a training run; every config class reads its file
through `read_config` and checks each table with `check_keys`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from facerestore_cli.errors import InputError


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw tables of a .toml or .json config file; InputError when it cannot be read as one."""
    try:
        text = Path(path).read_text()
        return json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise InputError(f"cannot read the config: {err}") from None


def check_keys(raw: dict[str, Any], cls: type, what: str) -> None:
    """InputError naming every key of `raw` that the dataclass `cls` does not have."""
    unknown = set(raw) - set(cls.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown {what} keys: {', '.join(sorted(unknown))} (known: {', '.join(cls.__dataclass_fields__)})")


class RunConfig:
    """Base of every run config dataclass (`train`, `train-frm`, `refl`, `lrpo`): a file's top-level keys are
    the dataclass's fields, and each table in TABLES is one nested dataclass; every key is checked
    and `validate` turns an impossible setting into one clear error before anything runs."""

    #: table name -> the dataclass of that table, e.g. {"losses": LossWeights}.
    TABLES: ClassVar[dict[str, type]] = {}
    #: what error messages call this config, e.g. "refl config".
    KIND: ClassVar[str] = "config"

    @classmethod
    def from_file(cls, path: str | Path) -> Any:
        return cls.from_dict(read_config(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Any:
        raw = dict(raw)
        check_keys(raw, cls, cls.KIND)
        tables = {}
        for name, table in cls.TABLES.items():
            sub = raw.pop(name, {})
            check_keys(sub, table, f"{cls.KIND} [{name}]")
            tables[name] = table.from_dict(sub) if hasattr(table, "from_dict") else table(**sub)
        try:
            cfg = cls(**raw, **tables)
        except TypeError as err:  # a table given where a value belongs, or the reverse
            raise InputError(f"{cls.KIND}: {err}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise InputError for a setting that cannot run."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
