"""Checkpoint and resume for every training loop.

A GPU command here lasts at most 10 minutes, so every loop must stop cleanly on a time budget and
continue where it stopped: the checkpoint holds the model folder, the optimiser, the step and all
random-number states, and is written to a temporary folder first so an interrupted save never
replaces a good checkpoint with half of one.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CHECKPOINT = "checkpoint"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write run_dir/checkpoint atomically (model via `save_model`, optimiser, step, RNG)."""
    final = Path(run_dir) / CHECKPOINT
    tmp = final.with_name(CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp / "model")
    state = {"optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(), "extra": extra or {}}
    torch.save(state, tmp / "training_state.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step, "time": time.time()}))
    old = final.with_name(CHECKPOINT + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    # else: a save killed between these two renames left the last good checkpoint in `old` alone
    # (the run resumed from it); it goes only once the new one is in place
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint; when a save was killed between its two renames (the checkpoint moved
    aside to `checkpoint.old`, the new one not yet moved in), that previous one."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = Path(run_dir) / name
        if (path / "training_state.pt").is_file():
            return path
    return None


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
    """Restore optimiser and RNG from a checkpoint; returns (step, extra)."""
    state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"]), state.get("extra", {})


class TimeBudget:
    """Tells a loop when to stop so the last checkpoint lands before a hard time limit."""

    def __init__(self, minutes: float | None):
        self.deadline = None if not minutes else time.monotonic() + 60 * minutes

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class JsonlLog:
    """Append-only training log (one JSON object per line) that survives resumes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
