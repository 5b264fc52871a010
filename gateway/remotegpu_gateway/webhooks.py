"""Signed webhooks (the Standard Webhooks specification): destination checks, signatures,
and the delivery loop that sends the deliveries the store queued.

Each delivery is signed with its API key's `whsec_` secret: the `webhook-signature` header
is `v1,` + base64(HMAC-SHA256(secret, "{webhook-id}.{webhook-timestamp}.{body}")). A
delivery is retried with exponential back-off (5 s, 10 s, 20 s ... at most an hour apart)
until it is answered 2xx or `webhook_retry_seconds` passed since its event.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from remotegpu_gateway.store import Delivery, Store, record_from_snapshot

log = logging.getLogger("remotegpu_gateway")

BACKOFF_FIRST_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 3600.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def parse_networks(values: list[str]) -> list[Network]:
    """CIDRs (`10.0.0.0/8`, `127.0.0.1/32`, `::1/128`); a bad one raises ValueError."""
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip()]


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: list[Network]) -> bool:
    internal = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    return internal and not any(address in net for net in allowed)


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a webhook URL at all (None: it is fine)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        return f"webhook_url is not a valid URL ({e})"
    if parts.scheme not in ("http", "https"):
        return "webhook_url must be an http:// or https:// URL"
    if not parts.hostname:
        return "webhook_url has no host"
    if parts.username or parts.password:
        return "webhook_url must not carry credentials; sign-check the webhook-signature header instead"
    return None


def destination_problem(url: str, allowed: list[Network], resolve: bool) -> str | None:
    """Why `url` may not be called (private, loopback or link-local and not allowed), or
    None. Without `resolve` only IP literals and `localhost` are checked (the submit);
    the delivery resolves the name and checks every address."""
    problem = url_problem(url)
    if problem:
        return problem
    host = urlsplit(url).hostname or ""
    addresses: list[str]
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            addresses = ["127.0.0.1"]
        elif not resolve:
            return None
        else:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except OSError as e:
                return f"cannot resolve {host}: {e}"
            addresses = sorted({str(info[4][0]) for info in infos})
    for a in addresses:
        if _refused(ipaddress.ip_address(a), allowed):
            return (
                f"webhook_url resolves to {a}, a private, loopback or link-local address; the gateway "
                "calls those only if REMOTEGPU_WEBHOOK_ALLOWED_NETWORKS allows them"
            )
    return None


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, attempts - 1)))


class WebhookSender:
    """Claims due deliveries, sends them signed, records each attempt. Any replica runs
    one; a claim keeps the others off a delivery while it is sent."""

    def __init__(
        self,
        store: Store,
        render: Callable[[Delivery], dict[str, Any]],
        *,
        allowed: list[Network],
        timeout_seconds: float,
        retry_seconds: float,
        clock: Callable[[], float],
        on_attempt: Callable[[Delivery, bool], None] | None = None,
    ):
        self.store = store
        self.render = render
        self.allowed = allowed
        self.timeout = timeout_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.on_attempt = on_attempt
        self._http: httpx.AsyncClient | None = None

    async def run_once(self) -> int:
        """Sends every due delivery (claimed in batches); returns how many were tried."""
        if self._http is None:
            # No redirects: a 3xx could point anywhere, past the destination check.
            self._http = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, trust_env=False)
        tried = 0
        due = await anyio.to_thread.run_sync(self.store.next_delivery_at)
        if due is None or due > self.clock():
            return 0  # a read, not the write lock a claim takes (SQLite's is the submits' too)
        while True:
            batch = await anyio.to_thread.run_sync(
                self.store.claim_deliveries, self.clock(), self.timeout * 3 + 5
            )
            if not batch:
                return tried
            await asyncio.gather(*(self._send(d) for d in batch))
            tried += len(batch)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _send(self, d: Delivery) -> None:
        assert self._http is not None
        status_code: int | None = None
        error: str | None = None
        problem = await anyio.to_thread.run_sync(destination_problem, d.url, self.allowed, True)
        secret = await anyio.to_thread.run_sync(self.store.webhook_secret, d.owner_key_id)
        if problem is None and secret is None:
            problem = "the API key has no webhook secret (remotegpu keys webhook-secret NAME creates one)"
        if problem is not None:
            error = problem
        else:
            assert secret is not None
            body = json.dumps(self.render(d), separators=(",", ":")).encode()
            timestamp = int(time.time())  # real time: receivers check it against their clocks
            headers = {
                "content-type": "application/json",
                "user-agent": "remotegpu-gateway-webhooks",
                "webhook-id": d.id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secret, d.id, timestamp, body),
            }
            try:
                r = await self._http.post(d.url, content=body, headers=headers)
                status_code = r.status_code
                if not 200 <= r.status_code < 300:
                    error = f"answered HTTP {r.status_code}"
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        delivered = error is None
        now = self.clock()
        retry_at: float | None = now + backoff(d.attempts + 1)
        if delivered or retry_at is None or retry_at > d.created_at + self.retry_seconds:
            retry_at = None  # delivered, or out of retry time
        if not delivered:
            log.warning("webhook %s of job %s to %s: %s", d.id, d.job_id, d.url, error)
        await anyio.to_thread.run_sync(
            lambda: self.store.delivery_attempted(
                d.id, now, delivered=delivered, status_code=status_code, error=error, retry_at=retry_at
            )
        )
        if self.on_attempt is not None:
            self.on_attempt(d, delivered)


def webhook_body(
    d: Delivery, view: Callable[[Any], dict[str, Any]], iso: Callable[[float], str | None]
) -> dict[str, Any]:
    """The Standard Webhooks payload: type, timestamp (of the event) and the job status."""
    job = record_from_snapshot(d.payload)
    return {"type": d.event, "timestamp": iso(job.updated_at), "data": view(job)}
