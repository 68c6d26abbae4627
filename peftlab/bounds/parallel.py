"""Data-parallel scoring: one process per GPU (or CPU process, gloo), same numbers as one process.

``torchrun --nproc_per_node=N -m peftlab bounds RUN_DIR ...`` starts N copies of the command.
Each loads the run and compresses it (rank 0's compressed state is then broadcast, so every
process scores exactly the same model even where quantization-aware training on a GPU is not
bit-reproducible), scores every N-th batch of the same fixed batch order
(:func:`~peftlab.bounds.scoring.score_batches` with a ``batch_filter``), and the per-row sums of
all batches are gathered and added in batch order (:func:`~peftlab.bounds.scoring.reduce_scores`):
the result is the one a single process computes, bit for bit, whatever N. Rank 0 logs and
writes ``bounds_metrics.json``; the others write nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def batch_filter(self):
        if self.size == 1:
            return None
        return lambda i: i % self.size == self.rank

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.size == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def launched_world() -> World:
    """The world torchrun describes in the environment (a world of 1 without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(device_name: str) -> tuple[World, Optional[str]]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPUs); returns the world and,
    on GPUs, this process's device (``cuda:LOCAL_RANK``)."""
    w = launched_world()
    if w.size == 1:
        return w, None
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(w.local_rank)
        return w, f"cuda:{w.local_rank}"
    return w, "cpu"


def stop(w: World) -> None:
    if w.size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


__all__ = ["World", "launched_world", "start", "stop"]
