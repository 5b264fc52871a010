"""Where state lives: one place that reads the shared flags and environment."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("remotegpu")

DEFAULT_DATA_DIR = ".remotegpu"


def data_dir(flag: str | None = None) -> Path:
    """--data-dir, else REMOTEGPU_DATA_DIR, else ./.remotegpu (created on demand, mode 0700)."""
    path = Path(flag or os.environ.get("REMOTEGPU_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    private_dir(path)
    return path


def private_dir(path: Path) -> None:
    """Creates `path` readable by its owner only, and tightens an existing one: it holds the
    database (API key hashes, the URL-signing secret), the worker token and the images."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        try:
            path.chmod(0o700)
        except OSError as e:  # e.g. a volume owned by someone else: still usable
            log.warning("could not make %s private (mode 0700): %s", path, e)


def database_url(flag: str | None = None, data: Path | None = None) -> str:
    """--database-url, else REMOTEGPU_DATABASE_URL, else SQLite in the data dir."""
    url = flag or os.environ.get("REMOTEGPU_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{(data or data_dir()) / 'remotegpu.db'}"
