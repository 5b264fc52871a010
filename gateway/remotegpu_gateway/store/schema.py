"""The schema: tables, job states, key scopes and the append-only migrations.

Times are stored as UNIX seconds (double precision) so that both backends compute
durations identically. Internal job states are `pending` (the public API shows it as
`queued` or `warming`, derived from the runtime registry at read time), `running`,
`succeeded`, `failed` and `cancelled`.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)

SCOPES = ("inference", "admin")
KEY_PREFIX = "rgpu_"

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)

gateway_settings = sa.Table(
    "gateway_settings",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("scopes", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("last_used_at", sa.Double),
    sa.Column("revoked_at", sa.Double),
    # Standard Webhooks signing secret (`whsec_...`) of this key's jobs' webhooks (migration 3).
    sa.Column("webhook_secret", sa.String(100)),
)

api_key_secrets = sa.Table(
    "api_key_secrets",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # public lookup id, part of the token
    sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False, index=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double),
    sa.Column("revoked_at", sa.Double),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner_key_id", sa.String(40), nullable=False, index=True),
    sa.Column("model", sa.String(300), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("request", sa.Text, nullable=False),  # GenerationRequest JSON, images by key
    sa.Column("input_image_keys", sa.Text, nullable=False),  # JSON list of storage keys
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double),
    sa.Column("completed_at", sa.Double),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("lease_token", sa.String(64)),
    sa.Column("lease_expires_at", sa.Double),
    sa.Column("worker_id", sa.String(300)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("error_message", sa.Text),
    sa.Column("result_key", sa.String(500)),
    sa.Column("progress_step", sa.Integer),
    sa.Column("progress_total", sa.Integer),
    # Extensions (migration 3): priority (NORMAL first), the deadline, the webhook, and a
    # revision that grows on every change a job's event stream shows.
    sa.Column("priority", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("deadline_at", sa.Double),
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_events", sa.String(40)),
    sa.Column("base_url", sa.String(500)),  # the submit's, for the result_url a webhook carries
    sa.Column("revision", sa.Integer, nullable=False, default=0, server_default="0"),
    # The job's work, steps x megapixels (migration 5): the operator prices the queue with it.
    sa.Column("step_megapixels", sa.Double),
    sa.Index("ix_jobs_queue", "model", "status", "created_at"),
    sa.Index("ix_jobs_lease_expiry", "status", "lease_expires_at"),
    sa.Index("ix_jobs_completed", "status", "completed_at"),
)

# Job priorities, in queue order.
PRIORITIES = {"normal": 0, "low": 1}

# Idempotency-Key of a submit -> its job, per API key, for IDEMPOTENCY_SECONDS.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("owner_key_id", sa.String(40), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False, index=True),
)

# Webhook deliveries: queued with the job change that causes them, sent and retried by the
# gateway's delivery loop (any replica), kept with their job.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # the webhook-id header (msg_...)
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("owner_key_id", sa.String(40), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event", sa.String(20), nullable=False),  # job.running | job.completed
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(12), nullable=False),  # pending | delivered | failed
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("last_attempt_at", sa.Double),
    sa.Column("delivered_at", sa.Double),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)


# Per-key limits and usage (limits.py, usage.py; migration 4).
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


# Each worker's cold start (protocol.ColdStartPhase -> UNIX seconds, JSON), reported by
# the operator, the worker and the gateway (migration 6): the timeline of the jobs that
# waited for it. `observed`: the phases already in the per-phase histogram.
worker_starts = sa.Table(
    "worker_starts",
    metadata,
    sa.Column("worker_id", sa.String(300), primary_key=True),
    sa.Column("model", sa.String(300), nullable=False),
    sa.Column("phases", sa.Text, nullable=False),
    sa.Column("observed", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False, index=True),
)


def _migration_1(conn: Connection) -> None:
    for table in (gateway_settings, api_keys, api_key_secrets, jobs):
        table.create(conn, checkfirst=True)


def _migration_2(conn: Connection) -> None:
    # The catalog's recent stats read each model's latest successes.
    conn.execute(
        sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_model_completed ON jobs (model, status, completed_at)")
    )


def _add_columns(conn: Connection, table: sa.Table, names: list[str]) -> None:
    """ALTER TABLE ADD COLUMN for the columns a table lacks (a database created after they
    joined the table's definition has them from migration 1)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    for name in names:
        if name in have:
            continue
        column = table.c[name]
        ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} {column.type.compile(conn.dialect)}"
        if column.server_default is not None:
            ddl += f" NOT NULL DEFAULT {column.server_default.arg}"  # type: ignore[attr-defined]
        conn.execute(sa.text(ddl))


def _migration_3(conn: Connection) -> None:
    _add_columns(
        conn, jobs, ["priority", "deadline_at", "webhook_url", "webhook_events", "base_url", "revision"]
    )
    _add_columns(conn, api_keys, ["webhook_secret"])
    for table in (idempotency_keys, webhook_deliveries):
        table.create(conn, checkfirst=True)
    conn.execute(
        sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_owner_created ON jobs (owner_key_id, created_at)")
    )
    conn.execute(
        sa.text(
            "CREATE INDEX IF NOT EXISTS ix_jobs_queue_priority ON jobs (model, status, priority, created_at)"
        )
    )
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_deadline ON jobs (status, deadline_at)"))


def _migration_4(conn: Connection) -> None:
    for table in (api_key_limits, rate_limit_windows, job_usage):
        table.create(conn, checkfirst=True)
    # Usage (usage.py) finds a key's unfinished jobs and the finished ones not yet metered.
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_owner_status ON jobs (owner_key_id, status)"))


def _migration_5(conn: Connection) -> None:
    _add_columns(conn, jobs, ["step_megapixels"])


def _migration_6(conn: Connection) -> None:
    worker_starts.create(conn, checkfirst=True)


# Append-only: (version, name, function). Never edit an applied migration.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "jobs, api keys, settings", _migration_1),
    (2, "index of each model's finished jobs", _migration_2),
    (3, "priority, deadlines, webhooks, idempotency keys, job revisions", _migration_3),
    (4, "per-key limits, rate windows and usage", _migration_4),
    (5, "each job's work in steps x megapixels", _migration_5),
    (6, "each worker's cold-start phases", _migration_6),
]
