"""Full fine-tuning: AdamW on every weight (the baseline every PEFT method is compared to)."""

from __future__ import annotations

from .base import Method


class Full(Method):
    name = "full"
