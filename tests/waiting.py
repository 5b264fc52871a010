"""Polling for a condition, the one way tests (and benchmarks) wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", every: float = 0.1
) -> Any:
    """Returns cond()'s first truthy value; fails after `timeout` seconds, naming what it waited for."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
