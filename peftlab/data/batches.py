"""Which examples go into which batch: a seeded, resumable, per-process shuffle of the training set."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

GROUP_BATCHES = 50  # batches per megabatch of `training.group_by_length` (HF Trainer's LengthGroupedSampler uses 50 too)


def example_lengths(ds) -> Optional[list[int]]:
    """Token count of every example of ``ds``, or None where every example has the same length
    (causal-LM blocks) or the dataset does not say. Datasets of variable-length rows expose
    ``lengths()``."""
    f = getattr(ds, "lengths", None)
    return list(f()) if callable(f) else None


def group_by_length(perm: list[int], lengths: Sequence[int], G: int, g: torch.Generator) -> list[int]:
    """``perm`` reordered so that each chunk of ``G`` holds examples of similar length: every run of
    ``GROUP_BATCHES * G`` examples of ``perm`` is sorted by length (longest first, ties in ``perm``'s
    order) and cut into chunks of ``G``, then the full chunks of the whole epoch are shuffled with
    ``g``, so that batch length does not follow the learning-rate schedule. The incomplete
    remainder (which `EpochBatches` drops) stays at the end."""
    M = GROUP_BATCHES * G
    chunks, rest = [], []
    for s in range(0, len(perm), M):
        mb = sorted(perm[s:s + M], key=lambda i: -lengths[i])
        full = len(mb) // G * G
        chunks += [mb[j:j + G] for j in range(0, full, G)]
        rest += mb[full:]
    order = torch.randperm(len(chunks), generator=g).tolist()
    return [i for c in order for i in chunks[c]] + rest


class EpochBatches:
    """Deterministic, shardable batching.

    The order of epoch ``e`` is a permutation drawn from a generator seeded with
    ``(seed, e)``, independent of the number of processes. Micro-batch ``b`` of the
    epoch is the global chunk ``perm[b*B*W:(b+1)*B*W]`` and process ``r`` takes its
    ``r``-th slice of ``B``: a run on W processes with batch B sees exactly the global
    batches of a 1-process run with batch B*W. The last incomplete chunk is dropped.

    With ``lengths`` (``training.group_by_length``) each global chunk holds examples of similar
    length (`group_by_length`): less padding, the same examples per epoch, still seeded.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 lengths: Optional[Sequence[int]] = None):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"EpochBatches: {len(lengths)} lengths for {n} examples")
        self.n, self.B, self.seed, self.rank, self.world, self.shuffle = n, batch_size, seed, rank, world, shuffle
        self.lengths = lengths

    def __len__(self) -> int:
        return self.n // (self.B * self.world)

    def epoch(self, e: int, start: int = 0):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None:
                perm = group_by_length(perm, self.lengths, self.B * self.world, g)
        else:
            perm = list(range(self.n))
        G = self.B * self.world
        for b in range(start, len(self)):
            chunk = perm[b * G:(b + 1) * G]
            yield chunk[self.rank * self.B:(self.rank + 1) * self.B]


def epoch_padding(n: int, batch_size: int, seed: int, world: int, lengths: Sequence[int], grouped: bool) -> tuple[int, int]:
    """``(padding tokens, token positions)`` of epoch 0's micro-batches over all processes, each padded to its
    longest row as the collate does: what `training.group_by_length` saves, for the log."""
    pad = total = 0
    for r in range(world):
        for idx in EpochBatches(n, batch_size, seed, r, world, lengths=lengths if grouped else None).epoch(0):
            ls = [lengths[i] for i in idx]
            total += max(ls) * len(ls)
            pad += max(ls) * len(ls) - sum(ls)
    return pad, total
