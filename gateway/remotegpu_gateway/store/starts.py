"""Each worker's cold-start phases: what the jobs that waited for that worker waited on."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from remotegpu_base.protocol import COLD_START_PHASES, ColdStartPhase

from remotegpu_gateway.store.database import Database, _text
from remotegpu_gateway.store.schema import worker_starts


@dataclass(frozen=True)
class WorkerStart:
    worker_id: str
    model: str
    phases: dict[ColdStartPhase, float]  # UNIX seconds, in COLD_START_PHASES order

    @property
    def ready_at(self) -> float | None:
        """When the worker could first take a job."""
        return self.phases.get(ColdStartPhase.WARMED, self.phases.get(ColdStartPhase.FIRST_LEASE))


def _ordered(phases: dict[ColdStartPhase, float]) -> dict[ColdStartPhase, float]:
    return {p: phases[p] for p in COLD_START_PHASES if p in phases}


def phase_durations(phases: dict[ColdStartPhase, float]) -> dict[ColdStartPhase, float]:
    """Each phase's seconds since the phase before it (the nearest earlier one reported)."""
    out: dict[ColdStartPhase, float] = {}
    previous: float | None = None
    for phase, at in _ordered(phases).items():
        if previous is not None:
            out[phase] = max(0.0, at - previous)
        previous = at
    return out


class WorkerStartStore(Database):
    def record_phases(
        self, worker_id: str, model: str, phases: dict[ColdStartPhase, float]
    ) -> dict[ColdStartPhase, float]:
        """Adds phases to a worker's start (the first report of a phase wins) and returns the
        durations that became known now, each once: what the per-phase histogram observes."""
        worker_id, model = _text(worker_id), _text(model)  # as the lease stores them
        for attempt in range(2):
            try:
                return self._merge(worker_id, model, phases)
            except sa.exc.IntegrityError:  # two reports of a new worker at once: merge again
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _merge(
        self, worker_id: str, model: str, phases: dict[ColdStartPhase, float]
    ) -> dict[ColdStartPhase, float]:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(worker_starts).where(worker_starts.c.worker_id == worker_id).with_for_update()
            ).first()
            known = {ColdStartPhase(k): v for k, v in json.loads(row.phases).items()} if row else {}
            observed = set(json.loads(row.observed)) if row else set()
            merged = _ordered({**phases, **known})
            new = {p: s for p, s in phase_durations(merged).items() if p.value not in observed}
            values = {
                "phases": json.dumps({p.value: t for p, t in merged.items()}),
                "observed": json.dumps(sorted(observed | {p.value for p in new})),
            }
            if row is None:
                conn.execute(
                    sa.insert(worker_starts).values(
                        worker_id=worker_id, model=model, created_at=self.clock(), **values
                    )
                )
            else:
                conn.execute(
                    sa.update(worker_starts).where(worker_starts.c.worker_id == worker_id).values(**values)
                )
        return new

    def worker_start(self, worker_id: str) -> WorkerStart | None:
        worker_id = _text(worker_id)
        with self._ro() as conn:
            row = conn.execute(sa.select(worker_starts).where(worker_starts.c.worker_id == worker_id)).first()
        if row is None:
            return None
        phases = {ColdStartPhase(k): float(v) for k, v in json.loads(row.phases).items()}
        return WorkerStart(row.worker_id, row.model, _ordered(phases))
