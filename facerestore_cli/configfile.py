"""Config files of the training commands: TOML or JSON, and unknown keys are errors.

A misspelt key that is silently ignored costs a training run; every config class reads its file
through `read_config` and checks each table with `check_keys`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw tables of a .toml or .json config file."""
    text = Path(path).read_text()
    return json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)


def check_keys(raw: dict[str, Any], cls: type, what: str) -> None:
    """ValueError naming every key of `raw` that the dataclass `cls` does not have."""
    unknown = set(raw) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {what} keys: {', '.join(sorted(unknown))} (known: {', '.join(cls.__dataclass_fields__)})")
