"""``peftlab export RUN_DIR``: the trained result as an HF PEFT adapter or a merged model.

Training already writes ``RUN_DIR/adapter`` (adapter methods) or ``RUN_DIR/model``
(full fine-tuning). ``--merge`` folds the adapter into the base weights and writes a
plain ``transformers`` model (``save_pretrained``, safetensors) that loads without peft.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import PeftlabError


def export_run(run_dir: Path, output_dir: Path | None = None, merge: bool = False) -> Path:
    run_dir = Path(run_dir)
    meta_path = run_dir / "config.json"
    if not meta_path.is_file():
        raise PeftlabError(f"{run_dir} is not a peftlab run directory (no config.json).")
    meta = json.loads(meta_path.read_text())
    if not (run_dir / "results_final.json").is_file():
        raise PeftlabError(f"{run_dir} has not finished training (no results_final.json); resume it with --training.resume_from=latest first.")
    adapter, full = run_dir / "adapter", run_dir / "model"
    out = Path(output_dir) if output_dir else run_dir / ("merged" if merge else "export")
    if out.exists():
        raise PeftlabError(f"{out} already exists; choose another --output-dir or delete it.")
    if full.is_dir():
        shutil.copytree(full, out)
        return out
    if not adapter.is_dir():
        raise PeftlabError(f"{run_dir} has neither adapter/ nor model/ to export.")
    if not merge:
        shutil.copytree(adapter, out)
        return out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    info = meta.get("_meta", {})
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    base_path = acfg.get("base_model_name_or_path")
    try:
        if info.get("task") == "classification":
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=info.get("num_labels") or 2)
        else:
            base = AutoModelForCausalLM.from_pretrained(base_path)
    except (OSError, ValueError) as e:
        raise PeftlabError(f"Cannot load the base model {base_path!r} named in {adapter}/adapter_config.json ({type(e).__name__}); "
                           "edit base_model_name_or_path to a local copy.") from None
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    except (OSError, ValueError):
        pass
    return out


def cmd_export(args, extra) -> int:
    out = export_run(Path(args.run_dir), Path(args.output_dir) if args.output_dir else None, args.merge)
    print(f"exported to {out}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("export", help="write a run's adapter (HF PEFT format) or a merged model")
    p.add_argument("run_dir")
    p.add_argument("--output-dir", default=None, help="where to write (default RUN_DIR/export or RUN_DIR/merged)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights (plain transformers model)")
    p.set_defaults(func=cmd_export, accepts_overrides=False)
