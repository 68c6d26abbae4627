"""Checkpoints: full training state, written atomically, loaded safely.

A checkpoint is a directory ``checkpoints/step-N`` or ``checkpoints/epoch-E`` holding::

    model_state.safetensors   trainable tensors (the method decides which)
    optimizer.pt              optimizer.state_dict()        (torch.load(weights_only=True))
    scheduler.pt              scheduler.state_dict()
    method_state.pt           the method's own state (gates, projectors, ...)
    rng-<rank>.pt             torch CPU/CUDA RNG states of every process
    trainer_state.json        step, epoch, position in the epoch, history, python/numpy RNG
    manifest.json             size and SHA-256 of every other file, written at commit

A run whose trainable tensors are sharded (``system.sharding=fsdp`` with full fine-tuning) writes
``model_state.dcp/`` and ``optimizer.dcp/`` instead of ``model_state.safetensors`` and
``optimizer.pt``: checkpoints of ``torch.distributed.checkpoint`` (each process writes its own
shards, one ``.metadata`` describes the whole tensors), which :func:`read_model_state` reads back
whole in a single process (``load_run``, ``export``). The manifest covers their files too.

It is written into a hidden ``.tmp-*`` directory and renamed into place only when
every file is on disk, so a kill during a save never leaves a directory that looks
complete; leftovers of interrupted saves are ignored and removed on the next start.

The manifest is checked before a checkpoint is read, by resume and by every other reader
(``load_run``, ``bounds``, ``export``): a truncated, missing or edited file is an error naming
the checkpoint and the newest earlier one that still verifies, and ``resume_from=latest``
skips damaged checkpoints (with a warning) to the newest one that verifies. A checkpoint
written by a version that writes manifests and lacks one is damaged too; one written before
manifests existed (see :func:`predates_manifests`) is read with a warning that it is unverified.
``trainer_state.json`` records whether every saved tensor was finite, so pruning never deletes
the last finite checkpoint in favour of non-finite ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import PeftlabError
from .io import _NO_SPACE, _fsync_dir, _fsync_tree, disk_full_error, is_out_of_space, strict_json_dumps

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model_state.safetensors"
SHARDED_MODEL = "model_state.dcp"  # a torch.distributed.checkpoint directory (sharded runs)
SHARDED_OPTIMIZER = "optimizer.dcp"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"  # the configuration of the run that wrote the checkpoint

_log = logging.getLogger("peftlab")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an earlier one."""


class UnverifiedCheckpointWarning(CheckpointWarning):
    """A checkpoint written before manifests existed is read without verification."""


