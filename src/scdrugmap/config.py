"""Where scDrugMap keeps its files, read from the environment.

``SCDRUGMAP_HOME`` is the root of the cache (weights, embeddings); it defaults
to the user's cache directory. ``SCDRUGMAP_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``)
forbids every download.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SCDRUGMAP_HOME"
OFFLINE_ENV = "SCDRUGMAP_OFFLINE"


def home_dir() -> Path:
    """Return the cache root, creating nothing."""
    if value := os.environ.get(HOME_ENV):
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scdrugmap"


def weights_cache_dir() -> Path:
    """Return the folder that holds one sub-folder of weights per model."""
    return home_dir() / "weights"


def embeddings_cache_dir() -> Path:
    """Return the folder of cached cell embeddings."""
    return home_dir() / "embeddings"


def is_offline() -> bool:
    """Return True when downloads are forbidden by the environment."""
    return any(os.environ.get(name, "").lower() in {"1", "true", "yes"} for name in (OFFLINE_ENV, "HF_HUB_OFFLINE"))
