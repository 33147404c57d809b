"""Where vitport keeps what it downloads or builds (demo checkpoints, runtime exports): the one
cache root; each kind of thing has its folder in it ("demo", "runtimes")."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VITPORT_CACHE"


def cache_root(override: str | Path | None = None) -> Path:
    """The cache root: `override`, else $VITPORT_CACHE, else ~/.cache/vitport."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitport"
