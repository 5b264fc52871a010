"""Polling for a condition, the one way tests (and benchmarks) wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Without a fixed `every`, polls start fast and back off to this: a check often spawns kubectl
# (~0.1 CPU-second each), and on a 2-core machine a tight loop of them starves the system under test.
FIRST_POLL, LONGEST_POLL = 0.05, 1.0


def wait_for(
    cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", every: float | None = None
) -> Any:
    """Returns cond()'s first truthy value; fails after `timeout` seconds, naming what it waited for.

    `every` fixes the interval, for a state that may last only a moment; by default the
    interval grows from 0.05 s to 1 s, so a quick condition is seen at once and a slow one
    costs a check a second.
    """
    deadline = time.monotonic() + timeout
    interval = every if every is not None else FIRST_POLL
    last: Any = None
    while True:
        last = cond()
        if last:
            return last
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(min(interval, left))
        if every is None:
            interval = min(interval * 1.5, LONGEST_POLL)
