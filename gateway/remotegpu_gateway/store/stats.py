"""Read-only statistics: queue counts per model (operator, metrics) and recent run times."""

from __future__ import annotations

import sqlalchemy as sa

from remotegpu_gateway.store.database import Database, _key
from remotegpu_gateway.store.records import QueueCount
from remotegpu_gateway.store.schema import PENDING, PRIORITIES, RUNNING, SUCCEEDED, jobs


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


class StatsStore(Database):
    def queue_counts(self) -> dict[str, QueueCount]:
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(
                    jobs.c.model,
                    jobs.c.status,
                    jobs.c.priority,
                    sa.func.count(),
                    sa.func.min(jobs.c.created_at),
                    sa.func.min(jobs.c.updated_at),
                    sa.func.sum(jobs.c.step_megapixels),
                    sa.func.count() - sa.func.count(jobs.c.step_megapixels),
                )
                .where(jobs.c.status.in_([PENDING, RUNNING]))
                .group_by(jobs.c.model, jobs.c.status, jobs.c.priority)
            ).all()
            busy = conn.execute(
                sa.select(jobs.c.model, jobs.c.worker_id)
                .where(jobs.c.status == RUNNING, jobs.c.worker_id.is_not(None))
                .distinct()
            ).all()
        out: dict[str, QueueCount] = {}
        for model, status, priority, count, oldest, oldest_queued, work, unpriced in rows:
            q = out.setdefault(model, QueueCount())
            if status == PENDING:
                q.pending += int(count)
                if priority != PRIORITIES["normal"]:
                    q.pending_low += int(count)
                else:
                    q.pending_step_megapixels += float(work or 0.0)
                    q.pending_unpriced += int(unpriced)
                q.oldest_pending_created_at = _earliest(q.oldest_pending_created_at, oldest)
                q.oldest_pending_queued_at = _earliest(q.oldest_pending_queued_at, oldest_queued)
            else:
                q.running += int(count)
        for model, worker_id in busy:
            out.setdefault(model, QueueCount()).busy_workers.append(worker_id)
        return out

    def recent_finished(
        self, model: str, since: float, limit: int = 5000
    ) -> list[tuple[float, float | None, float]]:
        """(created_at, started_at, completed_at) of `model`'s latest jobs that succeeded since
        `since`: the limit is per model, so a busy model cannot crowd the others out."""
        if not _key(model):
            return []
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(jobs.c.created_at, jobs.c.started_at, jobs.c.completed_at)
                .where(jobs.c.model == model, jobs.c.status == SUCCEEDED, jobs.c.completed_at >= since)
                .order_by(jobs.c.completed_at.desc())
                .limit(limit)
            ).all()
        return [(r[0], r[1], r[2]) for r in rows]
