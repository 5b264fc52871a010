"""The job store, the per-model queue and API keys: one interface, SQLite or PostgreSQL.

Both backends run the same SQLAlchemy Core statements. SQLite (the embedded default)
serialises writers: one process-wide lock plus `BEGIN IMMEDIATE`; PostgreSQL (the
cluster) leases with `SELECT ... FOR UPDATE SKIP LOCKED`, so many gateway replicas can
share one database. Times are stored as UNIX seconds (double precision) so that both
backends compute durations identically.

Internal job states are `pending` (the public API shows it as `queued` or `warming`,
derived from the runtime registry at read time), `running`, `succeeded`, `failed` and
`cancelled`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from remotegpu_gateway import accounting_tables

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


def _migration_3(conn: Connection) -> None:
    accounting_tables.create_tables(conn)
    # Usage (usage.py) finds a key's unfinished jobs and the finished ones not yet metered.
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_owner_status ON jobs (owner_key_id, status)"))


# Append-only: (version, name, function). Never edit an applied migration.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "jobs, api keys, settings", _migration_1),
    (2, "index of each model's finished jobs", _migration_2),
    (3, "per-key limits, rate windows and usage", _migration_3),
]


class LeaseLostError(Exception):
    """A lease token that is no longer the job's current one (stale, cancelled, finished)."""


class NotFoundError(Exception):
    pass


@dataclass
class JobRecord:
    id: str
    owner_key_id: str
    model: str
    status: str
    request: dict[str, Any]
    input_image_keys: list[str]
    created_at: float
    updated_at: float
    started_at: float | None
    completed_at: float | None
    attempt: int
    lease_token: str | None
    lease_expires_at: float | None
    worker_id: str | None
    cancel_requested: bool
    error_message: str | None
    result_key: str | None
    progress_step: int | None = None
    progress_total: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        m = row._mapping
        return cls(
            id=m["id"],
            owner_key_id=m["owner_key_id"],
            model=m["model"],
            status=m["status"],
            request=json.loads(m["request"]),
            input_image_keys=json.loads(m["input_image_keys"]),
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            started_at=m["started_at"],
            completed_at=m["completed_at"],
            attempt=m["attempt"],
            lease_token=m["lease_token"],
            lease_expires_at=m["lease_expires_at"],
            worker_id=m["worker_id"],
            cancel_requested=bool(m["cancel_requested"]),
            error_message=m["error_message"],
            result_key=m["result_key"],
            progress_step=m["progress_step"],
            progress_total=m["progress_total"],
        )

    def wait_ms(self, now: float) -> int:
        """Time before active execution: until running started, or until now/the end."""
        end = self.started_at if self.started_at is not None else (self.completed_at or now)
        return max(0, int(round((end - self.created_at) * 1000)))

    def run_ms(self, now: float) -> int:
        if self.started_at is None:
            return 0
        end = self.completed_at if self.completed_at is not None else now
        return max(0, int(round((end - self.started_at) * 1000)))


@dataclass
class KeyRecord:
    id: str
    name: str
    scopes: list[str]
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    secrets: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": self.scopes,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "revoked_at": self.revoked_at,
            "secrets": self.secrets,
        }


@dataclass
class QueueCount:
    pending: int = 0
    running: int = 0
    oldest_pending_created_at: float | None = None
    # When the longest-waiting pending job entered the queue (submitted or handed back).
    oldest_pending_queued_at: float | None = None
    # Workers (pod names) holding a lease: the operator keeps those pods on scale-down.
    busy_workers: list[str] = field(default_factory=list)


