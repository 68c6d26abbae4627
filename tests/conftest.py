"""Shared test helpers: tiny runs on CPU through the real config and loop."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import peftlab.methods  # noqa: F401  (registers the methods that configs are validated against)
from peftlab.methods.base import Method, MethodContext

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"lm": ROOT / "configs/quickstart/lm_lora.yaml", "cls": ROOT / "configs/quickstart/cls_lora.yaml"}

torch.set_num_threads(1)  # the test machine has two cores; keep runs predictable
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TrainableTensors(Method):
    """A method with no run behind it (for the bounds pipeline): it compresses the model's trainable tensors."""

    def __init__(self):
        super().__init__(MethodContext(cfg=None, task="causal_lm", target_modules=[]))

    def compressible_state(self, model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a torchrun or accelerate launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUICKSTART = {"lm": ROOT / "configs/quickstart/lm_lora.yaml", "cls": ROOT / "configs/quickstart/cls_lora.yaml"}


def multiprocess_args(max_steps: int, save_steps: int) -> list[str]:
    """CLI settings of the small CPU runs the multi-process tests (torchrun over gloo) compare with one process:
    a loss logged every step, no dropout (the processes draw no common masks), 100 training examples."""
    return [f"--training.max_steps={max_steps}", "--training.log_steps=1", f"--training.save_steps={save_steps}",
            "--logging.progress_bar=false", "--model.dropout=0", "--lora.dropout=0", "--data.max_train_examples=100",
            "--data.max_val_examples=32", "--system.device=cpu"]


def step_losses(run: Path) -> list[float]:
    """The per-step training losses of a run directory (loss_log.csv)."""
    import csv

    with open(run / "loss_log.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def make_cfg(tmp_path: Path, kind: str = "lm", **overrides):
    """A quickstart config shrunk for tests, writing into ``tmp_path/run``.

    ``overrides`` use dotted keys with ``__`` for the dot: ``lora__r=4``.
    """
    from peftlab.tracking import quiet_libraries
    from peftlab.config import load_config

    quiet_libraries()
    base = {
        "output.dir": str(tmp_path / "run"),
        "training.epochs": 1,
        "training.max_steps": 12,
        "training.log_steps": 2,
        "training.save_steps": 0,
        "logging.progress_bar": False,
        "data.max_train_examples": 200 if kind == "cls" else 80,
        "data.max_val_examples": 64,
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(QUICK[kind], base)


@pytest.fixture
def run_train():
    """``run_train(cfg)`` trains and returns results_final as a dict."""
    from peftlab.train import train

    return lambda cfg: train(cfg, console=False)
