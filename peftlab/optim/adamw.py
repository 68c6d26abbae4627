"""torch's AdamW options: ``system.fused_optimizer`` (auto, on, off)."""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import PeftlabError


def adamw_options(setting: str, params: Iterable[torch.Tensor]) -> dict:
    """Keyword arguments for ``torch.optim.AdamW`` implementing ``system.fused_optimizer``."""
    if setting == "off":
        return {}
    params = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    ok_dtype = all(p.is_floating_point() for p in params)
    devices = {p.device.type for p in params}
    if setting == "auto":
        return {"fused": True} if params and ok_dtype and devices == {"cuda"} else {}
    if setting == "on":
        if not ok_dtype or not devices <= {"cuda", "cpu"}:
            raise PeftlabError(
                f"system.fused_optimizer=on but torch's fused AdamW does not support these parameters (devices {sorted(devices)}); "
                "use system.fused_optimizer=auto.")
        return {"fused": True} if params else {}
    raise PeftlabError(f"system.fused_optimizer must be auto, on or off, got {setting!r}.")