@dataclass
class CancelOutcome:
    job: JobRecord
    outcome: str  # "cancelled" | "requested" | "already_cancelled" | "finished"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """`rgpu_<lookup id>.<secret>` -> (lookup id, secret)."""
    if not token.startswith(KEY_PREFIX):
        return None
    sid, dot, secret = token[len(KEY_PREFIX) :].partition(".")
    if not dot or not sid or not secret or len(sid) > 40 or not all(c in "0123456789abcdef" for c in sid):
        return None
    return sid, secret


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; keep both backends identical by replacing it."""
    return value.replace("\x00", "\ufffd")


def _key(value: str) -> bool:
    """Whether an identifier from a request can exist at all (NUL never does)."""
    return "\x00" not in value


def normalise_url(url: str) -> str:
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _private_sqlite_files(url: str) -> None:
    """The database holds the URL-signing secret and key hashes: mode 0600. Created here
    before SQLite opens it (SQLite gives its -wal and -shm files the database's mode); an
    existing one is tightened."""
    database = sa.engine.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)
        except FileNotFoundError:
            pass


_DUMMY_HASH = hash_secret("not a key")

# Hot-path statements, built once (SQLAlchemy then reuses their compiled form).
_AUTH_QUERY = (
    sa.select(
        api_key_secrets.c.secret_hash,
        api_key_secrets.c.expires_at,
        api_key_secrets.c.revoked_at.label("secret_revoked_at"),
        api_keys,
    )
    .join(api_keys, api_keys.c.id == api_key_secrets.c.key_id)
    .where(api_key_secrets.c.id == sa.bindparam("sid"))
)
_INSERT_JOB = jobs.insert()


_STOP = object()


class _InsertBatcher:
    """Group commit for job inserts: concurrent submits share one transaction.

    Each caller blocks until its row is committed (or raises). One thread takes whatever
    is waiting, inserts it with one executemany, notifies once per model and commits;
    if the batch fails, its rows are retried one by one so only a bad row fails.
    """

    def __init__(self, store: Store, max_batch: int = 256):
        self._store = store
        self._max = max_batch
        self._queue: queue.SimpleQueue[tuple[dict[str, Any], threading.Event, list[BaseException]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def insert(self, values: dict[str, Any]) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="job-inserts", daemon=True)
                    self._thread.start()
        done = threading.Event()
        error: list[BaseException] = []
        self._queue.put((values, done, error))
        done.wait()
        if error:
            raise error[0]

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)  # type: ignore[arg-type]
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                self._write([v for v, _, _ in batch])
            except Exception:  # noqa: BLE001 - retry alone, so one bad row fails alone
                for item in batch:
                    try:
                        self._write([item[0]])
                    except Exception as e:  # noqa: BLE001
                        item[2].append(e)
            for _, done, _ in batch:
                done.set()
            if stop:
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        store = self._store
        with store._tx() as conn:
            conn.execute(_INSERT_JOB, rows)
            for model in sorted({r["model"] for r in rows}):
                store._notify(conn, model)


class Store:
    """Jobs, queue, leases and API keys on one database (SQLite or PostgreSQL)."""

    # PostgreSQL NOTIFY channel: every queue change, payload = model ID.
    CHANNEL = "remotegpu_queue"

    def __init__(self, url: str, *, max_attempts: int = 3, clock: Callable[[], float] = time.time):
        self.url = normalise_url(url)
        self.max_attempts = max_attempts
        # Job and lease times (UNIX seconds); tests pass a clock they can move forward.
        self.clock = clock
        self.is_sqlite = self.url.startswith("sqlite")
        self.own_backend_pids: set[int] = set()
        if self.is_sqlite:
            _private_sqlite_files(self.url)
            self._read = sa.create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30})
            self._write = sa.create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30})
            # Reads run statement by statement (autocommit); writes take the write lock up front.
            self._sqlite_setup(self._read, None)
            self._sqlite_setup(self._write, "BEGIN IMMEDIATE")
        else:
            # No pre-ping (a round trip per checkout); connections are recycled hourly instead.
            self._write = sa.create_engine(self.url, pool_size=10, max_overflow=30, pool_recycle=3600)
            # Reads need no transaction: no BEGIN/ROLLBACK round trips.
            self._read = self._write.execution_options(isolation_level="AUTOCOMMIT")
            self._pg_setup(self._write)
        self._batcher = _InsertBatcher(self)
        # SQLite allows one writer; serialise ours instead of spinning on SQLITE_BUSY.
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )

    def _pg_setup(self, engine: Engine) -> None:
        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            # Our own sessions' NOTIFYs need no wake-up through LISTEN: we woke ourselves.
            cur = dbapi_conn.cursor()
            cur.execute("SELECT pg_backend_pid()")
            self.own_backend_pids.add(cur.fetchone()[0])
            cur.close()
            dbapi_conn.commit()

    @staticmethod
    def _sqlite_setup(engine: Engine, begin: str | None) -> None:
        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        if begin is not None:

            @sa.event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                conn.exec_driver_sql(begin)

    def close(self) -> None:
        self._batcher.close()
        self._read.dispose()
        self._write.dispose()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._write_lock, self._write.begin() as conn:
            yield conn

    def _notify(self, conn: Connection, model: str) -> None:
        if not self.is_sqlite:
            conn.execute(
                sa.text("SELECT pg_notify(:channel, :model)"), {"channel": self.CHANNEL, "model": model}
            )

    @contextlib.contextmanager
    def _ro(self) -> Iterator[Connection]:
        with self._read.connect() as conn:
            yield conn

    # Modules with their own tables (limits.py, usage.py) use the store's connections.
    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        return self._tx()

    def reading(self) -> contextlib.AbstractContextManager[Connection]:
        return self._ro()

    # ---- schema ---------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Applies pending migrations; returns the versions applied now."""
        applied_now = []
        with self._tx() as conn:
            if not self.is_sqlite:
                # One migrator at a time across gateway replicas.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242001)"))
            schema_migrations.create(conn, checkfirst=True)
            done = set(conn.execute(sa.select(schema_migrations.c.version)).scalars())
            for version, name, fn in MIGRATIONS:
                if version in done:
                    continue
                fn(conn)
                conn.execute(
                    schema_migrations.insert().values(version=version, name=name, applied_at=time.time())
                )
                applied_now.append(version)
        return applied_now

    def schema_version(self) -> int:
        with self._ro() as conn:
            return conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar() or 0

    def setting(self, name: str, factory: Callable[[], str]) -> str:
        """A value shared by every replica (e.g. the URL signing secret), created once."""
        with self._ro() as conn:
            value = conn.execute(
                sa.select(gateway_settings.c.value).where(gateway_settings.c.name == name)
            ).scalar()
        if value is not None:
            return value
        with self._tx() as conn:
            value = conn.execute(
                sa.select(gateway_settings.c.value).where(gateway_settings.c.name == name)
            ).scalar()
            if value is None:
                value = factory()
                conn.execute(gateway_settings.insert().values(name=name, value=value))
        return value

    # ---- API keys -------------------------------------------------------------------------

    def create_key(
        self, name: str, scopes: list[str], expires_in_seconds: float | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key identity and its first secret (optionally expiring); returns (key, token)."""
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {scopes}")
        now = time.time()
        key_id = "key_" + secrets.token_hex(8)
        with self._tx() as conn:
            conn.execute(
                api_keys.insert().values(
                    id=key_id, name=_text(name), scopes=",".join(sorted(set(scopes))), created_at=now
                )
            )
            expires = now + expires_in_seconds if expires_in_seconds is not None else None
            token = self._new_secret(conn, key_id, now, expires)
        return self.get_key(key_id), token

    @staticmethod
    def _new_secret(conn: Connection, key_id: str, now: float, expires_at: float | None = None) -> str:
        sid = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        conn.execute(
            api_key_secrets.insert().values(
                id=sid, key_id=key_id, secret_hash=hash_secret(secret), created_at=now, expires_at=expires_at
            )
        )
        return f"{KEY_PREFIX}{sid}.{secret}"

    def get_key(self, key_id: str) -> KeyRecord:
        if not _key(key_id):
            raise NotFoundError(key_id)
        with self._ro() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFoundError(key_id)
            secs = conn.execute(
                sa.select(api_key_secrets)
                .where(api_key_secrets.c.key_id == key_id)
                .order_by(api_key_secrets.c.created_at)
            ).all()
        return self._key_record(row, secs)

    @staticmethod
    def _key_record(row: Any, secs: Any) -> KeyRecord:
        m = row._mapping
        return KeyRecord(
            id=m["id"],
            name=m["name"],
            scopes=m["scopes"].split(","),
            created_at=m["created_at"],
            last_used_at=m["last_used_at"],
            revoked_at=m["revoked_at"],
            secrets=[
                {
                    "id": s.id,
                    "created_at": s.created_at,
                    "expires_at": s.expires_at,
                    "revoked_at": s.revoked_at,
                }
                for s in secs
            ],
        )

    def list_keys(self) -> list[KeyRecord]:
        with self._ro() as conn:
            rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at)).all()
            secs = conn.execute(sa.select(api_key_secrets).order_by(api_key_secrets.c.created_at)).all()
        by_key: dict[str, list[Any]] = {}
        for s in secs:
            by_key.setdefault(s.key_id, []).append(s)
        return [self._key_record(r, by_key.get(r.id, [])) for r in rows]

    def rotate_key(self, key_id: str, grace_seconds: float = 0) -> str:
        """A new secret for the same key identity (same scopes, same expiry); the old ones stop
        working after the grace period."""
        if not _key(key_id):
            raise NotFoundError(key_id)
        now = time.time()
        with self._tx() as conn:
            row = conn.execute(sa.select(api_keys.c.revoked_at).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFoundError(key_id)
            if row.revoked_at is not None:
                raise ValueError(f"key {key_id} is revoked")
            expires_at = self._key_expiry(conn, key_id)
            if expires_at is not None and expires_at <= now:
                raise ValueError(f"key {key_id} has expired; create a new key")
            live = sa.and_(api_key_secrets.c.key_id == key_id, api_key_secrets.c.revoked_at.is_(None))
            if grace_seconds > 0:
                conn.execute(
                    api_key_secrets.update()
                    .where(
                        live,
                        sa.or_(
                            api_key_secrets.c.expires_at.is_(None),
                            api_key_secrets.c.expires_at > now + grace_seconds,
                        ),
                    )
                    .values(expires_at=now + grace_seconds)
                )
            else:
                conn.execute(api_key_secrets.update().where(live).values(revoked_at=now))
            return self._new_secret(conn, key_id, now, expires_at)

    @staticmethod
    def _key_expiry(conn: Connection, key_id: str) -> float | None:
        """The key's expiry: its newest secret's (a rotation copies it to the new secret, while
        the grace period only ever shortens the older secrets')."""
        return conn.execute(  # type: ignore[no-any-return]
            sa.select(api_key_secrets.c.expires_at)
            .where(api_key_secrets.c.key_id == key_id)
            .order_by(api_key_secrets.c.created_at.desc())
            .limit(1)
        ).scalar()

    def revoke_key(self, key_id: str) -> KeyRecord:
        if not _key(key_id):
            raise NotFoundError(key_id)
        now = time.time()
        with self._tx() as conn:
            n = conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount
            if (
                n == 0
                and conn.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id)).first() is None
            ):
                raise NotFoundError(key_id)
            conn.execute(
                api_key_secrets.update()
                .where(api_key_secrets.c.key_id == key_id, api_key_secrets.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return self.get_key(key_id)

    def authenticate(self, token: str, touch_interval: float = 60.0) -> KeyRecord | None:
        """The key identity a bearer token belongs to, or None (unknown, revoked, expired)."""
        parts = split_token(token)
        sid, secret = parts if parts else ("", token)
        with self._ro() as conn:
            row = conn.execute(_AUTH_QUERY, {"sid": sid}).first()
        # Always one constant-time comparison, whether or not the lookup id exists.
        matches = hmac.compare_digest(
            hash_secret(secret), row.secret_hash if row is not None else _DUMMY_HASH
        )
        if row is None or not matches:
            return None
        now = time.time()
        if row.secret_revoked_at is not None or row.revoked_at is not None:
            return None
        if row.expires_at is not None and row.expires_at <= now:
            return None
        key = KeyRecord(
            id=row.id,
            name=row.name,
            scopes=row.scopes.split(","),
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=None,
        )
        if row.last_used_at is None or now - row.last_used_at >= touch_interval:
            with self._tx() as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(last_used_at=now))
            key.last_used_at = now
        return key

    # ---- jobs -----------------------------------------------------------------------------

    def create_job(
        self,
        *,
        owner_key_id: str,
        model: str,
        request: dict[str, Any],
        input_image_keys: list[str],
        job_id: str | None = None,
        admit: Callable[[Connection, int], None] | None = None,
    ) -> JobRecord:
        """Queues one job. With `admit` (per-key limits), it runs in the insert's transaction
        first and raises to refuse the job; without it, the insert joins a group commit."""
        return self.create_jobs(
            [
                dict(
                    owner_key_id=owner_key_id,
                    model=model,
                    request=request,
                    input_image_keys=input_image_keys,
                    job_id=job_id,
                )
            ],
            admit=admit,
        )[0]

    def create_jobs(
        self, new: list[dict[str, Any]], admit: Callable[[Connection, int], None] | None = None
    ) -> list[JobRecord]:
        """Queues jobs (keyword arguments of create_job each) all or none; `admit(conn, count)`
        runs first in the same transaction, so limits hold across replicas."""
        now = self.clock()
        records = [
            JobRecord(
                id=j.get("job_id") or str(uuid.uuid4()),
                owner_key_id=j["owner_key_id"],
                model=j["model"],
                status=PENDING,
                request=j["request"],
                input_image_keys=j["input_image_keys"],
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
            for j in new
        ]
        rows: list[dict[str, Any]] = [
            dict(
                id=r.id,
                owner_key_id=r.owner_key_id,
                model=r.model,
                status=PENDING,
                request=json.dumps(r.request, separators=(",", ":")),
                input_image_keys=json.dumps(r.input_image_keys),
                created_at=now,
                updated_at=now,
                attempt=0,
                cancel_requested=False,
            )
            for r in records
        ]
        if admit is None and len(rows) == 1:
            self._batcher.insert(rows[0])
            return records
        with self._tx() as conn:
            if admit is not None:
                admit(conn, len(rows))
            conn.execute(_INSERT_JOB, rows)
            for model in sorted({r.model for r in records}):
                self._notify(conn, model)
        return records

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

    # ---- the queue and leases --------------------------------------------------------------

    def lease(self, model: str, worker_id: str, ttl: float) -> JobRecord | None:
        """Leases the oldest pending job of `model` to `worker_id`."""
        if not _key(model):
            return None
        worker_id = _text(worker_id)
        now = self.clock()
        token = secrets.token_urlsafe(24)
        with self._tx() as conn:
            job_id = conn.execute(
                sa.select(jobs.c.id)
                .where(jobs.c.model == model, jobs.c.status == PENDING)
                .order_by(jobs.c.created_at, jobs.c.id)
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
                )
            )
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
            if progress is not None:
                values["progress_step"], values["progress_total"] = progress
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
                jobs.update().where(jobs.c.id == job_id).values(completed_at=now, updated_at=now, **values)
            )
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
        conn.execute(jobs.update().where(jobs.c.id == job.id).values(**values))
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
                    .values(status=FAILED, completed_at=now, updated_at=now, error_message=error_message)
                )
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
            if purged:
                conn.execute(sa.delete(jobs).where(jobs.c.id.in_([j.id for j in purged])))
        return purged

    def queue_counts(self) -> dict[str, QueueCount]:
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(
                    jobs.c.model,
                    jobs.c.status,
                    sa.func.count(),
                    sa.func.min(jobs.c.created_at),
                    sa.func.min(jobs.c.updated_at),
                )
                .where(jobs.c.status.in_([PENDING, RUNNING]))
                .group_by(jobs.c.model, jobs.c.status)
            ).all()
            busy = conn.execute(
                sa.select(jobs.c.model, jobs.c.worker_id)
                .where(jobs.c.status == RUNNING, jobs.c.worker_id.is_not(None))
                .distinct()
            ).all()
        out: dict[str, QueueCount] = {}
        for model, status, count, oldest, oldest_queued in rows:
            q = out.setdefault(model, QueueCount())
            if status == PENDING:
                q.pending = int(count)
                q.oldest_pending_created_at = oldest
                q.oldest_pending_queued_at = oldest_queued
            else:
                q.running = int(count)
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
