"""Which examples go into which batch: a seeded, resumable, per-process shuffle of the training set."""

from __future__ import annotations

import torch


class EpochBatches:
    """Deterministic, shardable batching.

    The order of epoch ``e`` is a permutation drawn from a generator seeded with
    ``(seed, e)``, independent of the number of processes. Micro-batch ``b`` of the
    epoch is the global chunk ``perm[b*B*W:(b+1)*B*W]`` and process ``r`` takes its
    ``r``-th slice of ``B``: a run on W processes with batch B sees exactly the global
    batches of a 1-process run with batch B*W. The last incomplete chunk is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.B, self.seed, self.rank, self.world, self.shuffle = n, batch_size, seed, rank, world, shuffle

    def __len__(self) -> int:
        return self.n // (self.B * self.world)

    def epoch(self, e: int, start: int = 0):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        G = self.B * self.world
        for b in range(start, len(self)):
            chunk = perm[b * G:(b + 1) * G]
            yield chunk[self.rank * self.B:(self.rank + 1) * self.B]
