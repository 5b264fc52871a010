"""Per-key limits, shared by every gateway replica through the database, and the IETF
RateLimit headers (draft-ietf-httpapi-ratelimit-headers) that describe them.

- requests per minute: submits (`POST /v1/inference/image`, `/v1/images/generations`,
  `/v1/images/edits`) counted per fixed UTC minute, checked right after the key and
  before the body is read; a refused request is not counted.
- concurrent jobs: the key's unfinished jobs (queued, warming, running) plus the new
  ones; checked in the transaction that inserts them, with the key's row locked, so two
  replicas cannot both admit the last slot.
- GPU-seconds per day: the run time of the key's jobs that finished this UTC day
  (usage.py); once used up, new jobs are refused until midnight UTC. Jobs already
  accepted run to the end, so a day can end a little over.

A key's own value overrides the gateway's default (`Settings.key_limits`, the chart's
`gateway.keyLimits`); 0 means unlimited.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.schemas import MAX_LIMIT
from remotegpu_gateway.store import PENDING, RUNNING, Store, api_keys, jobs
from remotegpu_gateway.store.schema import api_key_limits, rate_limit_windows
from remotegpu_gateway.usage import Usage, utc_day

LIMIT_FIELDS = ("requests_per_minute", "max_concurrent_jobs", "gpu_seconds_per_day")
WINDOW_SECONDS = 60
DAY_SECONDS = 86400
# A concurrency slot frees when one of the key's jobs ends: no time to promise, so a short retry.
CONCURRENCY_RETRY_SECONDS = 1


@dataclass(frozen=True)
class KeyLimits:
    """0: unlimited."""

    requests_per_minute: int = 0
    max_concurrent_jobs: int = 0
    gpu_seconds_per_day: float = 0.0

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Admission:
    """One submit's place within its key's limits: admits its jobs and gives the headers."""

    key_id: str
    limits: KeyLimits
    now: float
    requests_used: int = 0
    jobs_left: int | None = None
    gpu_seconds_used: float = 0.0
    _usage: Usage | None = field(default=None, repr=False)

    @property
    def limits_jobs(self) -> bool:
        return bool(self.limits.max_concurrent_jobs or self.limits.gpu_seconds_per_day)

    def admit(self, conn: Connection, count: int) -> None:
        """In the jobs' insert transaction: 429 if `count` more jobs exceed a limit."""
        # One admission per key at a time across replicas (SQLite already has one writer).
        conn.execute(sa.select(api_keys.c.id).where(api_keys.c.id == self.key_id).with_for_update())
        if self.limits.max_concurrent_jobs:
            active = conn.execute(
                sa.select(sa.func.count())
                .select_from(jobs)
                .where(jobs.c.owner_key_id == self.key_id, jobs.c.status.in_([PENDING, RUNNING]))
            ).scalar_one()
            left = self.limits.max_concurrent_jobs - int(active)
            if count > left:
                self.jobs_left = max(0, left)
                want = f"{count} more" if count > 1 else "another"
                raise self.refused(
                    "concurrency",
                    f"this API key has {active} unfinished job{'s' if active != 1 else ''} and may have at most "
                    f"{self.limits.max_concurrent_jobs} at once; {want} would exceed it. Retry when one finishes",
                    CONCURRENCY_RETRY_SECONDS,
                )
            self.jobs_left = left - count
        if self.limits.gpu_seconds_per_day and self._usage is not None:
            self.gpu_seconds_used = self._usage.gpu_seconds(conn, self.key_id, utc_day(self.now))
            self.check_gpu_day()

    def check_gpu_day(self) -> None:
        quota = self.limits.gpu_seconds_per_day
        if quota and self.gpu_seconds_used >= quota:
            raise self.refused(
                "gpu-seconds",
                f"this API key used {self.gpu_seconds_used:.0f} of its {quota:g} GPU-seconds today (UTC); "
                "new jobs are accepted again after midnight UTC",
                self.day_reset(),
            )

    def day_reset(self) -> int:
        return max(1, math.ceil(DAY_SECONDS - self.now % DAY_SECONDS))

    def window_reset(self) -> int:
        return max(1, math.ceil(WINDOW_SECONDS - self.now % WINDOW_SECONDS))

    def refused(self, limit: str, message: str, retry_after: int) -> ApiError:
        """429 with Retry-After and the RateLimit headers; `limit` names the policy hit."""
        if self._usage is not None:
            self._usage.metrics.rate_limited.labels(limit).inc()
        headers = {**self.headers(), "Retry-After": str(retry_after)}
        return ApiError(429, message, headers=headers, type="rate_limited")

    def headers(self) -> dict[str, str]:
        """RateLimit-Policy and RateLimit for each limit this key has (none: no headers)."""
        lim = self.limits
        policies, states = [], []
        if lim.requests_per_minute:
            policies.append(f'"requests";q={lim.requests_per_minute};w={WINDOW_SECONDS}')
            left = max(0, lim.requests_per_minute - self.requests_used)
            states.append(f'"requests";r={left};t={self.window_reset()}')
        if lim.max_concurrent_jobs:
            policies.append(f'"concurrency";q={lim.max_concurrent_jobs};qu="concurrent-requests"')
            if self.jobs_left is not None:
                states.append(f'"concurrency";r={self.jobs_left}')
        if lim.gpu_seconds_per_day:
            quota = lim.gpu_seconds_per_day
            policies.append(f'"gpu-seconds";q={quota:g};qu="gpu-seconds";w={DAY_SECONDS}')
            left_s = max(0, math.floor(quota - self.gpu_seconds_used))
            states.append(f'"gpu-seconds";r={left_s};t={self.day_reset()}')
        out = {}
        if policies:
            out["RateLimit-Policy"] = ", ".join(policies)
        if states:
            out["RateLimit"] = ", ".join(states)
        return out


