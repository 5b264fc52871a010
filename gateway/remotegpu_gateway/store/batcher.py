"""Group commit for job inserts: the store's own commit thread."""

from __future__ import annotations

import queue
import threading
from typing import Any

from sqlalchemy.engine import Connection

from remotegpu_gateway.store.database import Database
from remotegpu_gateway.store.schema import idempotency_keys, jobs

_INSERT_JOB = jobs.insert()
_INSERT_KEY = idempotency_keys.insert()

_STOP = object()


class InsertBatcher:
    """Group commit for job inserts: concurrent submits share one transaction.

    Each caller blocks until its row is committed (or raises). One thread takes whatever
    is waiting, inserts it with one executemany, notifies once per model and commits;
    if the batch fails, its rows are retried one by one so only a bad row fails.
    """

    def __init__(self, store: Database, max_batch: int = 256):
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
        with self._store._tx() as conn:
            self.write_rows(conn, rows)

    def write_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Inserts job rows (with their Idempotency-Keys) in `conn`'s transaction and
        notifies their models' queues."""
        keys = [r["_idempotency"] for r in rows if "_idempotency" in r]
        conn.execute(_INSERT_JOB, [{k: v for k, v in r.items() if k != "_idempotency"} for r in rows])
        if keys:  # a key already taken fails the insert: its job is the original's
            conn.execute(_INSERT_KEY, keys)
        for model in sorted({r["model"] for r in rows}):
            self._store._notify(conn, model)
