"""Named classification tasks (SST-2, IMDB, AG News, TweetEval), their offline samples,
and any other classification dataset on the Hugging Face hub.

A named task knows its hub location, text and label columns, number of labels and
whether the hub copy has a validation split. It loads from ``data.data_dir`` when set
(the layout ``<dir>/<task>_dataset/<task>_{train,validation,test}.csv`` of seed 002,
which ``peftlab data prepare <task>`` writes), from the hub otherwise. ``<task>-sample``
loads the small synthetic copy shipped under ``peftlab/data/samples/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import hub
from ..errors import PeftlabError
from .classification import load_table, raw_classification_from_frames
from .raw import SAMPLES_DIR, RawTask, _split_files, register_dataset


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
    # TweetEval's hub copy has a validation split; local copies without one get it carved.
    "tweet_eval": TaskSpec("tweet_eval", "tweet_eval", "emotion", "text", "label", 4, ("anger", "joy", "optimism", "sadness"), True),
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


def _hub_load(path: str, config: Optional[str], hint: str):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise PeftlabError("Loading datasets from the hub needs the `datasets` package: pip install datasets") from None

    if not hub.reachable():  # fail at once rather than after the datasets library's retries
        raise PeftlabError(f"Could not load {path!r} from the Hugging Face hub: the hub cannot be reached (a cached copy loads with HF_DATASETS_OFFLINE=1). {hint}")
    try:
        return datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except Exception as e:  # network and format errors come in many types
        first = str(e).splitlines()[0] if str(e) else ""
        raise PeftlabError(f"Could not load {path!r}{f' ({config})' if config else ''} from the Hugging Face hub "
                           f"({type(e).__name__}: {first[:200]}). {hint}") from None


def load_task_from_hub(spec: TaskSpec, cfg) -> RawTask:
    ds = _hub_load(spec.hub_path, spec.hub_config,
                   f"Offline? Use --data.data_dir with local copies (<dir>/{spec.name}_dataset/{spec.name}_train.csv ...) "
                   f"or the shipped sample --data.dataset={spec.name}-sample.")
    frames = {k: v.to_pandas() for k, v in ds.items()}
    cfg = _with_columns(cfg, spec)
    label_col = cfg.data.label_column
    val = _labelled(frames.get("validation"), label_col) if spec.has_validation else None
    return raw_classification_from_frames(spec.name, frames["train"], val, cfg, source=f"hub {spec.hub_path}",
                                          num_labels=spec.num_labels, label_names=list(spec.label_names),
                                          test_df=_labelled(frames.get("test"), label_col))


_VAL_SPLITS = ("validation", "valid", "val", "dev")


def _labelled(df, label_col: str):
    """``df``, or None when every label is negative (GLUE hides its test labels as -1)."""
    if df is None or label_col not in df.columns:
        return df
    col = df[label_col]
    return None if col.dtype.kind in "iu" and (col < 0).all() else df


def load_hub_classification(name: str, cfg) -> RawTask:
    """Any classification dataset on the hub: ``name`` or ``name:config`` (e.g.
    ``tweet_eval:sentiment``, ``glue:mrpc``). Columns come from ``data.text_column`` /
    ``data.label_column`` (default: a usual text column and ``label``); the number of
    labels and their names come from the dataset's ``ClassLabel`` feature when it has one."""
    path, _, config = name.partition(":")
    ds = _hub_load(path, config or None, "Offline? Save the splits as CSV files and pass the folder or file as --data.dataset.")
    if "train" not in ds:
        raise PeftlabError(f"Hub dataset {name!r} has no train split (splits: {', '.join(ds)}).")
    label_col = cfg.data.label_column or "label"
    feature = ds["train"].features.get(label_col)
    names = list(getattr(feature, "names", []) or []) or None
    frames = {k: v.to_pandas() for k, v in ds.items()}
    val = _labelled(next((frames[k] for k in _VAL_SPLITS if k in frames), None), label_col)
    test = _labelled(frames.get("test"), label_col)
    return raw_classification_from_frames(name, frames["train"], val, cfg, source=f"hub {name}",
                                          num_labels=len(names) if names else None, label_names=names, test_df=test)


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


def _with_hint(loader, spec: TaskSpec):
    def load(cfg) -> RawTask:
        raw = loader(cfg)
        if spec.name == "tweet_eval" and not cfg.data.clean_text:
            raw.info["hint"] = "tweets hold HTML entities, links and @mentions; --data.clean_text=true cleans them (seed 002)"
        return raw

    return load


for _spec in TASKS.values():
    register_dataset(_spec.name)(_with_hint(_task_loader(_spec), _spec))
    register_dataset(f"{_spec.name}-sample")(_with_hint(_sample_loader(_spec), _spec))


def _needs_prepare(name: str):
    def load(cfg) -> RawTask:
        raise PeftlabError(
            f"{name!r} is a large corpus that is read from token bins: run `peftlab data prepare {name} --output-dir data/{name}` "
            f"once (streams and tokenizes it), then train with --data.dataset=data/{name}."
        )

    return load




@dataclass(frozen=True)
class HubCorpus:
    path: str
    config: Optional[str]
    text_column: str
    documents: Optional[int]  # for the progress bar
    val_fraction: float


# Language-modelling corpora on the hub, streamed (never downloaded whole into memory).
HUB_CORPORA = {
    # nanoGPT's data/openwebtext/prepare.py holds out 0.05% of the documents for validation.
    "openwebtext": HubCorpus("Skylion007/openwebtext", None, "text", 8_013_769, 0.0005),
}


def _register_corpora() -> None:
    for corpus in HUB_CORPORA:
        register_dataset(corpus)(_needs_prepare(corpus))


_register_corpora()