class Limits:
    """Each key's limits (its own, else the defaults) and their enforcement."""

    def __init__(self, store: Store, usage: Usage, defaults: KeyLimits | None = None):
        self.store = store
        self.usage = usage
        self.defaults = defaults or KeyLimits()

    # ---- reading and setting ----------------------------------------------------------------

    def overrides(self, key_id: str, conn: Connection | None = None) -> dict[str, Any]:
        """The key's own values (None: the default)."""
        q = sa.select(*[api_key_limits.c[f] for f in LIMIT_FIELDS]).where(api_key_limits.c.key_id == key_id)
        if conn is None:
            with self.store.reading() as c:
                row = c.execute(q).first()
        else:
            row = conn.execute(q).first()
        return {f: (row._mapping[f] if row is not None else None) for f in LIMIT_FIELDS}

    def effective(self, key_id: str) -> KeyLimits:
        own = {f: v for f, v in self.overrides(key_id).items() if v is not None}
        return replace(self.defaults, **own)

    def view(self, key_id: str) -> dict[str, Any]:
        return {"key_id": key_id, **self.effective(key_id).public(), "overrides": self.overrides(key_id)}

    @staticmethod
    def validate(values: dict[str, Any]) -> dict[str, Any]:
        """The limit fields of `values`; ValueError if one is out of range."""
        values = {f: values[f] for f in LIMIT_FIELDS if f in values}
        bad = [f for f, v in values.items() if v is not None and not (0 <= v <= MAX_LIMIT)]
        if bad:
            raise ValueError(
                f"{bad[0]} must be 0 (unlimited), a positive number up to {MAX_LIMIT}, or null (the default)"
            )
        return values

    def set(self, key_id: str, values: dict[str, Any]) -> None:
        """Sets the key's own limits named in `values` (None: back to the default)."""
        values = self.validate(values)
        self.store.get_key(key_id)  # NotFoundError for an unknown key
        now = self.store.clock()
        with self.store.transaction() as conn:
            current = self.overrides(key_id, conn)
            merged = {**current, **values}
            conn.execute(sa.delete(api_key_limits).where(api_key_limits.c.key_id == key_id))
            conn.execute(api_key_limits.insert().values(key_id=key_id, updated_at=now, **merged))

    # ---- enforcement ------------------------------------------------------------------------

    def count_request(self, key_id: str) -> Admission:
        """Blocking, before the body is read: counts one request against the key's
        requests per minute and checks its GPU-seconds today; 429 if either is used up."""
        now = self.store.clock()
        adm = Admission(key_id, self.effective(key_id), now, _usage=self.usage)
        if adm.limits.gpu_seconds_per_day:
            with self.store.reading() as conn:
                adm.gpu_seconds_used = self.usage.gpu_seconds(conn, key_id, utc_day(now))
            adm.check_gpu_day()
        rpm = adm.limits.requests_per_minute
        if rpm:
            window = int(now // WINDOW_SECONDS) * WINDOW_SECONDS
            with self.store.transaction() as conn:
                count = self._count(conn, key_id, window, rpm)
                if count == 1:  # the first request of a window clears the key's old ones
                    conn.execute(
                        sa.delete(rate_limit_windows).where(
                            rate_limit_windows.c.key_id == key_id, rate_limit_windows.c.window_start < window
                        )
                    )
            if count is None:
                adm.requests_used = rpm
                raise adm.refused(
                    "requests",
                    f"this API key may send {rpm} request{'s' if rpm != 1 else ''} per minute; "
                    f"retry in {adm.window_reset()} s",
                    adm.window_reset(),
                )
            adm.requests_used = count
        return adm

    def _count(self, conn: Connection, key_id: str, window: int, limit: int) -> int | None:
        """This request's number in the window, or None when the window is full (not counted)."""
        insert = postgresql.insert if not self.store.is_sqlite else sqlite.insert
        t = rate_limit_windows
        stmt = (
            insert(t)
            .values(key_id=key_id, window_start=window, count=1)
            .on_conflict_do_update(
                index_elements=[t.c.key_id, t.c.window_start],
                set_={"count": t.c.count + 1},
                where=t.c.count < limit,
            )
            .returning(t.c.count)
        )
        value = conn.execute(stmt).scalar()
        return int(value) if value is not None else None
