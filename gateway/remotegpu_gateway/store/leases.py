"""The per-model queue and its leases: workers take, renew, finish or hand back jobs.

Every change NOTIFYs the model (PostgreSQL), which wakes other replicas' long-polls.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from remotegpu_gateway.store.database import _key, _text
from remotegpu_gateway.store.jobs import JobStore
from remotegpu_gateway.store.records import JobRecord, LeaseLostError
from remotegpu_gateway.store.schema import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, jobs


class LeaseStore(JobStore):
    """The queue: leases are fenced by a token; a stale holder gets LeaseLostError."""

    def lease(self, model: str, worker_id: str, ttl: float) -> JobRecord | None:
        """Leases the oldest pending job of `model` to `worker_id`, normal priority first."""
        if not _key(model):
            return None
        worker_id = _text(worker_id)
        now = self.clock()
        token = secrets.token_urlsafe(24)
        with self._tx() as conn:
            job_id = conn.execute(
                sa.select(jobs.c.id)
                .where(jobs.c.model == model, jobs.c.status == PENDING)
                .order_by(jobs.c.priority, jobs.c.created_at, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar()
            if job_id is None:
                return None
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status == PENDING)
                .values(
                    status=RUNNING,
                    lease_token=token,
                    lease_expires_at=now + ttl,
                    worker_id=worker_id,
                    attempt=jobs.c.attempt + 1,
                    started_at=now,
                    updated_at=now,
                    progress_step=None,
                    progress_total=None,
                    revision=jobs.c.revision + 1,
                )
            )
            self._queue_webhook(conn, job_id, now)
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            self._notify(conn, model)
        return JobRecord.from_row(row)

    def _fenced(self, conn: Connection, job_id: str, token: str) -> JobRecord:
        job = self._locked_job(conn, job_id)
        if job is None or job.status != RUNNING or job.lease_token is None:
            raise LeaseLostError(f"job {job_id} is not leased")
        if not hmac.compare_digest(job.lease_token.encode(), token.encode()):
            raise LeaseLostError(f"job {job_id}: stale lease token")
        return job

    def heartbeat(
        self, job_id: str, token: str, ttl: float, progress: tuple[int, int] | None = None
    ) -> tuple[bool, float]:
        """Renews the lease; returns (cancel requested, new expiry)."""
        now = self.clock()
        with self._tx() as conn:
            job = self._fenced(conn, job_id, token)
            values: dict[str, Any] = {"lease_expires_at": now + ttl, "updated_at": now}
            if progress is not None and progress != (job.progress_step, job.progress_total):
                values["progress_step"], values["progress_total"] = progress
                values["revision"] = jobs.c.revision + 1
                self._notify_job(conn, job_id)  # wakes its event streams on every replica
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        return job.cancel_requested, now + ttl

    def complete(self, job_id: str, token: str, result_key: str) -> JobRecord:
        """Marks the job succeeded with its stored result (cancelled if cancel was requested)."""
        now = self.clock()
        with self._tx() as conn:
            job = self._fenced(conn, job_id, token)
            if job.cancel_requested:
                values: dict[str, Any] = {"status": CANCELLED}
            else:
                values = {"status": SUCCEEDED, "result_key": result_key}
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(completed_at=now, updated_at=now, revision=jobs.c.revision + 1, **values)
            )
            self._queue_webhook(conn, job_id, now)
            self._notify(conn, job.model)
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return JobRecord.from_row(row)

    def fail(self, job_id: str, token: str, error_message: str, retryable: bool = False) -> JobRecord:
        error_message = _text(error_message)
        now = self.clock()
        with self._tx() as conn:
            job = self._fenced(conn, job_id, token)
            self._end_attempt(conn, job, now, error_message, retryable=retryable)
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return JobRecord.from_row(row)

    def release(self, job_id: str, token: str) -> JobRecord:
        """Hands a job back to the queue without using up an attempt (a draining worker)."""
        now = self.clock()
        with self._tx() as conn:
            job = self._fenced(conn, job_id, token)
            if job.cancel_requested:
                self._end_attempt(conn, job, now, "cancelled", retryable=False)
            else:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(**self._requeue_values(now), attempt=max(0, job.attempt - 1))
                )
                self._notify(conn, job.model)
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return JobRecord.from_row(row)

    @staticmethod
    def _requeue_values(now: float) -> dict[str, Any]:
        return dict(
            status=PENDING,
            lease_token=None,
            lease_expires_at=None,
            worker_id=None,
            started_at=None,
            updated_at=now,
            progress_step=None,
            progress_total=None,
            revision=jobs.c.revision + 1,
        )

    def _end_attempt(
        self, conn: Connection, job: JobRecord, now: float, message: str, *, retryable: bool
    ) -> str:
        if job.cancel_requested:
            values: dict[str, Any] = {"status": CANCELLED, "completed_at": now, "updated_at": now}
        elif retryable and job.attempt < self.max_attempts:
            values = self._requeue_values(now)
        else:
            if retryable:
                message = f"{message} (gave up after {job.attempt} attempts)"
            values = {
                "status": FAILED,
                "completed_at": now,
                "updated_at": now,
                "error_message": message[:4000],
            }
        conn.execute(
            jobs.update().where(jobs.c.id == job.id).values(**{"revision": jobs.c.revision + 1, **values})
        )
        self._queue_webhook(conn, job.id, now)
        self._notify(conn, job.model)
        return str(values["status"])

    def fail_pending(
        self, model: str, error_message: str, queued_before: float | None = None
    ) -> list[JobRecord]:
        """Fails `model`'s jobs that wait to start (all, or those queued before `queued_before`).

        They never ran, so they keep started_at empty (run_ms 0). A pending job's
        updated_at is when it entered the queue: nothing else writes a pending row.
        """
        if not _key(model):
            return []
        where = [jobs.c.model == model, jobs.c.status == PENDING]
        if queued_before is not None:
            where.append(jobs.c.updated_at < queued_before)
        failed: list[JobRecord] = []
        while True:
            batch = self._fail_batch(model, where, _text(error_message)[:4000])
            failed += batch
            if len(batch) < 500:
                return failed

    def _fail_batch(self, model: str, where: list[Any], error_message: str) -> list[JobRecord]:
        now = self.clock()
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(jobs).where(*where).limit(500).with_for_update(skip_locked=True)
            ).all()
            batch = [JobRecord.from_row(row) for row in rows]
            if batch:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id.in_([j.id for j in batch]))
                    .values(
                        status=FAILED,
                        completed_at=now,
                        updated_at=now,
                        error_message=error_message,
                        revision=jobs.c.revision + 1,
                    )
                )
                for job in batch:
                    self._queue_webhook(conn, job.id, now)
                self._notify(conn, model)
        for job in batch:
            job.status, job.completed_at, job.updated_at, job.error_message = FAILED, now, now, error_message
        return batch

    def expire_leases(self, now: float | None = None) -> list[tuple[JobRecord, str]]:
        """Returns running jobs whose lease expired to the queue, or fails/cancels them."""
        now = self.clock() if now is None else now
        changed = []
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(jobs)
                .where(jobs.c.status == RUNNING, jobs.c.lease_expires_at < now)
                .limit(500)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                job = JobRecord.from_row(row)
                msg = (
                    f"the worker stopped renewing its lease (attempt {job.attempt} of {self.max_attempts}); "
                    "the job was not completed"
                )
                status = self._end_attempt(conn, job, now, msg, retryable=True)
                changed.append((job, status))
        return changed

    def expire_deadlines(self, now: float | None = None) -> list[JobRecord]:
        """Cancels the jobs (waiting or running) whose deadline passed, saying so in
        error_message. A running job loses its lease: its worker's next heartbeat stops it."""
        now = self.clock() if now is None else now
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(jobs)
                .where(jobs.c.status.in_([PENDING, RUNNING]), jobs.c.deadline_at < now)
                .limit(500)
                .with_for_update(skip_locked=True)
            ).all()
            expired = [JobRecord.from_row(row) for row in rows]
            for job in expired:
                assert job.deadline_at is not None
                where = "while it was running" if job.status == RUNNING else "before it started"
                message = (
                    f"cancelled: its deadline of {round(job.deadline_at - job.created_at):d}s passed {where}"
                )
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job.id)
                    .values(
                        status=CANCELLED,
                        completed_at=now,
                        updated_at=now,
                        cancel_requested=True,
                        lease_token=None,
                        lease_expires_at=None,
                        error_message=message,
                        revision=jobs.c.revision + 1,
                    )
                )
                self._queue_webhook(conn, job.id, now)
                job.status, job.completed_at, job.error_message = CANCELLED, now, message
            for model in sorted({j.model for j in expired}):
                self._notify(conn, model)
        return expired
