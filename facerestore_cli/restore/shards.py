"""Several processes restoring one run under torchrun: each takes every N-th input on its own GPU,
and the summaries are gathered so rank 0 reports the whole run (and every rank exits alike).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Sequence

from facerestore_cli.errors import FacerestoreError, InputError
from facerestore_cli.io.inputs import (
    InputItem,
)
from facerestore_cli.restore.report import Summary

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: rank r of `world` restores inputs r, r + world, ..."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a single process without them)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise InputError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({err})") from None
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"RANK={rank} does not fit WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def take(self, items: Sequence[InputItem]) -> list[InputItem]:
        """This rank's items of the list sorted by output path (the same list on every rank)."""
        if not self.distributed:
            return list(items)
        return sorted(items, key=lambda i: str(i.rel))[self.rank :: self.world]

    def device(self, device: torch.device) -> torch.device:
        """CUDA without an index means this process's own GPU, cuda:LOCAL_RANK."""
        import torch

        if self.distributed and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device


def join_shards(shard: Shard) -> None:
    """Join torchrun's process group: gloo, since only a few counts ever travel (no GPU needed).

    The timeout is long because ranks finish their shards at different times (a long video).
    """
    if not shard.distributed:
        return  # a single process imports no torch for it
    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=timedelta(days=7))
        except (RuntimeError, ValueError) as err:  # DistNetworkError and friends: one line, not a traceback
            first = (str(err).strip().splitlines() or [""])[0]
            raise FacerestoreError(f"torchrun rank {shard.rank}: cannot join the process group ({type(err).__name__}: {first})") from None


def leave_shards() -> None:
    """Tear the process group down cleanly (torch warns at exit otherwise). A process that never
    imported torch.distributed has none, and does not import torch to find that out."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def merge_summaries(parts: Sequence[Summary]) -> Summary:
    """One summary of a sharded run: counts add up, time is the slowest rank's."""
    total = Summary()
    counts = [f.name for f in fields(Summary) if f.type == "int"]
    for part in parts:
        for name in counts:
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.failures += part.failures
        total.notes += part.notes
        total.without_faces += part.without_faces
        total.seconds = max(total.seconds, part.seconds)
        total.interrupted |= part.interrupted
    total.failures = list(dict.fromkeys(total.failures))  # e.g. an unwritable OUTPUT, seen by every rank
    return total


def wait_for_all(shard: Shard) -> None:
    """Every rank waits here until all have come (e.g. until rank 0 has emptied the report file)."""
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather_summary(summary: Summary, shard: Shard) -> Summary:
    """Every rank's summary merged, on every rank (so all exit with the same code)."""
    if not shard.distributed:
        return summary
    import torch.distributed as dist

    parts: list[dict | None] = [None] * shard.world
    dist.all_gather_object(parts, asdict(summary))
    return merge_summaries([Summary(**p) for p in parts if p is not None])
