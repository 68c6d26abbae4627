"""The training loop (``Trainer``) and its pieces: batching, schedules, metrics."""

from ..data.batches import EpochBatches
from .loop import Trainer, train

__all__ = ["Trainer", "train", "EpochBatches"]
