"""Ground floor: is the Hugging Face hub reachable, is a name hub-like, is a model in the local cache.

No peftlab imports."""

from __future__ import annotations

import os
import re
import socket


def looks_like_name(name: str) -> bool:
    """``owner/name``, ``name`` or ``name:config`` with no path-like or file-like parts."""
    if re.search(r"\.(csv|tsv|json|jsonl|parquet|txt|bin)$", name, re.I):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?", name) is not None


def reachable(timeout: float = 3.0) -> bool:
    """Whether to call ``datasets.load_dataset`` for a hub name: one quick connection to the
    hub, so that an offline machine fails at once instead of after ``datasets``' retries.
    True without a probe behind an HTTP(S) proxy, and in offline mode (``HF_DATASETS_OFFLINE``
    / ``HF_HUB_OFFLINE``), where ``datasets`` reads its cache."""
    if any(os.environ.get(k, "0").lower() not in ("0", "", "false", "no") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def in_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str) or isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
    except Exception:  # noqa: BLE001 (an invalid repo id, an old huggingface_hub: not cached)
        return False
