"""Checkpoints: full training state, written atomically, loaded safely.

A checkpoint is a directory ``checkpoints/step-N`` or ``checkpoints/epoch-E`` holding::

    model_state.safetensors   trainable tensors (the method decides which)
    optimizer.pt              optimizer.state_dict()        (torch.load(weights_only=True))
    scheduler.pt              scheduler.state_dict()
    method_state.pt           the method's own state (gates, projectors, ...)
    rng-<rank>.pt             torch CPU/CUDA RNG states of every process
    trainer_state.json        step, epoch, position in the epoch, history, python/numpy RNG

It is written into a hidden ``.tmp-*`` directory and renamed into place only when
every file is on disk, so a kill during a save never leaves a directory that looks
complete; leftovers of interrupted saves are ignored and removed on the next start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import PeftlabError

STATE_FILE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file via a temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def python_rng_state() -> dict:
    v, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [v, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_python_rng_state(s: dict) -> None:
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def torch_rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_torch_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def tmp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def begin(final: Path) -> Path:
    """Create (fresh) the temporary directory a checkpoint is written into."""
    tmp = tmp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_rng(tmp: Path, rank: int) -> None:
    torch.save(torch_rng_state(), tmp / f"rng-{rank}.pt")


def _fault_point(tmp: Path) -> None:
    """Test hook: ``PEFTLAB_TEST_KILL_DURING_SAVE=step-6`` SIGKILLs this process halfway
    through writing checkpoint step-6, to prove that an interrupted save is never mistaken
    for a complete checkpoint. Does nothing unless the variable is set."""
    target = os.environ.get("PEFTLAB_TEST_KILL_DURING_SAVE")
    if target and tmp.name == f".tmp-{target}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_main(tmp: Path, *, model_state: dict, optimizer, scheduler, method_state: dict, trainer_state: dict,
               scaler=None) -> None:
    save_file({k: v.contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model_state.safetensors"))
    _fault_point(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(method_state, tmp / "method_state.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    trainer_state = dict(trainer_state, rng=python_rng_state())
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))


def commit(tmp: Path, final: Path) -> None:
    """Make the checkpoint visible: fsync, then rename (replacing an older one of the same name)."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / STATE_FILE).is_file() and (path / "model_state.safetensors").is_file()


def clean_partial(ckpt_root: Path) -> list[Path]:
    """Remove leftovers of interrupted saves; returns what was removed."""
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, int, Path]]:
    """Complete checkpoints as (global_step, is_epoch_end, path), oldest first."""
    out = []
    if not ckpt_root.is_dir():
        return out
    for p in ckpt_root.iterdir():
        if is_complete(p):
            try:
                st = json.loads((p / STATE_FILE).read_text())
            except (json.JSONDecodeError, OSError):
                continue
            out.append((int(st["global_step"]), int(bool(st.get("epoch_end"))), p))
    return sorted(out)


def resolve(resume_from: str, run_dir: Path) -> Optional[Path]:
    """``latest`` -> newest complete checkpoint of the run (None if there is none); else a path."""
    if resume_from == "latest":
        cks = list_checkpoints(run_dir / "checkpoints")
        return cks[-1][2] if cks else None
    p = Path(resume_from).expanduser()
    if not p.is_absolute() and not p.exists():
        p = run_dir / "checkpoints" / resume_from
    if not is_complete(p):
        have = [c[2].name for c in list_checkpoints(run_dir / "checkpoints")]
        raise PeftlabError(
            f"training.resume_from={resume_from!r} is not a complete checkpoint directory. "
            f"Use `latest` or one of: {', '.join(have) or '(none in ' + str(run_dir / 'checkpoints') + ')'}."
        )
    return p


def load(path: Path, rank: int = 0) -> dict[str, Any]:
    """Read every part of a checkpoint (tensors with ``weights_only=True``)."""
    out = {
        "model_state": load_file(str(path / "model_state.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "method_state": torch.load(path / "method_state.pt", weights_only=True, map_location="cpu"),
        "trainer_state": json.loads((path / STATE_FILE).read_text()),
    }
    rng = path / f"rng-{rank}.pt"
    out["rng"] = torch.load(rng, weights_only=True) if rng.is_file() else None
    sc = path / "scaler.pt"
    out["scaler"] = torch.load(sc, weights_only=True) if sc.is_file() else None
    return out


def prune(ckpt_root: Path, keep: Optional[int]) -> None:
    """Keep the newest ``keep`` step checkpoints; epoch checkpoints are always kept."""
    if keep is None:
        return
    steps = [c for c in list_checkpoints(ckpt_root) if c[2].name.startswith("step-")]
    for _, _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
