"""Wake-ups for long-polls: lease requests wait for their model, queue readers for any change.

`bump()` may be called from any thread; waiters live on the server's event loop. The
version is seeded from the clock so that it keeps increasing across gateway restarts.
`close()` (on SIGTERM) ends every long-poll at once, so a shutting-down gateway does not
wait out workers' lease polls before it exits.
"""

from __future__ import annotations

import asyncio
import threading
import time


class Notifier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = time.time_ns() // 1000
        self._loop: asyncio.AbstractEventLoop | None = None
        self._any = asyncio.Event()
        self._models: dict[str, asyncio.Event] = {}
        # A job's event streams: woken by its own changes (progress) and its model's.
        self._jobs: dict[str, tuple[str, asyncio.Event]] = {}
        self.closing = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def bump(self, *models: str) -> int:
        with self._lock:
            self.version += 1
            version = self.version
        loop = self._loop
        if loop is None or loop.is_closed():
            return version
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake(models)
        else:
            loop.call_soon_threadsafe(self._wake, models)
        return version

    def bump_job(self, job_id: str) -> None:
        """A change of one job that leaves its model's queue as it is (its progress)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake_job(job_id)
        else:
            loop.call_soon_threadsafe(self._wake_job, job_id)

    def _wake_job(self, job_id: str) -> None:
        entry = self._jobs.pop(job_id, None)
        if entry is not None:
            entry[1].set()

    def close(self) -> None:
        """Ends every long-poll now and every later one at once. Safe in a signal handler."""
        self.closing = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, ())

    def _wake(self, models: tuple[str, ...]) -> None:
        self._any.set()
        self._any = asyncio.Event()
        targets = models or tuple(self._models)
        for m in targets:
            ev = self._models.pop(m, None)
            if ev is not None:
                ev.set()
        for job_id, (model, job_ev) in list(self._jobs.items()):
            if not models or model in models:
                del self._jobs[job_id]
                job_ev.set()

    def any_event(self) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        return self._any

    def model_event(self, model: str) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        ev = self._models.get(model)
        if ev is None:
            ev = self._models[model] = asyncio.Event()
        return ev

    def job_event(self, job_id: str, model: str) -> asyncio.Event:
        """Set on the next change of the job or of its model's queue."""
        self._loop = asyncio.get_running_loop()
        entry = self._jobs.get(job_id)
        if entry is None:
            entry = self._jobs[job_id] = (model, asyncio.Event())
        return entry[1]


async def wait_event(ev: asyncio.Event, timeout: float) -> bool:
    if timeout <= 0:
        return ev.is_set()
    try:
        await asyncio.wait_for(ev.wait(), timeout)
        return True
    except TimeoutError:
        return False
