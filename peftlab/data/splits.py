"""Validation carving, subsampling and k-shot selection, all seeded by ``data.split_seed``."""

from __future__ import annotations

import random
from collections import defaultdict

from ..errors import PeftlabError
from .clean import clean_texts


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (keep, held_out): ``fraction`` of every class held out (at least one per class
    with two or more examples), chosen by a seeded shuffle; both lists sorted."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    keep, held = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.extend(idx[:n_held])
        keep.extend(idx[n_held:])
    return sorted(keep), sorted(held)


def k_shot(labels: list[int], k: int, seed: int) -> list[int]:
    """Exactly ``k`` indices per class (error if a class has fewer), seeded, sorted."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    short = {y: len(v) for y, v in by_class.items() if len(v) < k}
    if short:
        raise PeftlabError(f"data.train_samples={k} asks for {k} examples per class but some classes have fewer: {short}. Lower data.train_samples.")
    rng = random.Random(seed)
    out = []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        out.extend(idx[:k])
    return sorted(out)


def class_counts(labels: list[int], num_labels: int | None = None) -> list[int]:
    """Examples per class, ``[count of 0, count of 1, ...]``."""
    k = max(num_labels or 0, (max(labels) + 1) if labels else 0)
    out = [0] * k
    for y in labels:
        out[y] += 1
    return out


def _take(split: dict, idx: list[int]) -> dict:
    return {k: [v[i] for i in idx] for k, v in split.items()}


def _subsample(n: int, m: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted(rng.sample(range(n), m))


def apply_cleaning(raw) -> None:
    """TweetEval-style cleaning (:mod:`peftlab.data.clean`) of every text field, in place."""

    if raw.task == "classification":
        for split in (raw.train, raw.val, raw.test):
            if split is None:
                continue
            for key in ("text", "text_pair"):
                if key in split:
                    split[key] = clean_texts(split[key])
    else:
        if not isinstance(raw.train, list):
            raise PeftlabError(
                "data.clean_text cannot clean prepared token bins (the text is already tokenized); clean the corpus before "
                "`peftlab data prepare`, or set --data.clean_text=false."
            )
        raw.train = clean_texts(raw.train)
        if raw.val is not None:
            raw.val = clean_texts(raw.val)


def finalize_splits(raw, cfg):
    """Clean (if asked), carve a missing validation split, subsample and pick k-shot sets.

    The order matters and is fixed: validation is carved from the full training set
    before ``max_train_examples`` and ``train_samples`` shrink what remains, so the
    validation set of a k-shot run is the same as that of a full run with the same
    ``split_seed``.
    """
    d = cfg.data
    info = raw.info
    if d.clean_text:
        apply_cleaning(raw)
        info["clean_text"] = "TweetEval-style cleaning applied (HTML entities and tags, URLs -> [URL], @mentions -> [USER], whitespace)"
    if raw.task == "classification":
        if raw.val is None:
            keep, held = stratified_split(raw.train["label"], d.val_fraction, d.split_seed)
            raw.val = _take(raw.train, held)
            raw.train = _take(raw.train, keep)
            info["validation"] = (f"no validation split; carved {len(held)} of {len(keep) + len(held)} training examples "
                                  f"({d.val_fraction * 100:g}% of every class, stratified, data.split_seed={d.split_seed})")
        if d.max_train_examples and len(raw.train["label"]) > d.max_train_examples:
            raw.train = _take(raw.train, _subsample(len(raw.train["label"]), d.max_train_examples, d.split_seed))
        if d.train_samples:
            raw.train = _take(raw.train, k_shot(raw.train["label"], d.train_samples, d.split_seed))
            info["k_shot"] = f"{d.train_samples} examples per class ({len(raw.train['label'])} in all, data.split_seed={d.split_seed})"
        if d.max_val_examples and len(raw.val["label"]) > d.max_val_examples:
            raw.val = _take(raw.val, _subsample(len(raw.val["label"]), d.max_val_examples, d.split_seed))
        test = getattr(raw, "test", None)
        if d.max_test_examples and isinstance(test, dict) and len(test.get("label", [])) > d.max_test_examples:
            raw.test = _take(test, _subsample(len(test["label"]), d.max_test_examples, d.split_seed))
        info["train_size"], info["val_size"] = len(raw.train["label"]), len(raw.val["label"])
        info["train_class_counts"] = class_counts(raw.train["label"], raw.num_labels)
    elif d.train_samples:
        raise PeftlabError("data.train_samples (k-shot per class) applies to classification; for language modelling use data.max_train_examples.")
    elif isinstance(raw.train, list):
        if raw.val is None:
            if len(raw.train) < 2:
                raise PeftlabError(f"{raw.name} has a single document and no validation split; add a validation file or more documents.")
            keep, held = stratified_split([0] * len(raw.train), d.val_fraction, d.split_seed)
            raw.val = [raw.train[i] for i in held]
            raw.train = [raw.train[i] for i in keep]
            info["validation"] = f"carved {len(held)} documents ({d.val_fraction * 100:g}%, seed {d.split_seed}) from train"
        if d.max_train_examples and len(raw.train) > d.max_train_examples:
            raw.train = [raw.train[i] for i in _subsample(len(raw.train), d.max_train_examples, d.split_seed)]
        info["train_documents"], info["val_documents"] = len(raw.train), len(raw.val)
    return raw
