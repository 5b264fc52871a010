"""Usage per key, for chargeback: jobs and GPU-seconds by model and by UTC day.

A job is metered once, when it finishes (succeeded, failed or cancelled), into the
`job_usage` ledger (one row per job, kept after the job itself is deleted by the
retention sweep). Its GPU-seconds are its run time, the job status's `run_ms` / 1000:
from the start of its last attempt to its end (a job that never started: 0). A replica
that stops between finishing a job and metering it leaves it to the next sweep
(`backfill`), and the retention sweep meters what it deletes, so no job is missed or
counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from remotegpu_gateway.metrics import Metrics
from remotegpu_gateway.store import TERMINAL_STATES, JobRecord, Store, jobs
from remotegpu_gateway.store.schema import job_usage

# The sweep meters jobs that finished this recently and are not in the ledger yet.
BACKFILL_SECONDS = 3600.0


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def gpu_seconds(job: JobRecord) -> float:
    """The job's run_ms as seconds."""
    assert job.completed_at is not None
    return job.run_ms(job.completed_at) / 1000.0


class Usage:
    def __init__(self, store: Store, metrics: Metrics):
        self.store = store
        self.metrics = metrics

    def record(self, finished: Iterable[JobRecord]) -> int:
        """Meters finished jobs (others are skipped); each job once, however often it is passed."""
        rows: list[dict[str, Any]] = [
            dict(
                job_id=j.id,
                key_id=j.owner_key_id,
                model=j.model,
                status=j.status,
                day=utc_day(j.completed_at),
                completed_at=j.completed_at,
                gpu_seconds=gpu_seconds(j),
            )
            for j in finished
            if j.status in TERMINAL_STATES and j.completed_at is not None
        ]
        if not rows:
            return 0
        insert = postgresql.insert if not self.store.is_sqlite else sqlite.insert
        stmt = (
            insert(job_usage)
            .on_conflict_do_nothing(index_elements=[job_usage.c.job_id])
            .returning(job_usage.c.job_id)
        )
        with self.store.transaction() as conn:
            # One statement per row: RETURNING with executemany is not portable across drivers.
            new = {job_id for row in rows for job_id in conn.execute(stmt, row).scalars()}
        for row in rows:
            if row["job_id"] in new:
                self.metrics.key_jobs.labels(row["key_id"], row["model"], row["status"]).inc()
                self.metrics.key_gpu_seconds.labels(row["key_id"], row["model"]).inc(row["gpu_seconds"])
        return len(new)

    def backfill(self, since: float | None = None) -> int:
        """Meters the jobs that finished since `since` (default: the last hour) but were not
        metered (their replica stopped in between)."""
        since = self.store.clock() - BACKFILL_SECONDS if since is None else since
        missing = (
            sa.select(jobs)
            .where(
                jobs.c.status.in_(TERMINAL_STATES),
                jobs.c.completed_at >= since,
                ~sa.exists().where(job_usage.c.job_id == jobs.c.id),
            )
            .limit(1000)
        )
        with self.store.reading() as conn:
            found = [JobRecord.from_row(r) for r in conn.execute(missing).all()]
        return self.record(found)

    @staticmethod
    def gpu_seconds(conn: Connection, key_id: str, day: str) -> float:
        return float(
            conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(job_usage.c.gpu_seconds), 0.0)).where(
                    job_usage.c.key_id == key_id, job_usage.c.day == day
                )
            ).scalar_one()
        )

    @staticmethod
    def empty(key_id: str) -> dict[str, Any]:
        """The report entry of a key without a finished job."""
        return {"key_id": key_id, "total": _zero(), "by_model": [], "by_day": []}

    def report(
        self, key_id: str | None, since: date | None = None, until: date | None = None
    ) -> dict[str, Any]:
        """Totals, by model and by day (and model), of one key (or every key: key_id None)
        over [since, until] (UTC days, both included; default: everything)."""
        where = []
        if key_id is not None:
            where.append(job_usage.c.key_id == key_id)
        if since is not None:
            where.append(job_usage.c.day >= since.isoformat())
        if until is not None:
            where.append(job_usage.c.day <= until.isoformat())
        u = job_usage.c
        q = (
            sa.select(u.key_id, u.day, u.model, u.status, sa.func.count(), sa.func.sum(u.gpu_seconds))
            .where(*where)
            .group_by(u.key_id, u.day, u.model, u.status)
            .order_by(u.key_id, u.day, u.model, u.status)
        )
        with self.store.reading() as conn:
            rows = conn.execute(q).all()
        by_key: dict[str, dict[str, Any]] = {}
        for key, day, model, status, count, seconds in rows:
            entry = by_key.setdefault(key, {"total": _zero(), "by_model": {}, "by_day": {}})
            for bucket in (
                entry["total"],
                entry["by_model"].setdefault(model, _zero()),
                entry["by_day"].setdefault((day, model), _zero()),
            ):
                bucket["jobs"] += int(count)
                bucket[status] += int(count)
                bucket["gpu_seconds"] += float(seconds or 0.0)
        out = {
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "keys": [
                {
                    "key_id": key,
                    "total": _rounded(e["total"]),
                    "by_model": [{"model": m, **_rounded(v)} for m, v in e["by_model"].items()],
                    "by_day": [{"day": d, "model": m, **_rounded(v)} for (d, m), v in e["by_day"].items()],
                }
                for key, e in by_key.items()
            ],
        }
        return out


def _zero() -> dict[str, Any]:
    return {"jobs": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "gpu_seconds": 0.0}


def _rounded(bucket: dict[str, Any]) -> dict[str, Any]:
    return {**bucket, "gpu_seconds": round(bucket["gpu_seconds"], 3)}
