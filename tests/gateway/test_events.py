"""Live job events (Server-Sent Events) against the running gateway: status changes, queue
position, per-step progress, the final status, Last-Event-ID, and two gateway replicas on
one database (PostgreSQL: LISTEN/NOTIFY)."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from remotegpu_base.protocol import Progress

from tests.gateway.conftest import SCHNELL, RunningGateway, auth, png_bytes


class EventStream:
    """Reads a job's SSE stream in a thread; events arrive in a queue the test takes from."""

    def __init__(self, url: str, key: str, job_id: str, last_event_id: str | None = None):
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        headers = {**auth(key), **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        self.status_code: int | None = None
        self._thread = threading.Thread(target=self._read, args=(url, job_id, headers), daemon=True)
        self._thread.start()

    def _read(self, url: str, job_id: str, headers: dict[str, str]) -> None:
        try:
            with (
                httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=120)) as c,
                c.stream("GET", f"/v1/inference/jobs/{job_id}/events", headers=headers) as r,
            ):
                self.status_code = r.status_code
                self.content_type = r.headers.get("content-type", "")
                for event in parse_sse(r.iter_lines()):
                    self.events.put(event)
        finally:
            self.events.put(None)  # the stream ended

    def next(self, timeout: float = 60) -> dict[str, Any] | None:
        return self.events.get(timeout=timeout)

    def until(self, match: Callable[[dict[str, Any]], bool], timeout: float = 60) -> list[dict[str, Any]]:
        """Events up to and including the first that matches."""
        seen = []
        while True:
            e = self.next(timeout)
            assert e is not None, f"the stream ended before the expected event; saw {seen}"
            seen.append(e)
            if match(e):
                return seen

    def rest(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Every event until the stream ends (it must end)."""
        out = []
        while (e := self.next(timeout)) is not None:
            out.append(e)
        return out

    def join(self) -> None:
        self._thread.join(timeout=30)


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    event: dict[str, Any] = {}
    for line in lines:
        if not line:
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


def is_status(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "status" and e["data"]["status"] == status


def test_events_stream_status_queue_progress_and_the_end(gateway: RunningGateway, key: str) -> None:
    gateway.ready(SCHNELL, "w1")
    first = gateway.submit(key, {"prompt": "first", "model": SCHNELL}).json()["job_id"]
    job_id = gateway.submit(key, {"prompt": "mine", "model": SCHNELL}).json()["job_id"]
    stream = EventStream(gateway.url, key, job_id)
    opening = stream.until(lambda e: e["event"] == "queue" or "queue_position" in e["data"])
    assert opening[0]["event"] == "status" and opening[0]["data"]["status"] == "queued"
    assert opening[0]["data"]["queue_position"] == 1
    assert stream.content_type.startswith("text/event-stream")

    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=10)
    assert lease is not None and lease.job_id == first
    w.complete(first, lease.lease_token, png_bytes())
    # The job ahead finished: this one is next.
    stream.until(lambda e: e["event"] in ("queue", "status") and e["data"].get("queue_position") == 0)

    lease = w.lease(SCHNELL, "w1", wait_seconds=10)
    assert lease is not None and lease.job_id == job_id
    running = stream.until(is_status("running"))[-1]
    for step in (1, 2, 3):
        w.heartbeat(job_id, lease.lease_token, Progress(step=step, total_steps=4))
        progress = stream.until(lambda e: e["event"] == "progress")[-1]
        assert progress["data"] == {"step": step, "total_steps": 4}
        assert int(progress["id"]) > int(running["id"])
    w.complete(job_id, lease.lease_token, png_bytes())
    w.close()
    end = stream.until(is_status("succeeded"))[-1]
    assert end["data"]["result_url"] and end["data"]["job_id"] == job_id
    assert stream.rest() == []  # the stream closes after the final status
    stream.join()


def test_last_event_id_resumes_without_repeating(gateway: RunningGateway, key: str) -> None:
    gateway.ready(SCHNELL, "w1")
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=10)
    assert lease is not None
    w.heartbeat(job_id, lease.lease_token, Progress(step=2, total_steps=4))
    first = EventStream(gateway.url, key, job_id)
    seen = first.until(lambda e: e["event"] == "progress")
    assert seen[0]["data"]["status"] == "running"
    last_id = seen[-1]["id"]

    # Resuming at the last id: nothing is repeated; the next change comes.
    resumed = EventStream(gateway.url, key, job_id, last_event_id=last_id)
    w.heartbeat(job_id, lease.lease_token, Progress(step=3, total_steps=4))
    nxt = resumed.until(lambda e: e["event"] == "progress")
    # Step 2 is not repeated. (Had step 3 come before the stream read the job, the status
    # comes first: a resumed stream does not know which status its client saw.)
    assert [e["event"] for e in nxt] in (["progress"], ["status", "progress"])
    assert nxt[-1]["data"]["step"] == 3 and int(nxt[-1]["id"]) > int(last_id)
    w.complete(job_id, lease.lease_token, png_bytes())
    w.close()
    for s in (first, resumed):
        s.until(is_status("succeeded"))
        assert s.rest() == []


def test_events_of_a_finished_job_send_the_final_status_and_close(gateway: RunningGateway, key: str) -> None:
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    gateway.http.post(f"/v1/inference/jobs/{job_id}/cancel", headers=auth(key))
    stream = EventStream(gateway.url, key, job_id)
    events = stream.rest()
    assert [e["event"] for e in events] == ["status"] and events[0]["data"]["status"] == "cancelled"
    r = gateway.http.get("/v1/inference/jobs/nope/events", headers=auth(key))
    assert r.status_code == 404
    r = gateway.http.get(f"/v1/inference/jobs/{job_id}/events", headers=auth(gateway.key("other")))
    assert r.status_code == 404


def test_events_across_two_gateway_replicas(
    start_gateway: Callable[..., RunningGateway], database_url: str
) -> None:
    """The stream is served by replica B while the worker talks to replica A. On PostgreSQL
    B hears of each step through LISTEN/NOTIFY: its own re-check is set to once a minute,
    longer than the test may take, so only the notifications can bring the events in time."""
    a = start_gateway()
    b = start_gateway(poll_interval_seconds=60.0 if database_url.startswith("postgres") else 1.0)
    key = a.key()
    a.ready(SCHNELL, "w1")
    b.ready(SCHNELL, "w1")
    job_id = b.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    stream = EventStream(b.url, key, job_id)
    stream.until(is_status("queued"))
    w = a.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=10)
    assert lease is not None and lease.job_id == job_id
    stream.until(is_status("running"), timeout=30)
    for step in (1, 2):
        w.heartbeat(job_id, lease.lease_token, Progress(step=step, total_steps=2))
        assert stream.until(lambda e: e["event"] == "progress", timeout=30)[-1]["data"]["step"] == step
    w.complete(job_id, lease.lease_token, png_bytes())
    w.close()
    stream.until(is_status("succeeded"), timeout=30)
    assert stream.rest() == []
