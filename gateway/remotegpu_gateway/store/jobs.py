"""Jobs as their owners see them: submit (idempotent with a key), read, list, cancel."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from remotegpu_base.catalog import step_megapixels
from sqlalchemy.engine import Connection

from remotegpu_gateway.store.batcher import InsertBatcher
from remotegpu_gateway.store.database import _key, _text
from remotegpu_gateway.store.records import CancelOutcome, JobRecord
from remotegpu_gateway.store.schema import CANCELLED, PENDING, RUNNING, idempotency_keys, jobs
from remotegpu_gateway.store.webhooks import WebhookStore

# An Idempotency-Key is remembered this long (the IETF draft leaves it to the server).
IDEMPOTENCY_SECONDS = 24 * 3600


@dataclass
class JobOptions:
    """The optional extensions of a submit."""

    priority: int = 0
    deadline_seconds: float | None = None  # from the submit
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    base_url: str | None = None


@dataclass
class Idempotency:
    key: str
    request_hash: str


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used for a different request body."""


@dataclass
class NewJob:
    """One job to submit."""

    owner_key_id: str
    model: str
    request: dict[str, Any]
    input_image_keys: list[str]
    job_id: str | None = None
    options: JobOptions | None = None
    idempotency: Idempotency | None = None


def request_step_megapixels(request: dict[str, Any]) -> float | None:
    """A resolved request's work (None if it does not say)."""
    try:
        return step_megapixels(int(request["steps"]), int(request["width"]), int(request["height"]))
    except (KeyError, TypeError, ValueError):
        return None


def _job_row(j: NewJob, now: float) -> dict[str, Any]:
    """The jobs row of a new job (and its Idempotency-Key's row under `_idempotency`)."""
    o = j.options or JobOptions()
    values: dict[str, Any] = dict(
        id=j.job_id or str(uuid.uuid4()),
        owner_key_id=j.owner_key_id,
        model=j.model,
        status=PENDING,
        request=json.dumps(j.request, separators=(",", ":")),
        input_image_keys=json.dumps(j.input_image_keys),
        created_at=now,
        updated_at=now,
        attempt=0,
        cancel_requested=False,
        priority=o.priority,
        deadline_at=now + o.deadline_seconds if o.deadline_seconds else None,
        webhook_url=o.webhook_url,
        webhook_events=",".join(o.webhook_events) if o.webhook_events else None,
        base_url=o.base_url,
        revision=0,
        step_megapixels=request_step_megapixels(j.request),
    )
    if j.idempotency is not None:
        values["_idempotency"] = dict(
            owner_key_id=j.owner_key_id,
            key=_text(j.idempotency.key),
            request_hash=j.idempotency.request_hash,
            job_id=values["id"],
            created_at=now,
        )
    return values


def _job_record(j: NewJob, row: dict[str, Any]) -> JobRecord:
    o = j.options or JobOptions()
    return JobRecord(
        id=row["id"],
        owner_key_id=j.owner_key_id,
        model=j.model,
        status=PENDING,
        request=j.request,
        input_image_keys=j.input_image_keys,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=None,
        completed_at=None,
        attempt=0,
        lease_token=None,
        lease_expires_at=None,
        worker_id=None,
        cancel_requested=False,
        error_message=None,
        result_key=None,
        priority=o.priority,
        deadline_at=row["deadline_at"],
        webhook_url=o.webhook_url,
        webhook_events=o.webhook_events or [],
        base_url=o.base_url,
    )


