"""What every dataset loader returns (:class:`RawTask`), the registry of named datasets and
the split-file finder; imported by the loaders, so it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

SAMPLES_DIR = Path(__file__).parent / "samples"


@dataclass
class RawTask:
    """Untokenized splits of one task.

    For ``causal_lm``: ``train``/``val`` are lists of documents (str), or, for token bins,
    a :class:`peftlab.data.bins.TokenBin`. For ``classification``: ``train``/``val`` are
    dicts with ``text`` (list[str]), optional ``text_pair`` and ``label`` (list[int]).
    """

    task: str
    name: str
    train: Any
    val: Any
    num_labels: Optional[int] = None
    label_names: Optional[list[str]] = None
    test: Any = None
    info: dict = field(default_factory=dict)


# name -> loader(cfg) -> RawTask. Named tasks, samples and offline datasets register here.
DATASETS: dict[str, Callable[[Any], RawTask]] = {}


def register_dataset(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def _split_files(path: Path) -> dict[str, Path]:
    """Find train/validation/test files in a folder by name."""
    found: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.suffix.lower() not in (".csv", ".json", ".jsonl", ".parquet", ".txt", ".tsv"):
            continue
        stem = f.stem.lower()
        for split, keys in (("train", ("train",)), ("validation", ("validation", "valid", "val", "dev")), ("test", ("test",))):
            if any(stem == k or stem.endswith("_" + k) or stem.endswith("-" + k) for k in keys):
                found.setdefault(split, f)
    return found
