"""The restorer model: named configs, the one-step restorer and upstream checkpoint loaders.

`configs` is imported eagerly (plain data); the torch/diffusers-heavy modules load on first use
so `facerestore --help` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from facerestore_cli.models.configs import RestorerConfig, get_config, list_configs, register_config

_LAZY = {
    "OneStepRestorer": "restorer",
    "LoraMismatchError": "lora",
    "count_parameters": "restorer",
    "load_sd21_folder": "upstream",
    "load_osediff_checkpoint": "upstream",
}

__all__ = ["RestorerConfig", "get_config", "list_configs", "register_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
