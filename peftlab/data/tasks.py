"""Named classification tasks (SST-2, IMDB, AG News, TweetEval) and their offline samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import PeftlabError
from . import SAMPLES_DIR, RawTask, _split_files, register_dataset
from .classification import load_table, raw_classification_from_frames


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_path: str
    hub_config: Optional[str]
    text_column: str
    label_column: str
    num_labels: int
    label_names: tuple[str, ...]
    has_validation: bool


TASKS = {
    "sst2": TaskSpec("sst2", "glue", "sst2", "sentence", "label", 2, ("negative", "positive"), True),
    "imdb": TaskSpec("imdb", "imdb", None, "text", "label", 2, ("negative", "positive"), False),
    "ag_news": TaskSpec("ag_news", "ag_news", None, "text", "label", 4, ("World", "Sports", "Business", "Sci/Tech"), False),
    "tweet_eval": TaskSpec("tweet_eval", "tweet_eval", "emotion", "text", "label", 4, ("anger", "joy", "optimism", "sadness"), False),
}


def load_task_from_dir(spec: TaskSpec, data_dir: Path, cfg, source: str) -> RawTask:
    """Load ``<data_dir>/<task>_dataset/<task>_{train,validation,test}.csv`` (or the files directly in data_dir)."""
    folder = data_dir / f"{spec.name}_dataset"
    if not folder.is_dir():
        folder = data_dir
    files = _split_files(folder) if folder.is_dir() else {}
    if "train" not in files:
        raise PeftlabError(
            f"No training file for task {spec.name!r} under {data_dir}: expected {data_dir}/{spec.name}_dataset/{spec.name}_train.csv "
            f"(write it with `peftlab data prepare {spec.name} --output-dir {data_dir}`)."
        )
    d = cfg.data
    if d.text_column is None or d.label_column is None:
        cfg = _with_columns(cfg, spec)
    val = load_table(files["validation"]) if "validation" in files else None
    test = load_table(files["test"]) if "test" in files else None
    return raw_classification_from_frames(spec.name, load_table(files["train"]), val, cfg, source=source,
                                          num_labels=spec.num_labels, label_names=list(spec.label_names), test_df=test)


def _with_columns(cfg, spec: TaskSpec):
    import copy

    c = copy.copy(cfg)
    c.data = copy.copy(cfg.data)
    c.data.text_column = cfg.data.text_column or spec.text_column
    c.data.label_column = cfg.data.label_column or spec.label_column
    return c


def load_task_from_hub(spec: TaskSpec, cfg) -> RawTask:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise PeftlabError("Loading tasks from the hub needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_config) if spec.hub_config else datasets.load_dataset(spec.hub_path)
    except Exception as e:  # network errors come in many types
        raise PeftlabError(
            f"Could not load task {spec.name!r} from the Hugging Face hub ({type(e).__name__}). Offline? Use --data.data_dir with local "
            f"copies (<dir>/{spec.name}_dataset/{spec.name}_train.csv ...) or the shipped sample --data.dataset={spec.name}-sample."
        ) from None
    frames = {k: v.to_pandas() for k, v in ds.items()}
    cfg = _with_columns(cfg, spec)
    return raw_classification_from_frames(spec.name, frames["train"], frames.get("validation") if spec.has_validation else None, cfg,
                                          source=f"hub {spec.hub_path}", num_labels=spec.num_labels, label_names=list(spec.label_names),
                                          test_df=frames.get("test"))


def _task_loader(spec: TaskSpec):
    def load(cfg) -> RawTask:
        if cfg.data.data_dir:
            return load_task_from_dir(spec, Path(cfg.data.data_dir).expanduser(), cfg, source=str(cfg.data.data_dir))
        return load_task_from_hub(spec, cfg)

    return load


def _sample_loader(spec: TaskSpec):
    def load(cfg) -> RawTask:
        raw = load_task_from_dir(spec, SAMPLES_DIR, cfg, source=f"shipped synthetic sample of {spec.name} (not the real dataset)")
        raw.name = f"{spec.name}-sample"
        return raw

    return load


for _spec in TASKS.values():
    register_dataset(_spec.name)(_task_loader(_spec))
    if (SAMPLES_DIR / f"{_spec.name}_dataset").is_dir():
        register_dataset(f"{_spec.name}-sample")(_sample_loader(_spec))