class CheckpointError(PeftlabError):
    """A checkpoint that is damaged (fails its manifest) or inconsistent (trainer state)."""


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
    try:
        torch.save(torch_rng_state(), tmp / f"rng-{rank}.pt")
    except RuntimeError as e:  # torch's writer raises RuntimeError, not OSError, on a full disk
        if not is_out_of_space(e, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(tmp.parent / tmp.name.removeprefix(".tmp-"), None, e) from None


def _fault_point(tmp: Path) -> None:
    """Test hook: ``PEFTLAB_TEST_KILL_DURING_SAVE=step-6`` SIGKILLs this process halfway
    through writing checkpoint step-6, to prove that an interrupted save is never mistaken
    for a complete checkpoint. Does nothing unless the variable is set."""
    target = os.environ.get("PEFTLAB_TEST_KILL_DURING_SAVE")
    if target and tmp.name == f".tmp-{target}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_sharded(tmp: Path, model_state: dict, optimizer_state: dict) -> None:
    """Every process: its shards of the trainable tensors and of the optimizer state, as two
    ``torch.distributed.checkpoint`` directories inside the temporary checkpoint ``tmp`` (a collective)."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(model_state, checkpoint_id=str(tmp / SHARDED_MODEL))
        dcp.save(optimizer_state, checkpoint_id=str(tmp / SHARDED_OPTIMIZER))
    except (OSError, RuntimeError) as e:
        if not is_out_of_space(e, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(tmp.parent / tmp.name.removeprefix(".tmp-"), None, e) from None


def load_sharded(path: Path, name: str, state: dict, *, single_process: bool = False) -> dict:
    """Fill ``state`` (tensors or DTensors of the right global shapes) in place from the
    ``torch.distributed.checkpoint`` directory ``path/name``; ``single_process`` reads it whole
    without a process group (whatever the number of processes that wrote it)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # single_process: torch says it assumes a single process, which is what was asked
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(Path(path) / name), no_dist=single_process)
    return state


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint (or best/) holds its model tensors as a sharded ``model_state.dcp/``."""
    return (Path(path) / SHARDED_MODEL / ".metadata").is_file()


def read_model_state(path: Path, template: Callable[[], dict], device: str = "cpu") -> dict:
    """The saved model tensors of a checkpoint, whole, in one process: ``model_state.safetensors``, or a
    sharded ``model_state.dcp/`` read into ``template()`` (tensors of the full shapes, e.g. the rebuilt
    model's trainable parameters)."""
    path = Path(path)
    if is_sharded(path):
        return load_sharded(path, SHARDED_MODEL, template(), single_process=True)
    return load_file(str(path / MODEL_FILE), device=device)


def write_main(tmp: Path, *, model_state: Optional[dict], optimizer, scheduler, method_state: dict, trainer_state: dict,
               scaler=None, finite: Optional[bool] = None) -> None:
    """The files process 0 writes. ``model_state=None`` and ``optimizer=None``: a sharded checkpoint, whose
    tensors every process wrote with :func:`write_sharded`; ``finite`` is then whether they were all finite."""
    try:
        _write_main(tmp, model_state=model_state, optimizer=optimizer, scheduler=scheduler, method_state=method_state,
                    trainer_state=trainer_state, scaler=scaler, finite=finite)
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors and torch raise their own types
        if not is_out_of_space(e, tmp):
            raise
        # estimate: the tensors, plus two Adam moments of each (what optimizer.pt holds), plus what exists
        tensors = sum(v.numel() * v.element_size() for v in (model_state or {}).values() if torch.is_tensor(v))
        shutil.rmtree(tmp, ignore_errors=True)  # the partial save: give its space back
        raise disk_full_error(tmp.parent / tmp.name.removeprefix(".tmp-"), 3 * tensors, e) from None


def _write_main(tmp: Path, *, model_state: Optional[dict], optimizer, scheduler, method_state: dict, trainer_state: dict,
                scaler=None, finite: Optional[bool] = None) -> None:
    if model_state is not None:
        save_file({k: v.contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
    _fault_point(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(method_state, tmp / "method_state.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    finite = all_finite(model_state) if finite is None else finite
    trainer_state = dict(trainer_state, rng=python_rng_state(), finite=bool(finite))
    (tmp / STATE_FILE).write_text(strict_json_dumps(trainer_state, indent=1))


def all_finite(tensors: dict) -> bool:
    """True when every floating-point tensor holds only finite values."""
    for v in tensors.values():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and SHA-256 of every file of ``directory`` (except the manifest itself)."""
    files = {}
    for f in sorted(directory.rglob("*")):  # a sharded checkpoint's .dcp/ directories too (a flat one has none)
        name = f.relative_to(directory).as_posix()
        if f.is_file() and name != MANIFEST_FILE:
            files[name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (directory / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def predates_manifests(path: Path) -> bool:
    """Whether a checkpoint directory was written before peftlab wrote manifests.

    The manifest came with the ``finite`` record of ``trainer_state.json`` (one commit, so every
    checkpoint with a manifest has the record), and the checkpoint's own ``config.json`` came
    later: a checkpoint with either was written by a version that writes a manifest at every
    commit. No new marker is written, so no checkpoint of a valid run changes, and the rule
    also covers the checkpoints written since manifests exist. (Whoever deletes the manifest
    and edits the record away as well gets the warning of an old checkpoint, not the error.)"""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return False
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):  # unreadable: not proof of an old checkpoint
        return False
    return not (isinstance(state, dict) and "finite" in state)


def manifest_problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint directory according to its manifest ([] when it verifies).

    A checkpoint without a manifest is damaged unless it was written before manifests existed
    (:func:`predates_manifests`); such an old one is accepted (:func:`verify` warns)."""
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        if not ((path / STATE_FILE).is_file() and ((path / MODEL_FILE).is_file() or is_sharded(path))):
            return ["it lacks trainer_state.json or model_state.safetensors"]
        if predates_manifests(path):
            return []
        return [f"its {MANIFEST_FILE} is missing, though it was written by a peftlab version that records one at every save "
                "(its trainer_state.json has the `finite` record or it holds config.json), so none of its files can be checked"]
    try:
        files = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, OSError, KeyError, TypeError) as e:
        return [f"its {MANIFEST_FILE} is unreadable ({e})"]
    problems = []
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        size = f.stat().st_size
        if size != rec.get("size"):
            problems.append(f"{name} has {size:,} bytes, {rec.get('size'):,} were written (truncated or replaced)")
        elif _sha256(f) != rec.get("sha256"):
            problems.append(f"{name} does not match the SHA-256 written at save time (edited or corrupted)")
    return problems


def verify(path: Path, fix: Optional[Callable[[Optional[Path]], str]] = None) -> None:
    """Raise :class:`CheckpointError` when ``path`` fails its manifest, naming the newest earlier
    checkpoint of the same run that verifies; warn when it predates manifests (unverified).

    ``fix(good)`` words what the reader can do instead (``good``: that earlier checkpoint, or None);
    the default is resume's advice (``--training.resume_from=...``)."""
    path = Path(path)
    problems = manifest_problems(path)
    if not problems:
        if not (path / MANIFEST_FILE).is_file():
            msg = (f"checkpoint {path} has no {MANIFEST_FILE}: it was written before peftlab recorded manifests, so its files "
                   "are read unverified (a truncated or edited file would go unnoticed)")
            if _log.handlers:
                _log.warning(msg)
            warnings.warn(msg, UnverifiedCheckpointWarning, stacklevel=2)
        return
    root = path.parent
    earlier = []
    if root.name == "checkpoints":
        me = _state_step(path)
        earlier = [p for s, _, p in list_checkpoints(root) if p != path and (me is None or s <= me)]
    good = next((p for p in reversed(earlier) if not manifest_problems(p)), None)
    if fix is not None:
        raise CheckpointError(f"Checkpoint {path} is damaged: {'; '.join(problems)}. {fix(good)}")
    hint = (f"The previous good checkpoint is {good}; resume from it with --training.resume_from={good.name}"
            if good is not None else "No earlier checkpoint of this run verifies")
    raise CheckpointError(
        f"Checkpoint {path} is damaged: {'; '.join(problems)}. {hint} "
        "(or use --training.resume_from=latest, which skips damaged checkpoints)."
    )


def _state_step(path: Path) -> Optional[int]:
    try:
        step = json.loads((path / STATE_FILE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def check_trainer_state(state: dict, path: Path, *, total_steps: Optional[int] = None,
                        steps_per_epoch: Optional[int] = None) -> None:
    """Sanity checks on a checkpoint's trainer state before a run continues from it: integer,
    non-negative counters, a step within the run's length and a position within the epoch."""
    problems = []
    for key in ("global_step", "epoch", "step_in_epoch"):
        v = state.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            problems.append(f"{key}={v!r} is not a non-negative integer")
    if not problems:
        gs, ep, se = state["global_step"], state["epoch"], state["step_in_epoch"]
        if total_steps is not None and gs > total_steps:
            problems.append(f"global_step={gs} is beyond this run's {total_steps} optimizer steps")
        if steps_per_epoch is not None:
            if se > steps_per_epoch:
                problems.append(f"step_in_epoch={se} is beyond the {steps_per_epoch} optimizer steps of an epoch")
            else:
                expected = ep * steps_per_epoch + se
                # a run cut by max_steps ends its last epoch early: there, global_step may fall short of it
                ok = expected - steps_per_epoch < gs <= expected if state.get("epoch_end") and se == 0 and ep > 0 else gs == expected
                if not ok:
                    problems.append(f"global_step={gs} does not match epoch {ep} x {steps_per_epoch} steps + step_in_epoch {se} "
                                    "(the data or batch settings differ from the run that saved it)")
    if problems:
        raise CheckpointError(
            f"Checkpoint {path} has an inconsistent trainer state: {'; '.join(problems)}. It was edited or belongs to a run "
            "with other data or batch settings; resume from another checkpoint or start a new run."
        )


def commit(tmp: Path, final: Path) -> None:
    """Make the checkpoint visible: manifest, fsync, then rename (replacing an older one of the same name)."""
    try:
        write_manifest(tmp)
        _fsync_tree(tmp)
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(final, None, e) from None
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
    return (path.is_dir() and not path.name.startswith(".") and (path / STATE_FILE).is_file()
            and ((path / MODEL_FILE).is_file() or is_sharded(path)))


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
            except (ValueError, OSError):  # truncated or not UTF-8: not a checkpoint one can use
                continue
            step = _state_step(p)
            if step is None or not isinstance(st, dict):
                warnings.warn(f"checkpoint {p} is damaged: its {STATE_FILE} records no global_step (a non-negative integer), "
                              "so which step it holds is unknown; it is left out (restore the file, or delete the checkpoint)",
                              CheckpointWarning, stacklevel=2)
                continue
            out.append((step, int(bool(st.get("epoch_end"))), p))
    return sorted(out)


def newest_valid(ckpt_root: Path, warn: bool = True) -> Optional[Path]:
    """The newest complete checkpoint that verifies against its manifest; damaged newer ones are
    skipped with a warning naming what is wrong."""
    for _, _, p in reversed(list_checkpoints(ckpt_root)):
        problems = manifest_problems(p)
        if not problems:
            return p
        if warn:
            msg = f"checkpoint {p} is damaged ({'; '.join(problems)}); falling back to an earlier one"
            if _log.handlers:
                _log.warning(msg)
            warnings.warn(msg, CheckpointWarning, stacklevel=2)
    return None


def resolve(resume_from: str, run_dir: Path) -> Optional[Path]:
    """``latest`` -> newest checkpoint of the run that verifies (None if there is none); else a path,
    which must verify."""
    if resume_from == "latest":
        root = run_dir / "checkpoints"
        found = newest_valid(root)
        if found is None and list_checkpoints(root):
            raise CheckpointError(
                f"Every checkpoint under {root} is damaged (see the warnings above); none can be resumed. "
                "Start a new run directory or pass --output.overwrite=true without resume_from."
            )
        return found
    p = Path(resume_from).expanduser()
    if not p.is_absolute() and not p.exists():
        p = run_dir / "checkpoints" / resume_from
    if not is_complete(p):
        have = [c[2].name for c in list_checkpoints(run_dir / "checkpoints")]
        raise PeftlabError(
            f"training.resume_from={resume_from!r} is not a complete checkpoint directory. "
            f"Use `latest` or one of: {', '.join(have) or '(none in ' + str(run_dir / 'checkpoints') + ')'}."
        )
    verify(p)
    return p


def load(path: Path, rank: int = 0) -> dict[str, Any]:
    """Read every part of a checkpoint (tensors with ``weights_only=True``) after verifying its manifest."""
    path = Path(path)
    verify(path)
    try:
        return _load(path, rank)
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as e:
        said = "" if "weights_only" in str(e) else f" ({type(e).__name__}: {e})"  # never relay torch's weights_only=False advice
        raise CheckpointError(f"Checkpoint {path} cannot be read{said}; it is damaged. "
                              "Resume from an earlier checkpoint or use --training.resume_from=latest.") from None


def safe_torch_load(path: Path, **kw: Any) -> Any:
    """``torch.load(path, weights_only=True)``; a file that holds more than tensors, numbers and plain
    containers is a :class:`CheckpointError`. torch's own message is not passed on: it advises
    retrying with ``weights_only=False``, which would run whatever code the file carries."""
    try:
        return torch.load(path, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it refers to {found.group(1)}" if found else "it is not a pickle of plain values"
        raise CheckpointError(
            f"{path} is not a plain tensor file ({what}); peftlab reads checkpoints only with torch's safe loader, which "
            "refused it, and never loads such a file in a way that could run code. The file is damaged or was replaced: "
            "restore it from the run that wrote it, or read another checkpoint."
        ) from None


def _load(path: Path, rank: int) -> dict[str, Any]:
    sharded = is_sharded(path)  # model and optimizer tensors: read by every process (the loop's sharding)
    out = {
        "model_state": None if sharded else load_file(str(path / MODEL_FILE)),
        "optimizer": None if sharded else safe_torch_load(path / "optimizer.pt", map_location="cpu"),
        "scheduler": safe_torch_load(path / "scheduler.pt"),
        "method_state": safe_torch_load(path / "method_state.pt", map_location="cpu"),
        "trainer_state": json.loads((path / STATE_FILE).read_text()),
    }
    out["finite"] = bool(out["trainer_state"].pop("finite", True))  # written by write_main, not trainer fields
    if not out["finite"] or not all_finite(out["model_state"] or {}):
        root = path.parent
        me = _state_step(path)
        good = next((p for s, _, p in reversed(list_checkpoints(root)) if p != path and (me is None or s <= me)
                     and is_finite_checkpoint(p) and not manifest_problems(p)), None) if root.name == "checkpoints" else None
        raise CheckpointError(
            f"Checkpoint {path} holds non-finite (NaN/inf) weights: the run had diverged when it was saved, and training "
            "would continue from garbage. "
            + (f"Resume from the last finite checkpoint, {good}, with other settings in a new run." if good is not None
               else "No finite checkpoint of this run is left; start a new run.")
        )
    rng = path / f"rng-{rank}.pt"
    out["rng"] = safe_torch_load(rng) if rng.is_file() else None
    sc = path / "scaler.pt"
    out["scaler"] = safe_torch_load(sc) if sc.is_file() else None
    return out


def is_finite_checkpoint(path: Path) -> bool:
    """Whether a checkpoint's saved tensors were all finite (recorded at save; older checkpoints
    without the record count as finite)."""
    try:
        return bool(json.loads((Path(path) / STATE_FILE).read_text()).get("finite", True))
    except (OSError, json.JSONDecodeError):
        return False


def prune(ckpt_root: Path, keep: Optional[int]) -> None:
    """Keep the newest ``keep`` step checkpoints; epoch checkpoints are always kept, and so is the
    newest checkpoint with finite weights when newer ones are not (a diverged run keeps a good one)."""
    if keep is None:
        return
    cks = list_checkpoints(ckpt_root)
    steps = [c for c in cks if c[2].name.startswith("step-")]
    doomed = [p for _, _, p in steps[:-keep]] if keep > 0 else [p for _, _, p in steps]
    last_finite = next((p for _, _, p in reversed(cks) if is_finite_checkpoint(p)), None)
    for p in doomed:
        if p == last_finite:
            continue
        shutil.rmtree(p, ignore_errors=True)
