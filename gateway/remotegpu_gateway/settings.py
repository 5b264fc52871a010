"""Everything a gateway instance needs, in one object: `create_app(Settings(...))`."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotegpu_base import config
from remotegpu_base.catalog import ImageModel
from remotegpu_base.protocol import WORKER_TOKEN_ENV


@dataclass
class Settings:
    database_url: str
    data_dir: Path
    worker_token: str
    # Absolute base URL of the public API, used to build result_url.
    public_url: str | None = None  # None: the request's own base URL
    results_dir: Path | None = None  # default: DATA_DIR/results
    # Input and result images in this S3-compatible bucket instead of results_dir (several
    # gateway replicas share it); endpoint None: AWS S3. Credentials: boto3's usual chain.
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_prefix: str = ""
    # URL signing secret; None: generated once and kept in the database (shared by replicas).
    signing_secret: str | None = None
    # Catalog: exactly one of models (already loaded), models_file, or namespace (watch CRs).
    models: list[ImageModel] | None = None
    models_file: Path | None = None
    namespace: str | None = None
    kubeconfig: str | None = None
    lease_ttl_seconds: float = 30.0
    # Longest a job waits to start (queued or warming) before it fails with the reason;
    # an ImageModel's scaling.startTimeoutSeconds overrides it for that model.
    start_timeout_seconds: float = 15 * 60.0
    max_attempts: int = 3
    max_body_bytes: int = 64 * 1024 * 1024
    # Slow or stalled clients (see connections.py and bodies.py): a request's headers must
    # arrive within header_timeout; a body, once the gateway reads it, within body_timeout
    # (60 MB at 1 MB/s fits); an idle keep-alive connection is closed after keep_alive_timeout,
    # longer than common clients keep one idle (httpx: 5 s), so a client does not send on a
    # connection the gateway is closing at that moment (it would read a reset).
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 120.0
    keep_alive_timeout_seconds: int = 10
    # On SIGTERM, requests in flight get this long to finish before they are cancelled and the
    # gateway shuts down anyway (closing its database and webhook sender): well within the
    # pod's 30 s grace, after the chart's 5 s preStop pause. A request stalled mid-body would
    # otherwise hold the gateway up until its body timeout, or until the kubelet's SIGKILL.
    shutdown_timeout_seconds: int = 10
    # Request bodies read at once (each up to max_body_bytes in memory); others wait their turn.
    max_concurrent_bodies: int = 8
    # Browser origins allowed to call the API (CORS); empty: CORS is off.
    cors_origins: list[str] = field(default_factory=list)
    result_url_ttl_seconds: int = 7 * 24 * 3600
    stats_window_seconds: float = 3600.0
    reaper_interval_seconds: float = 1.0
    # Finished jobs are deleted with their input images and result this long after they
    # ended (0: kept forever). Default: the life of a signed result_url.
    retention_seconds: float = 7 * 24 * 3600
    purge_interval_seconds: float = 600.0
    worker_stale_seconds: float = 90.0
    # Long-polls also re-check the database this often, so that a job submitted to
    # another replica is noticed (PostgreSQL also gets LISTEN/NOTIFY wake-ups).
    poll_interval_seconds: float = 1.0
    # Threads that run submits (auth, validation, image decoding, the insert) at once.
    submit_threads: int = 8
    # Webhooks: destinations in these networks (CIDRs) are allowed although private,
    # loopback or link-local; each attempt's timeout; how long a delivery is retried.
    webhook_allowed_networks: list[str] = field(default_factory=list)
    webhook_timeout_seconds: float = 10.0
    webhook_retry_seconds: float = 24 * 3600.0
    # How long POST /v1/images/* waits for its images before answering 504 (the jobs go on).
    openai_wait_seconds: float = 600.0
    # Per-key limits' defaults (limits.py; a key's own values override them); 0: unlimited.
    key_requests_per_minute: int = 0
    key_max_concurrent_jobs: int = 0
    key_gpu_seconds_per_day: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)
    # Wall clock of job and lease times (tests move it forward instead of sleeping).
    clock: Callable[[], float] = time.time

    def resolved_results_dir(self) -> Path:
        return self.results_dir or (self.data_dir / "results")


RETENTION_ENV = "REMOTEGPU_RETENTION_HOURS"


def _flag_or_env(value: float | None, env: str, what: str) -> float | None:
    """A number from its flag, else from its environment variable, else None."""
    if value is not None:
        return value
    raw = os.environ.get(env)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"${env}={raw!r}: expected {what}") from None


def retention_seconds(hours: float | None = None) -> float:
    """--retention-hours, else $REMOTEGPU_RETENTION_HOURS, else 7 days; 0 keeps jobs forever."""
    hours = _flag_or_env(hours, RETENTION_ENV, "a number of hours (0 keeps jobs forever)")
    if hours is None:
        return Settings.retention_seconds
    if hours < 0:
        raise SystemExit("the retention must be 0 (keep forever) or a positive number of hours")
    return hours * 3600


KEY_LIMITS_ENV = {
    "key_requests_per_minute": ("REMOTEGPU_KEY_REQUESTS_PER_MINUTE", int),
    "key_max_concurrent_jobs": ("REMOTEGPU_KEY_MAX_CONCURRENT_JOBS", int),
    "key_gpu_seconds_per_day": ("REMOTEGPU_KEY_GPU_SECONDS_PER_DAY", float),
}


def key_limit_defaults() -> dict[str, Any]:
    """The per-key limits' defaults from their environment variables (0: unlimited)."""
    out: dict[str, Any] = {}
    for name, (env, kind) in KEY_LIMITS_ENV.items():
        value = _flag_or_env(None, env, "0 (unlimited) or a positive number")
        if value is not None:
            if value < 0:
                raise SystemExit(f"${env} must be 0 (unlimited) or a positive number")
            out[name] = kind(value)
    return out


