"""What reading request bodies may cost: size, time, and how many are read at once.

Routes authenticate before they read a body (see `auth.auth_first`), so unauthenticated
uploads are never read; what is left is bounded here, as pure ASGI around the app:
- size: over `max_bytes` by Content-Length or while streaming -> 413;
- time: a body must arrive within `timeout` of the gateway starting to read it -> 408,
  and the connection is closed;
- concurrency: at most `concurrency` bodies are read at once; the others wait for a
  slot before their first byte is read (uvicorn's flow control keeps an unread body in
  the socket, not in memory).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from remotegpu_gateway.errors import ApiError


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes", "body")


class BodyTimeout(ApiError):
    def __init__(self, timeout: float):
        super().__init__(
            408,
            f"the request body did not arrive within {timeout:g} s",
            "body",
            headers={"Connection": "close"},
            type="request_timeout",
        )


def _body_size(scope: dict[str, Any]) -> tuple[bool, int | None]:
    """(whether the request has a body, its declared Content-Length if any), in one scan."""
    chunked, length = False, None
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return True, None  # malformed: let the server's parser answer it
    return chunked or bool(length), length


class BodyGuard:
    def __init__(self, app: Any, *, max_bytes: int, timeout: float, concurrency: int, metrics: Any):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.slots = asyncio.Semaphore(concurrency)
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        has_body, length = (False, None) if scope["type"] != "http" else _body_size(scope)
        if not has_body:
            await self.app(scope, receive, send)
            return
        if length is not None and length > self.max_bytes:
            await BodyTooLarge(self.max_bytes).response()(scope, receive, send)
            return
        reader = _BodyReader(self, receive)
        try:
            await self.app(scope, reader.receive, send)
        finally:
            reader.done()


class _BodyReader:
    """One request's body, read through a slot of its guard, against its deadline."""

    def __init__(self, guard: BodyGuard, receive: Any):
        self.guard = guard
        self._receive = receive
        self.received = 0
        self.deadline: float | None = None  # set when the slot is taken
        self.finished = False

    async def receive(self) -> dict[str, Any]:
        if self.finished:  # the body is in; later calls wait for a disconnect
            return await self._receive()  # type: ignore[no-any-return]
        if self.deadline is None:
            await self._take_slot()
        assert self.deadline is not None
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                message: dict[str, Any] = await self._receive()
        except TimeoutError:
            self.done()
            raise BodyTimeout(self.guard.timeout) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.guard.max_bytes:
                self.done()
                raise BodyTooLarge(self.guard.max_bytes)
            if not message.get("more_body", False):
                self.done()
        else:  # http.disconnect
            self.done()
        return message

    async def _take_slot(self) -> None:
        bodies = self.guard.metrics.bodies
        bodies.labels("waiting").inc()
        try:
            await self.guard.slots.acquire()
        finally:
            bodies.labels("waiting").dec()
        bodies.labels("reading").inc()
        self.deadline = time.monotonic() + self.guard.timeout

    def done(self) -> None:
        """Gives the slot back (once)."""
        if self.finished:
            return
        self.finished = True
        if self.deadline is not None:
            self.guard.slots.release()
            self.guard.metrics.bodies.labels("reading").dec()
