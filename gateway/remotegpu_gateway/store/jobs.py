"""Jobs as their owners see them: submit, read, cancel."""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from remotegpu_gateway.store.batcher import InsertBatcher
from remotegpu_gateway.store.database import Database, _key
from remotegpu_gateway.store.records import CancelOutcome, JobRecord
from remotegpu_gateway.store.schema import CANCELLED, PENDING, RUNNING, jobs


class JobStore(Database):
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
    ) -> JobRecord:
        now = self.clock()
        values = dict(
            id=job_id or str(uuid.uuid4()),
            owner_key_id=owner_key_id,
            model=model,
            status=PENDING,
            request=json.dumps(request, separators=(",", ":")),
            input_image_keys=json.dumps(input_image_keys),
            created_at=now,
            updated_at=now,
            attempt=0,
            cancel_requested=False,
        )
        self._batcher.insert(values)
        return JobRecord(
            id=values["id"],  # type: ignore[arg-type]
            owner_key_id=owner_key_id,
            model=model,
            status=PENDING,
            request=request,
            input_image_keys=input_image_keys,
            created_at=now,
            updated_at=now,
            started_at=None,
            completed_at=None,
            attempt=0,
            lease_token=None,
            lease_expires_at=None,
            worker_id=None,
            cancel_requested=False,
            error_message=None,
            result_key=None,
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
                    .values(status=CANCELLED, completed_at=now, updated_at=now, cancel_requested=True)
                )
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
