"""Retention: finished jobs past the retention period are deleted in batches."""

from __future__ import annotations

import sqlalchemy as sa

from remotegpu_gateway.store.database import Database
from remotegpu_gateway.store.records import JobRecord
from remotegpu_gateway.store.schema import TERMINAL_STATES, jobs, webhook_deliveries, worker_starts


class RetentionStore(Database):
    def purge_finished(self, before: float, limit: int = 500) -> list[JobRecord]:
        """Deletes up to `limit` finished jobs that ended before `before`, oldest first, and
        returns them: their stored images are the caller's to delete."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(jobs)
                .where(jobs.c.status.in_(TERMINAL_STATES), jobs.c.completed_at < before)
                .order_by(jobs.c.completed_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            purged = [JobRecord.from_row(row) for row in rows]
            # cold starts as old as the jobs that go (their timelines go with them)
            conn.execute(sa.delete(worker_starts).where(worker_starts.c.created_at < before))
            if purged:
                ids = [j.id for j in purged]
                conn.execute(sa.delete(webhook_deliveries).where(webhook_deliveries.c.job_id.in_(ids)))
                conn.execute(sa.delete(jobs).where(jobs.c.id.in_(ids)))
        return purged