OPENAI_WAIT_ENV = "REMOTEGPU_OPENAI_WAIT_SECONDS"


def openai_settings() -> dict[str, Any]:
    """$REMOTEGPU_OPENAI_WAIT_SECONDS: how long /v1/images/* waits for its images."""
    value = _flag_or_env(None, OPENAI_WAIT_ENV, "a number of seconds")
    if value is None:
        return {}
    if value <= 0:
        raise SystemExit(f"${OPENAI_WAIT_ENV} must be a positive number of seconds")
    return {"openai_wait_seconds": value}


HTTP_ENV = {
    "header_timeout_seconds": ("REMOTEGPU_HEADER_TIMEOUT_SECONDS", float),
    "body_timeout_seconds": ("REMOTEGPU_BODY_TIMEOUT_SECONDS", float),
    "keep_alive_timeout_seconds": ("REMOTEGPU_KEEP_ALIVE_TIMEOUT_SECONDS", int),
    "shutdown_timeout_seconds": ("REMOTEGPU_SHUTDOWN_TIMEOUT_SECONDS", int),
    "max_concurrent_bodies": ("REMOTEGPU_MAX_CONCURRENT_BODIES", int),
}
CORS_ENV = "REMOTEGPU_CORS_ORIGINS"


def http_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The HTTP limits from their environment variables and the CORS origins from
    --cors-origin (repeatable), else $REMOTEGPU_CORS_ORIGINS (comma-separated)."""
    out: dict[str, Any] = {}
    for name, (env, kind) in HTTP_ENV.items():
        value = _flag_or_env(None, env, "a positive number")
        if value is not None:
            if value <= 0:
                raise SystemExit(f"${env} must be positive")
            out[name] = kind(value)
    origins = getattr(args, "cors_origin", None) or os.environ.get(CORS_ENV, "").split(",")
    out["cors_origins"] = cors_origins(origins)
    return out


def served_settings(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """What `remotegpu gateway` and `remotegpu serve` both take from their flags and the
    environment: the database, the URLs, the retention, the start timeout, the HTTP limits,
    the per-key limits' defaults."""
    return dict(
        database_url=config.database_url(getattr(args, "database_url", None), data),
        data_dir=data,
        public_url=config.public_url(getattr(args, "public_url", None), args.host, args.port),
        retention_seconds=retention_seconds(getattr(args, "retention_hours", None)),
        start_timeout_seconds=start_timeout_seconds(getattr(args, "start_timeout_seconds", None)),
        webhook_allowed_networks=webhook_allowed_networks(getattr(args, "webhook_allowed_networks", None)),
        **http_settings(args),
        **key_limit_defaults(),
        **openai_settings(),
    )


def cors_origins(values: list[str]) -> list[str]:
    """Browser origins as the Origin header spells them: scheme://host[:port], no path."""
    out = []
    for value in (v.strip().rstrip("/") for v in values):
        if not value:
            continue
        if value != "*" and not re.fullmatch(r"https?://[^/\s]+", value):
            raise SystemExit(f"CORS origin {value!r}: expected scheme://host[:port] (or *)")
        out.append(value)
    return out


START_TIMEOUT_ENV = "REMOTEGPU_START_TIMEOUT_SECONDS"


def start_timeout_seconds(seconds: float | None = None) -> float:
    """--start-timeout-seconds, else $REMOTEGPU_START_TIMEOUT_SECONDS, else 900 (15 min)."""
    seconds = _flag_or_env(seconds, START_TIMEOUT_ENV, "a number of seconds")
    if seconds is None:
        return Settings.start_timeout_seconds
    if seconds <= 0:
        raise SystemExit("the start timeout must be a positive number of seconds")
    return seconds


def worker_token(data_dir: Path, announce: bool = True) -> str:
    """$REMOTEGPU_WORKER_TOKEN, else DATA_DIR/worker-token (generated once, mode 0600)."""
    token = os.environ.get(WORKER_TOKEN_ENV)
    if token:
        return token
    path = data_dir / "worker-token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    config.private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    if announce:
        print(f"note: generated a worker token in {path} (set ${WORKER_TOKEN_ENV} to choose one)", flush=True)
    return token


WEBHOOK_NETWORKS_ENV = "REMOTEGPU_WEBHOOK_ALLOWED_NETWORKS"


def webhook_allowed_networks(value: str | None = None) -> list[str]:
    """--webhook-allowed-networks, else $REMOTEGPU_WEBHOOK_ALLOWED_NETWORKS: comma-separated
    CIDRs that webhooks may call although private, loopback or link-local."""
    import ipaddress

    raw = value if value is not None else os.environ.get(WEBHOOK_NETWORKS_ENV, "")
    out = [v.strip() for v in raw.split(",") if v.strip()]
    for v in out:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise SystemExit(f"webhook allowed network {v!r}: expected a CIDR such as 10.0.0.0/8") from None
    return out
