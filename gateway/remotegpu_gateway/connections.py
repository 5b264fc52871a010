"""Connection-level timeouts uvicorn lacks, and the one way the gateway is served.

uvicorn's keep-alive timer closes an idle connection, but any byte cancels it: a client
that sends its request line and headers one byte at a time (slowloris), or a connection
that never sends anything, is held forever. `GuardedH11Protocol` adds:
- a header timeout: from the connection's start, or the end of the previous response,
  until the next request's headers are complete; bytes arriving do not extend it. A
  partial request gets 408 and the connection is closed; an idle one is just closed;
- a drain timeout: a response sent before the request body was read (401/403/413)
  lets the client finish sending, discarded, for at most the body timeout, then closes.
  (Closing at once would make the client's kernel drop the answer with a reset.)
Reading a body inside a request is bounded by `remotegpu_gateway.bodies.BodyGuard`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from remotegpu_gateway.settings import Settings

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    body_timeout: float = 60.0

    _timer: asyncio.TimerHandle | None = None
    _phase: str | None = None  # what the timer waits for: "headers" | "drain" | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._update_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_timer(None)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._update_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_timer()

    def _update_timer(self) -> None:
        if self.transport.is_closing():
            self._set_timer(None)
        elif self.conn.their_state is h11.IDLE:
            self._set_timer("headers")
        elif self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
            self._set_timer("drain")
        else:
            self._set_timer(None)

    def _set_timer(self, phase: str | None) -> None:
        """Arms the timer for `phase`, keeping it if it already runs for that phase."""
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            delay = self.header_timeout if phase == "headers" else self.body_timeout
            self._timer = self.loop.call_later(delay, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if phase == "headers" and self.conn.trailing_data[0]:
            self.transport.write(_REQUEST_TIMEOUT)  # part of a request came: say why
        self.logger.info(
            "closing a connection: %s timed out", "request headers" if phase == "headers" else "body"
        )
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class with this gateway's timeouts (uvicorn instantiates it per connection)."""
    return type(
        "GatewayH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": settings.header_timeout_seconds, "body_timeout": settings.body_timeout_seconds},
    )


def uvicorn_config(app: Any, settings: Settings, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """How every server of the gateway's app is configured: `remotegpu gateway`, `remotegpu
    serve` and the tests."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(settings),
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
        **options,
    )
