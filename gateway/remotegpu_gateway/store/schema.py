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
    sa.Index("ix_jobs_queue", "model", "status", "created_at"),
    sa.Index("ix_jobs_lease_expiry", "status", "lease_expires_at"),
    sa.Index("ix_jobs_completed", "status", "completed_at"),
)


def _migration_1(conn: Connection) -> None:
    for table in (gateway_settings, api_keys, api_key_secrets, jobs):
        table.create(conn, checkfirst=True)


def _migration_2(conn: Connection) -> None:
    # The catalog's recent stats read each model's latest successes.
    conn.execute(
        sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_model_completed ON jobs (model, status, completed_at)")
    )


# Append-only: (version, name, function). Never edit an applied migration.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "jobs, api keys, settings", _migration_1),
    (2, "index of each model's finished jobs", _migration_2),
]
