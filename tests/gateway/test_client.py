"""The Python client (`remotegpu.client.Client`) against the running gateway, on SQLite and
PostgreSQL: each API extension from Python (Idempotency-Key, Prefer: wait, priority,
deadline, webhooks and their deliveries, the event stream, listing, the webhook secret)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from remotegpu_base.protocol import Progress
from standardwebhooks.webhooks import Webhook

from cluster.localcluster import free_port
from remotegpu.client import Client, ClientError
from tests.gateway.conftest import SCHNELL, RunningGateway, png_bytes
from tests.gateway.test_webhooks import LOOPBACK, Receiver, wait_for


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def run_one(g: RunningGateway, steps: int = 3) -> threading.Thread:
    """A worker (the protocol, in a thread) that takes one job, reports its steps, completes it."""

    def run() -> None:
        w = g.worker()
        try:
            lease = w.lease(SCHNELL, "w1", wait_seconds=30)
            assert lease is not None
            for step in range(1, steps + 1):
                w.heartbeat(lease.job_id, lease.lease_token, Progress(step=step, total_steps=steps))
            w.complete(lease.job_id, lease.lease_token, png_bytes())
        finally:
            w.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_client_speaks_every_extension(
    start_gateway: Callable[..., RunningGateway], receiver: Receiver
) -> None:
    g = start_gateway(webhook_allowed_networks=LOOPBACK)
    g.ready(SCHNELL, "w1")
    record, token = g.gw.store.create_key("py", ["inference"])
    with Client(g.url, g.key("admin", ["admin"])) as admin:
        secret = admin.webhook_secret(record.id)
    assert secret.startswith("whsec_") and g.gw.store.webhook_secret(record.id) == secret

    body = {
        "model": SCHNELL,
        "prompt": "a lighthouse",
        "priority": "low",
        "deadline_seconds": 600,
        "webhook_url": receiver.url,
        "webhook_events": ["completed"],
    }
    with Client(g.url, token) as c:
        first = c.submit(body, idempotency_key="order-42")
        assert not first.replayed and first.final is None
        again = c.submit(body, idempotency_key="order-42")
        assert again.replayed and again.job_id == first.job_id

        # The event stream, followed to the end: the queue, the steps, the final status.
        events = c.events(first.job_id)
        kind, opening, opening_id = next(events)
        assert kind == "status" and opening["status"] == "queued" and opening["queue_position"] == 0
        worker = run_one(g)
        seen = list(events)
        worker.join(timeout=60)
        assert [d["status"] for kind, d, _ in seen if kind == "status"] == ["running", "succeeded"]
        steps = [d["step"] for kind, d, _ in seen if kind == "progress"]  # fast steps may coalesce
        assert steps and steps == sorted(steps) and set(steps) <= {1, 2, 3}
        job = c.job(first.job_id)
        assert job["status"] == "succeeded"
        # Resuming after the last event seen: only what changed since (here: nothing).
        final = seen[-1]
        assert final.id and list(c.events(first.job_id, last_event_id=final.id)) == []
        resumed = list(c.events(first.job_id, last_event_id=opening_id))
        assert [e.data["status"] for e in resumed if e.event == "status"] == ["succeeded"]
        assert c.result(first.job_id).startswith(b"\x89PNG")

        # The signed completion webhook, and the job's deliveries as the client lists them.
        wait_for(lambda: receiver.received)
        Webhook(secret).verify(receiver.received[0][1], receiver.received[0][0])
        delivered = wait_for(lambda: [d for d in c.webhooks(first.job_id) if d["status"] == "delivered"])
        assert [d["event"] for d in delivered] == ["job.completed"]

        # Prefer: wait: the final status in the answer itself.
        worker = run_one(g)
        waited = c.submit({"model": SCHNELL, "prompt": "b"}, wait=30)
        worker.join(timeout=60)
        assert waited.final is not None and waited.final["status"] == "succeeded"
        assert c.follow(waited.job_id)["status"] == "succeeded"  # a finished job's stream: its status

        # Listing, every page; a cancelled job.
        third = c.submit({"model": SCHNELL, "prompt": "c"})
        assert c.cancel(third.job_id)["cancel"] == "cancelled"
        listed = [j["job_id"] for j in c.jobs(limit=1)]
        assert listed == [third.job_id, waited.job_id, first.job_id]
        assert [j["job_id"] for j in c.jobs(status="cancelled")] == [third.job_id]
        assert c.timeline(first.job_id)["job_id"] == first.job_id

        with pytest.raises(ClientError, match="Idempotency-Key") as e:
            c.submit({**body, "prompt": "another"}, idempotency_key="order-42")
        assert e.value.code == 2 and "HTTP 422" in str(e.value)
        with pytest.raises(ClientError, match="HTTP 404"):
            c.job("no-such-job")


def test_the_client_says_what_to_do_when_the_service_is_away() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "k") as c, pytest.raises(ClientError) as e:
        c.submit({"model": SCHNELL, "prompt": "a"})
    assert e.value.code == 3 and "hint:" in str(e.value)
