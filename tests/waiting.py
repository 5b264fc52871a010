"""Polling for a condition, the one way tests (and benchmarks) wait."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.fixtures.processes import Proc

# Without a fixed `every`, polls start fast and back off to this: a check may spawn a process or
# read the API server, and on a 2-core machine a tight loop of them starves the system under test.
FIRST_POLL, LONGEST_POLL = 0.05, 1.0
# A wait at least this long is logged, to show where a slow or failing test spent its time:
# with a failing test's captured log, or live (`-o log_cli=true --log-cli-level=INFO`).
LOGGED_WAIT = 2.0

log = logging.getLogger("tests.wait")
log.setLevel(logging.INFO)  # whatever the root logger's level


class WaitTimeout(AssertionError):
    """What wait_for raises when its time is up (an AssertionError, so a test fails with it)."""


def wait_for(
    cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", every: float | None = None
) -> Any:
    """Returns cond()'s first truthy value; fails after `timeout` seconds, naming what it waited for.

    `every` fixes the interval, for a state that may last only a moment; by default the
    interval grows from 0.05 s to 1 s, so a quick condition is seen at once and a slow one
    costs a check a second.
    """
    started = time.monotonic()
    deadline = started + timeout
    interval = every if every is not None else FIRST_POLL
    last: Any = None
    while True:
        last = cond()
        if last:
            if (took := time.monotonic() - started) >= LOGGED_WAIT:
                log.info("waited %.1fs for %s", took, what)
            return last
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(min(interval, left))
        if every is None:
            interval = min(interval * 1.5, LONGEST_POLL)


def wait_http(url: str, timeout: float, proc: Proc | None = None, status: int = 200) -> None:
    """Until `url` answers `status`; fails at once, with its log, when `proc` exits first.

    One client for every try: each new httpx client builds an SSL context (~30 ms of CPU),
    which a poll loop of `httpx.get` paid several times a second.
    """
    last = ""

    def answered() -> bool:
        nonlocal last
        if proc is not None and proc.p.poll() is not None:
            raise AssertionError(f"process exited ({proc.p.returncode}):\n{proc.log()[-3000:]}")
        try:
            r = client.get(url)
        except httpx.HTTPError as e:
            last = str(e) or type(e).__name__
            return False
        last = f"{r.status_code} {r.text[:200]}"
        return r.status_code == status

    with httpx.Client(timeout=2) as client:
        try:
            wait_for(answered, timeout, f"{url} to answer {status}")
        except WaitTimeout:
            log = proc.log()[-3000:] if proc else ""
            raise AssertionError(f"{url} not {status} after {timeout}s (last: {last})\n{log}") from None
