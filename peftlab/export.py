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
from typing import Optional

from .build import build_base
from .checkpoints import list_checkpoints, verify
from .errors import PeftlabError
from .io import output_path_problem
from .models.hf import make_adapter_portable, set_label_names
from .models.quant import compute_dtype as quant_dtype
from .models.quant import describe as describe_quant
from .models.quant import dequantized_into
from .rundir import RunDir
from .runs import load_run
from .runs.load import damaged_fix, require_final

CHOOSE = "--which {name}"  # how `peftlab export` reads another checkpoint, in its messages


def load_base(run_dir, device: str = "cpu", dequantize: bool = False):
    """``(model, tokenizer)``: the base model of a run, built as its training built it (no
    adapter), in eval mode; ``peft.PeftModel.from_pretrained(model, RUN/adapter)`` reloads the
    exported adapter onto it. A quantized base (``model.quantization``) is the quantized model;
    with ``dequantize``, its dequantized weights in the unquantized architecture, in
    ``model.compute_dtype`` (what ``--merge`` folds the adapter into)."""

    run = RunDir(run_dir).require()
    cfg, meta = run.config(), run.meta() or {}
    task = meta.get("task") or cfg.model.task
    labels = meta.get("num_labels") or cfg.model.num_labels
    model, tokenizer, _ = build_base(cfg, task, labels)
    if dequantize and cfg.model.quantization != "none":
        plain, _, _ = build_base(cfg.replace({"model.quantization": "none"}), task, labels)
        model = dequantized_into(model, plain, quant_dtype(cfg))
    if task == "classification":
        set_label_names(model, meta.get("label_names"))
    return model.to(device).eval(), tokenizer


def merge_note(run_dir) -> Optional[str]:
    """What ``export --merge`` tells about the base it merged into (None: nothing to say)."""
    cfg = RunDir(run_dir).require().config()
    if cfg.model.quantization == "none":
        return None
    return (f"merged into the dequantized base ({describe_quant(cfg)}; the trained adapter's base, dequantized to "
            f"{str(quant_dtype(cfg)).replace('torch.', '')}), not the full-precision model: the merged weights are Q(W) + "
            "s B A, stored unquantized")


def export_run(run_dir: Path, output_dir: Path | None = None, merge: bool = False, which: str = "final") -> Path:
    """Write the adapter (or full model) of ``which``, or with ``merge`` the merged model; return the folder."""

    run = RunDir(run_dir).require()
    if which == "final":  # another checkpoint (latest, step-N ...) is exported from a run in any state
        require_final(run, CHOOSE, "export")
    out = Path(output_dir) if output_dir else run.path / ("merged" if merge else "export")
    if out.exists():
        raise PeftlabError(f"{out} already exists; choose another --output-dir or delete it.")
    problem = output_path_problem(str(out))  # before the model is rebuilt, not at the rename after it
    if problem:
        raise PeftlabError(f"--output-dir: {problem}" if output_dir else f"export cannot write into the run directory: {problem} "
                           "Give a writable --output-dir.")
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
    fix = damaged_fix(run, CHOOSE)
    if which == "final" and not merge:
        for written in (run.adapter_dir, run.model_dir):
            if written.is_dir():
                # the copy is of what training exported from the final checkpoint: that checkpoint must verify,
                # or the run directory is damaged and its export would be passed on as sound (a run whose
                # checkpoints were deleted to save space still exports what training wrote)
                step = (run.results() or {}).get("global_step")
                final = [p for s, _, p in list_checkpoints(run.checkpoints_dir) if s == step][-1:]
                if final:
                    verify(final[0], fix=fix)
                shutil.copytree(written, out)
                return

    loaded = load_run(run.path, which=which, fix=fix)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        written = loaded.method.export(loaded.model, Path(tmp), loaded.tokenizer)
        if not merge or not loaded.method.exports_adapter:
            if not written.is_dir():
                raise PeftlabError(f"{loaded.method.name} wrote no model folder to export ({written.name}); see {run.path}.")
            shutil.copytree(written, out)
            base = run.path / "base_model"
            make_adapter_portable(out, loaded.config, run.path, base if base.is_dir() else None)
            return
        merged, _ = load_base(run.path, dequantize=True)  # a quantized base: dequantized, not re-quantized after merging
        if (written / "adapter_config.json").is_file():
            from peft import PeftModel

            merged = PeftModel.from_pretrained(merged, str(written)).merge_and_unload()
        # else: nothing survived (e.g. every SoRA gate pruned); the merged model is the base itself
        if loaded.task == "classification":
            set_label_names(merged, (run.meta() or {}).get("label_names"))
        merged.save_pretrained(out, safe_serialization=True)
        loaded.tokenizer.save_pretrained(out)


