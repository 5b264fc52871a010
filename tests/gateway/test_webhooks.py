"""Signed webhooks against the running gateway, on SQLite and PostgreSQL: signatures checked
with the reference `standardwebhooks` library, events, refusals, retries with back-off,
and deliveries that survive a gateway restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tests.gateway.conftest import SCHNELL, Clock, RunningGateway, auth, png_bytes
from tests.waiting import wait_for

LOOPBACK = ["127.0.0.0/8"]


class Receiver:
    """A webhook endpoint on loopback that records each request and answers `status`."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def key_with_secret(g: RunningGateway) -> tuple[str, str, str]:
    """(key id, token, whsec secret), the secret made through the admin API."""
    record, token = g.gw.store.create_key("hooks", ["inference"])
    admin = g.key("admin", ["admin"])
    r = g.http.post(f"/v1/admin/keys/{record.id}/webhook-secret", headers=auth(admin))
    assert r.status_code == 200, r.text
    secret = r.json()["webhook_secret"]
    assert secret.startswith("whsec_")
    return record.id, token, secret


def run_job(g: RunningGateway, job_id: str) -> None:
    w = g.worker()
    try:
        lease = w.lease(SCHNELL, "w1", wait_seconds=10)
        assert lease is not None and lease.job_id == job_id
        w.complete(job_id, lease.lease_token, png_bytes())
    finally:
        w.close()


def deliveries(g: RunningGateway, token: str, job_id: str) -> list[dict[str, Any]]:
    r = g.http.get(f"/v1/inference/jobs/{job_id}/webhooks", headers=auth(token))
    assert r.status_code == 200, r.text
    return list(r.json()["deliveries"])


def test_signed_running_and_completed_webhooks(
    start_gateway: Callable[..., RunningGateway], receiver: Receiver
) -> None:
    g = start_gateway(webhook_allowed_networks=LOOPBACK)
    g.ready(SCHNELL, "w1")
    _, token, secret = key_with_secret(g)
    job_id = g.submit(token, {"prompt": "a", "model": SCHNELL, "webhook_url": receiver.url}).json()["job_id"]
    run_job(g, job_id)
    wait_for(lambda: len(receiver.received) == 2)
    verifier = Webhook(secret)
    for headers, body in receiver.received:
        verifier.verify(body, headers)  # raises unless the signature and timestamp are right
        assert headers["webhook-signature"].startswith("v1,")
        assert headers["content-type"] == "application/json"
    running, completed = sorted(receiver.events(), key=lambda e: e["type"] != "job.running")
    assert running["type"] == "job.running" and running["data"]["status"] == "running"
    assert completed["type"] == "job.completed" and completed["data"]["status"] == "succeeded"
    assert completed["data"]["job_id"] == job_id and completed["data"]["result_url"]
    assert g.http.get(completed["data"]["result_url"]).status_code == 200
    # A forged body fails the same verification (either delivery may have arrived first:
    # the change must hit both bodies).
    headers, body = receiver.received[0]
    forged = body.replace(b'"job.', b'"job.forged.')
    assert forged != body
    with pytest.raises(Exception, match="(?i)signature"):
        verifier.verify(forged, headers)

    # Marked delivered once the receiver's answer is back: after the receiver has the body.
    listed = wait_for(
        lambda: len(d := [d for d in deliveries(g, token, job_id) if d["status"] == "delivered"]) == 2 and d,
        30,
        "both deliveries marked delivered",
    )
    assert {d["event"] for d in listed} == {"job.running", "job.completed"}
    assert {d["id"] for d in listed} == {h["webhook-id"] for h, _ in receiver.received}
    assert all(d["attempts"] == 1 and d["last_status_code"] == 200 for d in listed)


def test_webhook_events_choose_what_is_sent(
    start_gateway: Callable[..., RunningGateway], receiver: Receiver
) -> None:
    g = start_gateway(webhook_allowed_networks=LOOPBACK)
    g.ready(SCHNELL, "w1")
    _, token, _ = key_with_secret(g)
    body = {"prompt": "a", "model": SCHNELL, "webhook_url": receiver.url, "webhook_events": ["completed"]}
    job_id = g.submit(token, body).json()["job_id"]
    run_job(g, job_id)
    wait_for(lambda: receiver.received)
    cancelled = g.submit(token, body).json()["job_id"]
    g.http.post(f"/v1/inference/jobs/{cancelled}/cancel", headers=auth(token))
    wait_for(lambda: len(receiver.received) == 2)
    time.sleep(0.5)  # nothing else follows
    assert [(e["type"], e["data"]["status"]) for e in receiver.events()] == [
        ("job.completed", "succeeded"),
        ("job.completed", "cancelled"),
    ]


