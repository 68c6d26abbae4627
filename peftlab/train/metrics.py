"""Evaluation metrics (computed exactly, no sklearn needed)."""

from __future__ import annotations

import math


def accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(int(p == y) for p, y in zip(preds, labels)) / max(len(labels), 1)


def f1_score(preds: list[int], labels: list[int], num_labels: int) -> float:
    """Binary F1 of class 1 when there are two classes; macro-F1 over classes otherwise."""

    def f1_for(c: int) -> float:
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    if num_labels == 2:
        return f1_for(1)
    return sum(f1_for(c) for c in range(num_labels)) / num_labels


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
