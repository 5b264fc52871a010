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


# Addresses that mean "every interface": a URL cannot name them.
EVERY_ADDRESS = ("0.0.0.0", "::", "")


def http_url(host: str, port: int) -> str:
    """http://HOST:PORT, with an IPv6 literal in brackets (RFC 3986): http://[::1]:8000."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def loopback_for(host: str) -> str:
    """The address a process on this machine connects to for a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def public_url(flag: str | None, host: str, port: int) -> str | None:
    """--public-url, else $REMOTEGPU_PUBLIC_URL, else http://HOST:PORT; None when listening on
    every address: then result_url follows each request's own base URL."""
    url = flag or os.environ.get("REMOTEGPU_PUBLIC_URL")
    if url:
        return url.rstrip("/")
    if host in EVERY_ADDRESS:
        return None
    return http_url(host, port)
