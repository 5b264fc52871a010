"""The job store, the per-model queue and API keys: one interface, SQLite or PostgreSQL.

`Store` is a thin facade over one class per concern, all on the same `Database`:
keys (`keys.py`), jobs (`jobs.py`, inserts through the group-commit thread in
`batcher.py`; idempotency keys, listing, queue position), webhook deliveries
(`webhooks.py`), the queue and its leases (`leases.py`), retention (`retention.py`),
read-only statistics (`stats.py`) and the workers' cold-start phases (`starts.py`). The schema and its migrations are in `schema.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from remotegpu_gateway.store.batcher import InsertBatcher
from remotegpu_gateway.store.database import normalise_url
from remotegpu_gateway.store.jobs import Idempotency, IdempotencyConflict, JobOptions, NewJob
from remotegpu_gateway.store.keys import KeyStore, hash_secret, split_token
from remotegpu_gateway.store.leases import LeaseStore
from remotegpu_gateway.store.records import (
    CancelOutcome,
    JobRecord,
    KeyRecord,
    LeaseLostError,
    NotFoundError,
    QueueCount,
)
from remotegpu_gateway.store.retention import RetentionStore
from remotegpu_gateway.store.schema import (
    CANCELLED,
    FAILED,
    KEY_PREFIX,
    MIGRATIONS,
    PENDING,
    PRIORITIES,
    RUNNING,
    SCOPES,
    SUCCEEDED,
    TERMINAL_STATES,
    api_key_secrets,
    api_keys,
    gateway_settings,
    idempotency_keys,
    jobs,
    metadata,
    schema_migrations,
    webhook_deliveries,
    worker_starts,
)
from remotegpu_gateway.store.starts import WorkerStart, WorkerStartStore, phase_durations
from remotegpu_gateway.store.stats import StatsStore
from remotegpu_gateway.store.webhooks import Delivery, record_from_snapshot

__all__ = [
    "CANCELLED",
    "FAILED",
    "KEY_PREFIX",
    "MIGRATIONS",
    "PENDING",
    "PRIORITIES",
    "RUNNING",
    "SCOPES",
    "SUCCEEDED",
    "TERMINAL_STATES",
    "CancelOutcome",
    "Delivery",
    "Idempotency",
    "IdempotencyConflict",
    "JobOptions",
    "NewJob",
    "JobRecord",
    "KeyRecord",
    "LeaseLostError",
    "NotFoundError",
    "QueueCount",
    "Store",
    "api_key_secrets",
    "api_keys",
    "gateway_settings",
    "hash_secret",
    "idempotency_keys",
    "jobs",
    "metadata",
    "normalise_url",
    "record_from_snapshot",
    "schema_migrations",
    "split_token",
    "webhook_deliveries",
    "WorkerStart",
    "phase_durations",
    "worker_starts",
]


class Store(KeyStore, LeaseStore, RetentionStore, StatsStore, WorkerStartStore):
    """Jobs, queue, leases and API keys on one database (SQLite or PostgreSQL)."""

    def __init__(self, url: str, *, max_attempts: int = 3, clock: Callable[[], float] = time.time):
        super().__init__(url, max_attempts=max_attempts, clock=clock)
        self._batcher = InsertBatcher(self)

    def close(self) -> None:
        self._batcher.close()
        super().close()