def test_webhook_urls_that_are_refused(gateway: RunningGateway, receiver: Receiver) -> None:
    _, token, _ = key_with_secret(gateway)
    plain = gateway.key("no-secret")

    def submit(key: str, **fields: Any) -> tuple[int, str | None, str]:
        r = gateway.submit(key, {"prompt": "a", "model": SCHNELL, **fields})
        err = r.json().get("error", {})
        return r.status_code, err.get("field"), err.get("message", "")

    status, field, message = submit(token, webhook_url=receiver.url)  # loopback, not allowed here
    assert (status, field) == (400, "webhook_url") and "REMOTEGPU_WEBHOOK_ALLOWED_NETWORKS" in message
    for url in (
        "http://10.1.2.3/h",
        "http://169.254.169.254/latest",
        "http://[::1]:80/",
        "http://localhost/",
    ):
        assert submit(token, webhook_url=url)[:2] == (400, "webhook_url"), url
    assert submit(token, webhook_url="ftp://example.com/h")[:2] == (400, "webhook_url")
    assert submit(token, webhook_url="https://user:pw@example.com/h")[:2] == (400, "webhook_url")
    status, field, message = submit(plain, webhook_url="https://example.com/h")
    assert (status, field) == (400, "webhook_url") and "webhook-secret" in message
    assert submit(token, webhook_events=["completed"])[:2] == (400, "webhook_events")
    assert submit(token, webhook_url="https://example.com/h", webhook_events=["started"])[:2] == (
        422,
        "webhook_events[0]",
    )
    assert submit(token, webhook_url="https://example.com/h")[0] == 202  # public: accepted


def test_deliveries_are_retried_and_survive_a_restart(
    start_gateway: Callable[..., RunningGateway], receiver: Receiver, clock: Clock
) -> None:
    receiver.status = 503
    a = start_gateway(webhook_allowed_networks=LOOPBACK)
    a.ready(SCHNELL, "w1")
    _, token, secret = key_with_secret(a)
    body = {"prompt": "a", "model": SCHNELL, "webhook_url": receiver.url, "webhook_events": ["completed"]}
    job_id = a.submit(token, body).json()["job_id"]
    run_job(a, job_id)
    # The receiver is down: the job is done anyway, its delivery waits for a retry.
    assert a.job(token, job_id).json()["status"] == "succeeded"
    first = wait_for(lambda: [d for d in deliveries(a, token, job_id) if d["attempts"] == 1])[0]
    assert first["status"] == "pending" and first["last_status_code"] == 503
    assert first["next_attempt_at"] >= first["last_attempt_at"] + 4.9  # back-off: 5 s first
    a.stop()

    receiver.status = 200
    b = start_gateway(webhook_allowed_networks=LOOPBACK)  # a new gateway on the same database
    clock.advance(6)  # the retry falls due
    done = wait_for(lambda: [d for d in deliveries(b, token, job_id) if d["status"] == "delivered"])[0]
    assert done["attempts"] == 2 and done["id"] == first["id"]
    ids = [h["webhook-id"] for h, _ in receiver.received]
    assert ids == [first["id"], first["id"]]  # the same message, retried
    Webhook(secret).verify(receiver.received[-1][1], receiver.received[-1][0])


def test_a_delivery_gives_up_after_the_retry_period(
    start_gateway: Callable[..., RunningGateway], receiver: Receiver, clock: Clock
) -> None:
    receiver.status = 500
    g = start_gateway(webhook_allowed_networks=LOOPBACK, webhook_retry_seconds=30.0)
    g.ready(SCHNELL, "w1")
    _, token, _ = key_with_secret(g)
    body = {"prompt": "a", "model": SCHNELL, "webhook_url": receiver.url, "webhook_events": ["completed"]}
    job_id = g.submit(token, body).json()["job_id"]
    run_job(g, job_id)
    for attempts, wait in ((1, 6), (2, 11)):  # tries at +0, +5, +15 s; the next (+35) is past 30 s
        wait_for(lambda a=attempts: deliveries(g, token, job_id)[0]["attempts"] == a)
        clock.advance(wait)
    final = wait_for(lambda: [d for d in deliveries(g, token, job_id) if d["status"] == "failed"])[0]
    assert final["attempts"] == 3 and final["next_attempt_at"] is None
    assert final["last_error"] == "answered HTTP 500"
    assert len(receiver.received) == 3


def test_allowed_networks_come_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from remotegpu_gateway.settings import WEBHOOK_NETWORKS_ENV, webhook_allowed_networks
    from remotegpu_gateway.webhooks import destination_problem, parse_networks

    monkeypatch.setenv(WEBHOOK_NETWORKS_ENV, "10.0.0.0/8, 127.0.0.1/32")
    assert webhook_allowed_networks() == ["10.0.0.0/8", "127.0.0.1/32"]
    assert webhook_allowed_networks("192.168.1.0/24") == ["192.168.1.0/24"]
    with pytest.raises(SystemExit, match="CIDR"):
        webhook_allowed_networks("not-a-network")
    allowed = parse_networks(["10.0.0.0/8"])
    assert destination_problem("http://10.2.3.4/h", allowed, resolve=False) is None
    assert destination_problem("http://192.168.0.1/h", allowed, resolve=False) is not None
