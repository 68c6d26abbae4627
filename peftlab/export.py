"""``peftlab export RUN_DIR``: the trained result as an HF PEFT adapter or a merged model.

Training already writes ``RUN_DIR/adapter`` (adapter methods) or ``RUN_DIR/model``
(full-parameter methods); plain ``export`` copies that. ``--merge`` folds the adapter into
the base weights and writes a plain ``transformers`` model (``save_pretrained``, safetensors)
that loads without peft. ``--which best|step-N|...`` exports another checkpoint than the
final one. The run is rebuilt with :func:`peftlab.runs.load_run` and the base model with the
run's own builder (from the config and seed, exactly as training built it), so runs on
built-in tiny models and ``model.from_scratch`` runs, whose adapters name no loadable base,
export and merge like any other.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .errors import PeftlabError


def set_label_names(model, label_names) -> None:
    """Give a classification model the dataset's class names (``id2label``/``label2id``), so a
    saved or merged model says ``negative``/``positive`` instead of ``LABEL_0``/``LABEL_1``."""
    config = getattr(model, "config", None)
    if not label_names or config is None or not hasattr(config, "id2label"):
        return
    if len(label_names) != getattr(config, "num_labels", len(label_names)):
        return  # a head wider than the dataset's classes (model.num_labels): keep the generic names
    config.id2label = {i: str(n) for i, n in enumerate(label_names)}
    config.label2id = {str(n): i for i, n in enumerate(label_names)}


def portable_base_name(cfg, run_dir: Path, saved_base: Path | None = None) -> str:
    """What an exported adapter records as ``base_model_name_or_path``: the hub name for hub
    models, a path relative to the run directory for local folders and for the base saved
    inside the run (built-in tiny models), peftlab's name for offline packaged models (rebuilt
    by :func:`load_base`). Never an absolute path into this machine's environment."""
    import os

    from .models import OFFLINE_MODELS

    name = cfg.model.name
    if saved_base is not None:
        return os.path.relpath(saved_base, run_dir)
    if name in OFFLINE_MODELS:
        return name
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.relpath(os.path.abspath(os.path.expanduser(name)), os.path.abspath(run_dir))
    return name


def make_adapter_portable(adapter_dir: Path, cfg, run_dir: Path, saved_base: Path | None = None) -> None:
    """Rewrite ``adapter_config.json``'s ``base_model_name_or_path`` with :func:`portable_base_name`."""
    import json

    from .io import atomic_write_text

    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = portable_base_name(cfg, Path(run_dir), saved_base)
    if cfg.model.revision:
        data["revision"] = cfg.model.revision
    atomic_write_text(path, json.dumps(data, indent=2))


def load_base(run_dir, device: str = "cpu"):
    """``(model, tokenizer)``: the base model of a run, built as its training built it (no
    adapter), in eval mode; ``peft.PeftModel.from_pretrained(model, RUN/adapter)`` reloads the
    exported adapter onto it."""
    from .build import build_base
    from .runs import RunDir

    run = RunDir(run_dir).require()
    cfg, meta = run.config(), run.meta() or {}
    task = meta.get("task") or cfg.model.task
    model, tokenizer, _ = build_base(cfg, task, meta.get("num_labels") or cfg.model.num_labels)
    if task == "classification":
        set_label_names(model, meta.get("label_names"))
    return model.to(device).eval(), tokenizer


def export_run(run_dir: Path, output_dir: Path | None = None, merge: bool = False, which: str = "final") -> Path:
    """Write the adapter (or full model) of ``which``, or with ``merge`` the merged model; return the folder."""
    from .runs import RunDir

    run = RunDir(run_dir).require()
    if not run.is_finished():
        raise PeftlabError(f"{run.path} has not finished training (no completed results_final.json); resume it with "
                           "--training.resume_from=latest first.")
    out = Path(output_dir) if output_dir else run.path / ("merged" if merge else "export")
    if out.exists():
        raise PeftlabError(f"{out} already exists; choose another --output-dir or delete it.")
    # written under a hidden name and renamed into place when complete: a killed export leaves only
    # the hidden folder, which the next export removes, never a half-written `out` that blocks it
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _export_into(run, staging, merge, which)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _export_into(run, out: Path, merge: bool, which: str) -> None:
    if which == "final" and not merge:
        for written in (run.adapter_dir, run.model_dir):
            if written.is_dir():
                shutil.copytree(written, out)
                return
    from .runs import load_run

    loaded = load_run(run.path, which=which)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        written = loaded.method.export(loaded.model, Path(tmp), loaded.tokenizer)
        if not merge or not loaded.method.exports_adapter:
            if not written.is_dir():
                raise PeftlabError(f"{loaded.method.name} wrote no model folder to export ({written.name}); see {run.path}.")
            shutil.copytree(written, out)
            base = run.path / "base_model"
            make_adapter_portable(out, loaded.config, run.path, base if base.is_dir() else None)
            return
        merged, _ = load_base(run.path)
        if (written / "adapter_config.json").is_file():
            from peft import PeftModel

            merged = PeftModel.from_pretrained(merged, str(written)).merge_and_unload()
        # else: nothing survived (e.g. every SoRA gate pruned); the merged model is the base itself
        if loaded.task == "classification":
            set_label_names(merged, (run.meta() or {}).get("label_names"))
        merged.save_pretrained(out, safe_serialization=True)
        loaded.tokenizer.save_pretrained(out)


def cmd_export(args, extra) -> int:
    out = export_run(Path(args.run_dir), Path(args.output_dir) if args.output_dir else None, args.merge, args.which)
    print(f"exported to {out}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("export", help="write a run's adapter (HF PEFT format) or a merged model")
    p.add_argument("run_dir")
    p.add_argument("--output-dir", default=None, help="where to write (default RUN_DIR/export or RUN_DIR/merged)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights (plain transformers model)")
    p.add_argument("--which", default="final", help="checkpoint to export: final (default), best, latest, step-N or epoch-N")
    p.set_defaults(func=cmd_export, accepts_overrides=False)
