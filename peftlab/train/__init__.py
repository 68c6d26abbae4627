"""The training loop (``Trainer``) and its pieces: batching, schedules, metrics."""

from .loop import EpochBatches, Trainer, train

__all__ = ["Trainer", "train", "EpochBatches"]
