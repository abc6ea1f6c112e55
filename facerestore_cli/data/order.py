"""The order training reads its faces in, so that a resumed run reads what the uninterrupted one did.

torch's `RandomSampler` draws each epoch's order from the global generator when the epoch
starts, and a crop's random patch and flip come from the worker's generator: a run resumed in
the middle of an epoch would start a new order and other crops. `ResumableOrder` makes both a
function of (seed, epoch, position) instead: every epoch is a permutation drawn from the seed and
the epoch, each position carries a seed for that sample's random draws (`CropDataset` takes
`(index, seed)` keys), and the order can start at any sample of the run's stream. It shards by
process itself (every `processes`-th sample of each epoch), so the loaders using it are not
handed to `accelerate.prepare`.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

#: Mixed into each epoch's generator seed, so epochs of one run and runs of other seeds differ.
_EPOCH_STRIDE = 1_000_003


class ResumableOrder(Sampler):
    """Endless `(index, draw seed)` keys of a dataset of `size` items: this process's share of a
    fresh permutation every epoch, from the `start`-th key of its stream on."""

    def __init__(self, size: int, seed: int, start: int = 0, process: int = 0, processes: int = 1) -> None:
        if size < 1:
            raise ValueError("ResumableOrder needs at least one item")
        self.size, self.seed, self.start = size, seed, start
        self.process, self.processes = process, processes
        #: keys per process and epoch; the remainder of an epoch is dropped so processes stay in step
        self.per_process = max(size // processes, 1)

    def __len__(self) -> int:
        return self.per_process

    def epoch(self, epoch: int) -> list[tuple[int, int]]:
        """This process's keys of one epoch."""
        gen = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + epoch)
        order = torch.randperm(self.size, generator=gen)
        draws = torch.randint(0, 2**62, (self.size,), generator=gen)
        mine = range(self.process, self.size, self.processes) if self.size >= self.processes else [self.process % self.size]
        return [(int(order[i]), int(draws[i])) for i in list(mine)[: self.per_process]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_process)
        while True:
            yield from self.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0
