"""Where a post-training step of a run (bounds, profile) computes: the run's own device.

A sweep starts each run and its follow-ups with the run's GPU visible (``CUDA_VISIBLE_DEVICES``
of its slot), so "the run's device" is the GPU of its slot whenever the run's config lets it use
one. The choice is a pure function of three facts, so that it is testable on a CPU-only machine.
"""

from __future__ import annotations

from typing import Optional

from ..errors import PeftlabError


def followup_device(requested: str, run_device: Optional[str], cuda_available: bool, what: str = "--bounds.device") -> str:
    """``"cuda"`` or ``"cpu"`` for a step on a finished run.

    Args:
        requested: the step's own setting: ``cpu``, ``cuda`` or ``auto``.
        run_device: the run's ``system.device`` (``cpu``, ``cuda``, ``auto``; None when the config lacks it).
        cuda_available: whether a CUDA GPU is visible to this process.
        what: the setting's name, for the error message.

    ``auto`` follows the run: a run configured for the CPU is evaluated on the CPU (its numbers compare
    with its training's), any other run on the GPU when one is visible (a ``cuda`` run whose GPU is gone,
    e.g. its bound computed later on a laptop, falls back to the CPU: the result is the same up to
    floating-point rounding, only slower).
    """
    if requested == "cuda":
        if not cuda_available:
            raise PeftlabError(f"{what}=cuda but no CUDA GPU is visible to this process (CUDA_VISIBLE_DEVICES="
                               "empty or no driver); use cpu, or auto to follow the run's own device.")
        return "cuda"
    if requested == "cpu":
        return "cpu"
    if requested != "auto":
        raise PeftlabError(f"{what}={requested!r}: expected auto, cpu or cuda.")
    if run_device == "cpu":
        return "cpu"
    return "cuda" if cuda_available else "cpu"
