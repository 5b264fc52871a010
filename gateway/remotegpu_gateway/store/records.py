"""What the store hands out: job and key records, queue counts, cancel outcomes, errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class LeaseLostError(Exception):
    """A lease token that is no longer the job's current one (stale, cancelled, finished)."""


class NotFoundError(Exception):
    pass


@dataclass
class JobRecord:
    id: str
    owner_key_id: str
    model: str
    status: str
    request: dict[str, Any]
    input_image_keys: list[str]
    created_at: float
    updated_at: float
    started_at: float | None
    completed_at: float | None
    attempt: int
    lease_token: str | None
    lease_expires_at: float | None
    worker_id: str | None
    cancel_requested: bool
    error_message: str | None
    result_key: str | None
    progress_step: int | None = None
    progress_total: int | None = None
    priority: int = 0
    deadline_at: float | None = None
    webhook_url: str | None = None
    webhook_events: list[str] = field(default_factory=list)
    base_url: str | None = None
    revision: int = 0

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        m = row._mapping
        return cls(
            id=m["id"],
            owner_key_id=m["owner_key_id"],
            model=m["model"],
            status=m["status"],
            request=json.loads(m["request"]),
            input_image_keys=json.loads(m["input_image_keys"]),
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            started_at=m["started_at"],
            completed_at=m["completed_at"],
            attempt=m["attempt"],
            lease_token=m["lease_token"],
            lease_expires_at=m["lease_expires_at"],
            worker_id=m["worker_id"],
            cancel_requested=bool(m["cancel_requested"]),
            error_message=m["error_message"],
            result_key=m["result_key"],
            progress_step=m["progress_step"],
            progress_total=m["progress_total"],
            priority=m["priority"],
            deadline_at=m["deadline_at"],
            webhook_url=m["webhook_url"],
            webhook_events=m["webhook_events"].split(",") if m["webhook_events"] else [],
            base_url=m["base_url"],
            revision=m["revision"],
        )

    def wait_ms(self, now: float) -> int:
        """Time before active execution: until running started, or until now/the end."""
        end = self.started_at if self.started_at is not None else (self.completed_at or now)
        return max(0, int(round((end - self.created_at) * 1000)))

    def run_ms(self, now: float) -> int:
        if self.started_at is None:
            return 0
        end = self.completed_at if self.completed_at is not None else now
        return max(0, int(round((end - self.started_at) * 1000)))


@dataclass
class KeyRecord:
    id: str
    name: str
    scopes: list[str]
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    secrets: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": self.scopes,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "revoked_at": self.revoked_at,
            "secrets": self.secrets,
        }


@dataclass
class QueueCount:
    pending: int = 0
    # Of `pending`, the low-priority jobs: they run only on workers already up, so the
    # operator's demand leaves them out.
    pending_low: int = 0
    # Of the normal-priority pending jobs: their summed steps x megapixels, and how many
    # carry no such figure (jobs queued before migration 5).
    pending_step_megapixels: float = 0.0
    pending_unpriced: int = 0
    running: int = 0
    oldest_pending_created_at: float | None = None
    # When the longest-waiting pending job entered the queue (submitted or handed back).
    oldest_pending_queued_at: float | None = None
    # Workers (pod names) holding a lease: the operator keeps those pods on scale-down.
    busy_workers: list[str] = field(default_factory=list)


@dataclass
class CancelOutcome:
    job: JobRecord
    outcome: str  # "cancelled" | "requested" | "already_cancelled" | "finished"
