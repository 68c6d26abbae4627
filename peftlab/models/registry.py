"""Registries of the models and tokenizers available offline (filled by :mod:`peftlab.models.offline`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# Real models available offline through the package registries: name -> resolver
# returning a local directory (filled in by peftlab.models.offline).
OFFLINE_MODELS: dict[str, Callable[[], Path]] = {}


# Tokenizers available offline by name (filled in by peftlab.models.offline).
OFFLINE_TOKENIZERS: dict[str, Callable] = {}
