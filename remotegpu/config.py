"""Where state lives: one place that reads the shared flags and environment."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = ".remotegpu"


def data_dir(flag: str | None = None) -> Path:
    """--data-dir, else REMOTEGPU_DATA_DIR, else ./.remotegpu (created on demand)."""
    path = Path(flag or os.environ.get("REMOTEGPU_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url(flag: str | None = None, data: Path | None = None) -> str:
    """--database-url, else REMOTEGPU_DATABASE_URL, else SQLite in the data dir."""
    url = flag or os.environ.get("REMOTEGPU_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{(data or data_dir()) / 'remotegpu.db'}"
