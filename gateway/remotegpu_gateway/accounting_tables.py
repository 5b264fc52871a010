"""The tables of per-key limits and usage (limits.py, usage.py), created by the store's
migration 4. Their own module so that the store can create them without importing the
modules that use them."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

# A key's own limits; NULL: the gateway's default (settings, the chart), 0: unlimited.
api_key_limits = sa.Table(
    "api_key_limits",
    metadata,
    sa.Column("key_id", sa.String(40), primary_key=True),
    sa.Column("requests_per_minute", sa.Integer),
    sa.Column("max_concurrent_jobs", sa.Integer),
    sa.Column("gpu_seconds_per_day", sa.Double),
    sa.Column("updated_at", sa.Double, nullable=False),
)

# Requests counted per key per fixed minute (window_start: UNIX seconds, a multiple of 60).
rate_limit_windows = sa.Table(
    "rate_limit_windows",
    metadata,
    sa.Column("key_id", sa.String(40), primary_key=True),
    sa.Column("window_start", sa.BigInteger, primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)

# One row per finished job, written once (the job id is the key): usage for chargeback.
# Kept when the job itself is deleted by the retention sweep.
job_usage = sa.Table(
    "job_usage",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(40), nullable=False),
    sa.Column("model", sa.String(300), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("day", sa.String(10), nullable=False),  # UTC date the job finished, YYYY-MM-DD
    sa.Column("completed_at", sa.Double, nullable=False),
    sa.Column("gpu_seconds", sa.Double, nullable=False),  # the job's run time (run_ms / 1000)
    sa.Index("ix_job_usage_key_day", "key_id", "day"),
)


def create_tables(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)