class JobStore(WebhookStore):
    """Submitted jobs: inserts go through the group-commit thread."""

    _batcher: InsertBatcher

    def create_job(
        self,
        *,
        owner_key_id: str,
        model: str,
        request: dict[str, Any],
        input_image_keys: list[str],
        job_id: str | None = None,
        options: JobOptions | None = None,
        idempotency: Idempotency | None = None,
        admit: Callable[[Connection, int], None] | None = None,
    ) -> JobRecord:
        """Inserts a pending job. With `idempotency`, the key is recorded with it in the same
        transaction; a key already taken raises (see `idempotent_job`). With `admit` (per-key
        limits), it runs first in the insert's transaction and raises to refuse the job;
        without it, the insert joins a group commit."""
        return self.create_jobs(
            [
                NewJob(
                    owner_key_id=owner_key_id,
                    model=model,
                    request=request,
                    input_image_keys=input_image_keys,
                    job_id=job_id,
                    options=options,
                    idempotency=idempotency,
                )
            ],
            admit=admit,
        )[0]

    def create_jobs(
        self, new: list[NewJob], admit: Callable[[Connection, int], None] | None = None
    ) -> list[JobRecord]:
        """Queues jobs all or none; `admit(conn, count)` runs first in the same transaction,
        so limits hold across replicas."""
        now = self.clock()
        rows = [_job_row(j, now) for j in new]
        if admit is None and len(rows) == 1:
            self._batcher.insert(rows[0])
        else:
            with self._tx() as conn:
                if admit is not None:
                    admit(conn, len(rows))
                self._batcher.write_rows(conn, rows)
        return [_job_record(j, row) for j, row in zip(new, rows, strict=True)]

    def idempotent_job(self, owner_key_id: str, idempotency: Idempotency) -> JobRecord | None:
        """The job an Idempotency-Key already made (None: the key is new, or expired). Raises
        IdempotencyConflict if the key was used with another body."""
        since = self.clock() - IDEMPOTENCY_SECONDS
        mine = sa.and_(
            idempotency_keys.c.owner_key_id == owner_key_id, idempotency_keys.c.key == _text(idempotency.key)
        )
        with self._ro() as conn:
            row = conn.execute(
                sa.select(
                    idempotency_keys.c.request_hash, idempotency_keys.c.job_id, idempotency_keys.c.created_at
                ).where(mine)
            ).first()
        if row is None:
            return None
        if row.created_at < since:  # expired: the key is free again
            with self._tx() as conn:
                conn.execute(sa.delete(idempotency_keys).where(mine, idempotency_keys.c.created_at < since))
            return None
        if row.request_hash != idempotency.request_hash:
            raise IdempotencyConflict(idempotency.key)
        return self.get_job(row.job_id, owner_key_id)

    def purge_idempotency_keys(self) -> int:
        with self._tx() as conn:
            return int(
                conn.execute(
                    sa.delete(idempotency_keys).where(
                        idempotency_keys.c.created_at < self.clock() - IDEMPOTENCY_SECONDS
                    )
                ).rowcount
            )

    def get_job(self, job_id: str, owner_key_id: str | None = None) -> JobRecord | None:
        if not _key(job_id):
            return None
        q = sa.select(jobs).where(jobs.c.id == job_id)
        if owner_key_id is not None:
            q = q.where(jobs.c.owner_key_id == owner_key_id)
        with self._ro() as conn:
            row = conn.execute(q).first()
        return JobRecord.from_row(row) if row is not None else None

    def _locked_job(self, conn: Connection, job_id: str) -> JobRecord | None:
        if not _key(job_id):
            return None
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
        return JobRecord.from_row(row) if row is not None else None

    def cancel_job(self, job_id: str, owner_key_id: str) -> CancelOutcome | None:
        now = self.clock()
        with self._tx() as conn:
            job = self._locked_job(conn, job_id)
            if job is None or job.owner_key_id != owner_key_id:
                return None
            if job.status == PENDING:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(
                        status=CANCELLED,
                        completed_at=now,
                        updated_at=now,
                        cancel_requested=True,
                        revision=jobs.c.revision + 1,
                    )
                )
                self._queue_webhook(conn, job_id, now)
                outcome = "cancelled"
                self._notify(conn, job.model)
            elif job.status == RUNNING:
                if not job.cancel_requested:
                    conn.execute(
                        jobs.update().where(jobs.c.id == job_id).values(cancel_requested=True, updated_at=now)
                    )
                outcome = "requested"
            elif job.status == CANCELLED:
                outcome = "already_cancelled"
            else:
                outcome = "finished"
            job = self._locked_job(conn, job_id)
        assert job is not None
        return CancelOutcome(job=job, outcome=outcome)

    def list_jobs(
        self,
        owner_key_id: str,
        *,
        statuses: list[str] | None = None,
        model: str | None = None,
        models_in: list[str] | None = None,
        models_not_in: list[str] | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """The owner's jobs, newest first, from after the (created_at, id) cursor."""
        q = sa.select(jobs).where(jobs.c.owner_key_id == owner_key_id)
        if statuses:
            q = q.where(jobs.c.status.in_(statuses))
        if model is not None:
            q = q.where(jobs.c.model == _text(model))
        if models_in is not None:
            q = q.where(jobs.c.model.in_(models_in))
        if models_not_in:
            q = q.where(jobs.c.model.not_in(models_not_in))
        if after is not None:
            created, job_id = after
            q = q.where(
                sa.or_(jobs.c.created_at < created, sa.and_(jobs.c.created_at == created, jobs.c.id < job_id))
            )
        q = q.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        with self._ro() as conn:
            return [JobRecord.from_row(r) for r in conn.execute(q).all()]

    def queue_position(self, job: JobRecord) -> int:
        """Pending jobs of the model that a worker takes before this one (lease order)."""
        ahead = sa.or_(
            jobs.c.priority < job.priority,
            sa.and_(
                jobs.c.priority == job.priority,
                sa.or_(
                    jobs.c.created_at < job.created_at,
                    sa.and_(jobs.c.created_at == job.created_at, jobs.c.id < job.id),
                ),
            ),
        )
        with self._ro() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(jobs)
                    .where(jobs.c.model == job.model, jobs.c.status == PENDING, ahead)
                ).scalar()
                or 0
            )

    def running_jobs(self, model: str) -> list[JobRecord]:
        if not _key(model):
            return []
        with self._ro() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.model == model, jobs.c.status == RUNNING)).all()
        return [JobRecord.from_row(r) for r in rows]
