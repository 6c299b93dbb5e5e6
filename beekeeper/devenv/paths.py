"""Where the developer environment keeps its caches and runtime state."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Per-user cache for built binaries; survives `dev down` and new clones."""
    base = os.environ.get("BEEKEEPER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "beekeeper"
    )
    return Path(base)


def state_dir() -> Path:
    """Runtime state of the running dev environment (certs, etcd data, pids, logs)."""
    base = os.environ.get("BEEKEEPER_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "beekeeper", "dev"
    )
    return Path(base)
