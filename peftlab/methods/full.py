"""Full fine-tuning: AdamW on every weight (the baseline every PEFT method is compared to)."""

from __future__ import annotations

from .base import Method


class Full(Method):
    name = "full"
    typical_learning_rate = "1e-5 to 1e-4"  # every weight moves
    profile_reference = True  # `peftlab profile` compares every method with full AdamW
    display_name = "full fine-tuning"
    table_rank = 70
    compare_by_default = False  # the slowest arm (every weight and its AdamW state) doubles the demo's time on a laptop CPU
    #: learning rate `peftlab compare` uses (every weight moves; the adapters' step is far too large)
    compare_learning_rate = 2e-4

    @classmethod
    def budget_overrides(cls, cfg, lora_params: int, r: int):
        return {"training.learning_rate": cls.compare_learning_rate}, f"every weight trains (reference); lr {cls.compare_learning_rate:g}"

    @classmethod
    def profile_info(cls, cfg):
        return {"rank": None, "in_place": True, "refresh_interval": 1}
