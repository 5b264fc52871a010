"""The database under every store concern: engines, transactions, NOTIFY, migrations.

Both backends run the same SQLAlchemy Core statements. SQLite (the embedded default)
serialises writers: one process-wide lock plus `BEGIN IMMEDIATE`; PostgreSQL (the
cluster) leases with `SELECT ... FOR UPDATE SKIP LOCKED`, so many gateway replicas can
share one database.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from remotegpu_gateway.store.schema import MIGRATIONS, gateway_settings, schema_migrations


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


class Database:
    """The engines and transactions every store concern runs on (SQLite or PostgreSQL)."""

    # PostgreSQL NOTIFY channel: every queue change, payload = model ID.
    CHANNEL = "remotegpu_queue"
    # Per-job changes that leave the queue as it is (progress), payload = job ID.
    JOB_CHANNEL = "remotegpu_jobs"

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

    def _notify_job(self, conn: Connection, job_id: str) -> None:
        """A change only the job's event streams show (its progress): on JOB_CHANNEL."""
        if not self.is_sqlite:
            conn.execute(
                sa.text("SELECT pg_notify(:channel, :job)"), {"channel": self.JOB_CHANNEL, "job": job_id}
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
