"""Webhook deliveries: queued in the transaction of the job change they report, then
claimed, sent and retried by any gateway replica's delivery loop (core's WebhookSender).

A claim moves `next_attempt_at` past the send timeout, so a delivery whose sender died
(a gateway restart) is taken again by the next loop: deliveries survive restarts.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from remotegpu_gateway.store.database import Database, _key
from remotegpu_gateway.store.records import JobRecord, NotFoundError
from remotegpu_gateway.store.schema import RUNNING, TERMINAL_STATES, api_keys, jobs, webhook_deliveries

# Which `webhook_events` name covers a job status, and the event type it sends.
EVENT_OF_STATUS = {RUNNING: ("running", "job.running")} | {
    s: ("completed", "job.completed") for s in TERMINAL_STATES
}
WEBHOOK_EVENTS = ("running", "completed")
DELIVERED, FAILED_DELIVERY, PENDING_DELIVERY = "delivered", "failed", "pending"


@dataclass
class Delivery:
    id: str
    job_id: str
    owner_key_id: str
    url: str
    event: str
    payload: dict[str, Any]  # the job row as it was when the event happened
    status: str
    attempts: int
    created_at: float
    next_attempt_at: float
    last_attempt_at: float | None
    delivered_at: float | None
    last_status_code: int | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Any) -> Delivery:
        m = dict(row._mapping)
        m["payload"] = json.loads(m["payload"])
        return cls(**m)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event,
            "url": self.url,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at if self.status == PENDING_DELIVERY else None,
            "last_attempt_at": self.last_attempt_at,
            "delivered_at": self.delivered_at,
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
        }


def snapshot(row: Any) -> dict[str, Any]:
    """A job row as JSON (the request stays out: a webhook reports status, not prompts)."""
    return {k: v for k, v in row._mapping.items() if k not in ("request", "lease_token")}


def record_from_snapshot(data: dict[str, Any]) -> JobRecord:
    return JobRecord.from_row(_Row({**data, "request": "{}", "lease_token": None}))


class _Row:
    def __init__(self, mapping: dict[str, Any]):
        self._mapping = mapping


class WebhookStore(Database):
    """The webhook secret of each API key and the queue of deliveries."""

    def set_webhook_secret(self, key_id: str) -> str:
        """Creates or replaces the key's signing secret (`whsec_` + base64 of 24 random bytes)."""
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        with self._tx() as conn:
            n = conn.execute(
                api_keys.update().where(api_keys.c.id == key_id).values(webhook_secret=secret)
            ).rowcount
        if n == 0:
            raise NotFoundError(key_id)
        return secret

    def webhook_secret(self, key_id: str) -> str | None:
        if not _key(key_id):
            return None
        with self._ro() as conn:
            return conn.execute(  # type: ignore[no-any-return]
                sa.select(api_keys.c.webhook_secret).where(api_keys.c.id == key_id)
            ).scalar()

    def _queue_webhook(self, conn: Connection, job_id: str, now: float) -> None:
        """In the transaction of a job change: queues the webhook its new status calls for."""
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None or not row.webhook_url:
            return
        name, event = EVENT_OF_STATUS.get(row.status, (None, None))
        wanted = row.webhook_events.split(",") if row.webhook_events else list(WEBHOOK_EVENTS)
        if name is None or name not in wanted:
            return
        conn.execute(
            webhook_deliveries.insert().values(
                id="msg_" + secrets.token_hex(12),
                job_id=job_id,
                owner_key_id=row.owner_key_id,
                url=row.webhook_url,
                event=event,
                payload=json.dumps(snapshot(row)),
                status=PENDING_DELIVERY,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
        )

    def claim_deliveries(self, now: float, claim_seconds: float, limit: int = 20) -> list[Delivery]:
        """Due deliveries, each claimed for `claim_seconds` (skipped by other replicas)."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(webhook_deliveries)
                .where(
                    webhook_deliveries.c.status == PENDING_DELIVERY,
                    webhook_deliveries.c.next_attempt_at <= now,
                )
                .order_by(webhook_deliveries.c.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if rows:
                conn.execute(
                    webhook_deliveries.update()
                    .where(webhook_deliveries.c.id.in_([r.id for r in rows]))
                    .values(next_attempt_at=now + claim_seconds)
                )
        return [Delivery.from_row(r) for r in rows]

    def delivery_attempted(
        self,
        delivery_id: str,
        now: float,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        retry_at: float | None,
    ) -> None:
        """Records one attempt: delivered, failed for good (retry_at None), or retried then."""
        values: dict[str, Any] = {
            "attempts": webhook_deliveries.c.attempts + 1,
            "last_attempt_at": now,
            "last_status_code": status_code,
            "last_error": error[:1000] if error else None,
        }
        if delivered:
            values |= {"status": DELIVERED, "delivered_at": now}
        elif retry_at is None:
            values["status"] = FAILED_DELIVERY
        else:
            values["next_attempt_at"] = retry_at
        with self._tx() as conn:
            conn.execute(
                webhook_deliveries.update().where(webhook_deliveries.c.id == delivery_id).values(**values)
            )

    def deliveries(self, job_id: str) -> list[Delivery]:
        if not _key(job_id):
            return []
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(webhook_deliveries)
                .where(webhook_deliveries.c.job_id == job_id)
                .order_by(webhook_deliveries.c.created_at, webhook_deliveries.c.id)
            ).all()
        return [Delivery.from_row(r) for r in rows]

    def next_delivery_at(self) -> float | None:
        with self._ro() as conn:
            return conn.execute(  # type: ignore[no-any-return]
                sa.select(sa.func.min(webhook_deliveries.c.next_attempt_at)).where(
                    webhook_deliveries.c.status == PENDING_DELIVERY
                )
            ).scalar()
