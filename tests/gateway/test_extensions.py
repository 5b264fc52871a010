"""The API extensions of issue 14 against the running gateway, on SQLite and PostgreSQL:
job listing, Idempotency-Key, Prefer: wait, deadlines, low priority, queue position/ETA."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
import schemathesis
from remotegpu_base.protocol import Progress

from tests.gateway.conftest import DEV, SCHNELL, Clock, RunningGateway, auth, png_bytes
from tests.waiting import wait_for


def ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def submit(g: RunningGateway, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return g.http.post("/v1/inference/image", json=body, headers={**auth(key), **headers})


# ---- 8. job listing ----------------------------------------------------------------------


def test_listing_newest_first_filtered_and_paginated(gateway: RunningGateway, key: str) -> None:
    other = gateway.key("other")
    ids = [submit(gateway, key, {"prompt": f"p{i}", "model": SCHNELL}).json()["job_id"] for i in range(5)]
    dev_id = submit(gateway, key, {"prompt": "d", "model": DEV}).json()["job_id"]
    submit(gateway, other, {"prompt": "not mine", "model": SCHNELL})
    gateway.http.post(f"/v1/inference/jobs/{ids[0]}/cancel", headers=auth(key))

    r = gateway.http.get("/v1/inference/jobs", headers=auth(key))
    assert r.status_code == 200
    body = r.json()
    assert [j["job_id"] for j in body["jobs"]] == [dev_id, *reversed(ids)]  # newest first, only mine
    assert body["next_cursor"] is None
    assert {"job_id", "status", "model", "created_at", "result_url"} <= set(body["jobs"][0])

    # Pages of two: every job exactly once, in order.
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = gateway.http.get("/v1/inference/jobs", params=params, headers=auth(key)).json()
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [dev_id, *reversed(ids)]

    by_model = gateway.http.get("/v1/inference/jobs", params={"model": DEV}, headers=auth(key)).json()
    assert [j["job_id"] for j in by_model["jobs"]] == [dev_id]
    cancelled = gateway.http.get(
        "/v1/inference/jobs", params={"status": "cancelled"}, headers=auth(key)
    ).json()
    assert [j["job_id"] for j in cancelled["jobs"]] == [ids[0]]
    # No worker for either model: the waiting ones are warming, none queued.
    warming = gateway.http.get(
        "/v1/inference/jobs", params={"status": "warming,queued"}, headers=auth(key)
    ).json()
    assert {j["job_id"] for j in warming["jobs"]} == {dev_id, *ids[1:]}
    gateway.ready(SCHNELL)
    queued = gateway.http.get("/v1/inference/jobs", params={"status": "queued"}, headers=auth(key)).json()
    assert {j["job_id"] for j in queued["jobs"]} == set(ids[1:])


def test_listing_bad_input(gateway: RunningGateway, key: str) -> None:
    r = gateway.http.get("/v1/inference/jobs", params={"status": "done"}, headers=auth(key))
    assert r.status_code == 422 and r.json()["error"]["field"] == "status"
    r = gateway.http.get("/v1/inference/jobs", params={"cursor": "not-a-cursor"}, headers=auth(key))
    assert r.status_code == 422 and r.json()["error"]["field"] == "cursor"
    r = gateway.http.get("/v1/inference/jobs", params={"limit": 0}, headers=auth(key))
    assert r.status_code == 422
    assert gateway.http.get("/v1/inference/jobs").status_code == 401


# ---- 3. idempotency keys ------------------------------------------------------------------


def test_idempotency_key_returns_the_original_job(gateway: RunningGateway, key: str) -> None:
    body = {"prompt": "a cat", "model": SCHNELL}
    first = submit(gateway, key, body, **{"Idempotency-Key": "order-42"})
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = submit(gateway, key, body, **{"Idempotency-Key": "order-42"})
    assert again.status_code == 202 and again.json()["job_id"] == first.json()["job_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    listed = gateway.http.get("/v1/inference/jobs", headers=auth(key)).json()["jobs"]
    assert len(listed) == 1  # nothing was queued twice

    other = submit(gateway, key, {**body, "prompt": "a dog"}, **{"Idempotency-Key": "order-42"})
    assert other.status_code == 422
    assert other.json()["error"]["type"] == "idempotency_key_reused"
    assert other.json()["error"]["field"] == "Idempotency-Key"

    # Keys are per API key: another key's "order-42" is its own job.
    mine = submit(gateway, gateway.key("second"), body, **{"Idempotency-Key": "order-42"})
    assert mine.status_code == 202 and mine.json()["job_id"] != first.json()["job_id"]

    bad = submit(gateway, key, body, **{"Idempotency-Key": "x" * 256})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "Idempotency-Key"


def test_idempotency_key_expires_after_24_hours(gateway: RunningGateway, key: str, clock: Clock) -> None:
    body = {"prompt": "a cat", "model": SCHNELL}
    first = submit(gateway, key, body, **{"Idempotency-Key": "k"}).json()["job_id"]
    clock.advance(24 * 3600 + 1)
    second = submit(gateway, key, body, **{"Idempotency-Key": "k"})
    assert second.status_code == 202 and second.json()["job_id"] != first


def test_concurrent_submits_with_one_key_make_one_job(gateway: RunningGateway, key: str) -> None:
    body = {"prompt": "a cat", "model": SCHNELL}
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            answers.append(
                c.post("/v1/inference/image", json=body, headers={**auth(key), "Idempotency-Key": "race"})
            )

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert len(gateway.http.get("/v1/inference/jobs", headers=auth(key)).json()["jobs"]) == 1


# ---- 7. Prefer: wait ----------------------------------------------------------------------


def _run_next(g: RunningGateway, model: str, worker_id: str = "w1") -> str:
    """A worker takes the next job of `model` and completes it; returns its id."""
    w = g.worker()
    try:
        lease = w.lease(model, worker_id, wait_seconds=10)
        assert lease is not None
        w.complete(lease.job_id, lease.lease_token, png_bytes(512, 512))
        return lease.job_id
    finally:
        w.close()


def test_prefer_wait_answers_200_with_the_final_status(gateway: RunningGateway, key: str) -> None:
    gateway.ready(SCHNELL, "w1")
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(_run_next(gateway, SCHNELL)))
    worker.start()
    r = submit(gateway, key, {"prompt": "a cat", "model": SCHNELL}, Prefer="wait=30")
    worker.join()
    assert r.status_code == 200, r.text
    assert r.headers["Preference-Applied"] == "wait=30"
    body = r.json()
    assert body["status"] == "succeeded" and body["job_id"] == done[0]
    assert body["result_url"] and gateway.http.get(body["result_url"]).status_code == 200
    # The 200 is in the OpenAPI: the answer matches the schema documented for it.
    spec = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    spec["/v1/inference/image"]["POST"].validate_response(r)


def test_prefer_wait_times_out_into_the_usual_202(gateway: RunningGateway, key: str) -> None:
    r = submit(gateway, key, {"prompt": "a cat", "model": SCHNELL}, Prefer="wait=1")
    assert r.status_code == 202 and set(r.json()) == {"job_id", "job_type", "result_url"}
    assert r.headers["Preference-Applied"] == "wait=1"
    # A non-number is ignored (no wait, no Preference-Applied).
    r = submit(gateway, key, {"prompt": "b", "model": SCHNELL}, Prefer="respond-async, wait=abc")
    assert r.status_code == 202 and "Preference-Applied" not in r.headers
    # Above 60 s the wait is capped at 60 (a worker ends this one before that).
    worker = threading.Thread(target=lambda: [_run_next(gateway, SCHNELL) for _ in range(3)])
    worker.start()
    r = submit(gateway, key, {"prompt": "c", "model": SCHNELL}, Prefer="wait=600")
    worker.join()
    assert r.status_code == 200 and r.headers["Preference-Applied"] == "wait=60"


def test_the_openapi_documents_the_submit_extensions(gateway: RunningGateway) -> None:
    submit = gateway.http.get("/openapi.json").json()["paths"]["/v1/inference/image"]["post"]
    assert {"idempotency-key", "prefer"} <= {p["name"].lower() for p in submit["parameters"]}
    answers = submit["responses"]
    assert answers["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/EnqueueResponse")
    assert answers["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobStatusResponse")
    extension_headers = {"Idempotent-Replayed", "Preference-Applied", "RateLimit-Policy", "RateLimit"}
    assert extension_headers <= set(answers["200"]["headers"]) and extension_headers <= set(
        answers["202"]["headers"]
    )


# ---- 4. deadlines -------------------------------------------------------------------------


def test_deadline_cancels_a_waiting_and_a_running_job(
    gateway: RunningGateway, key: str, clock: Clock
) -> None:
    waiting = submit(gateway, key, {"prompt": "w", "model": DEV, "deadline_seconds": 60}).json()["job_id"]
    running = submit(gateway, key, {"prompt": "r", "model": SCHNELL, "deadline_seconds": 60}).json()["job_id"]
    safe = submit(gateway, key, {"prompt": "s", "model": SCHNELL, "deadline_seconds": 600}).json()["job_id"]
    gateway.ready(SCHNELL, "w1")
    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=10)
    assert lease is not None and lease.job_id == running
    for _ in range(2):  # the worker keeps its lease (30 s) while the deadline (60 s) nears
        clock.advance(25)
        w.heartbeat(running, lease.lease_token, Progress(step=1, total_steps=4))
    clock.advance(11)

    def status(job_id: str) -> dict[str, Any]:
        return dict(gateway.job(key, job_id).json())

    wait_for(lambda: status(waiting)["status"] == "cancelled" and status(running)["status"] == "cancelled")
    assert "deadline of 60s passed before it started" in status(waiting)["error_message"]
    assert "deadline of 60s passed while it was running" in status(running)["error_message"]
    assert status(safe)["status"] in ("queued", "warming")
    # The running job's worker learns it at its next heartbeat: the lease is gone.
    from remotegpu_base.protocol import LeaseLost

    try:
        w.heartbeat(running, lease.lease_token, Progress(step=1, total_steps=4))
        raise AssertionError("the heartbeat of a job past its deadline must fail")
    except LeaseLost:
        pass
    finally:
        w.close()


def test_deadline_must_be_a_positive_whole_number(gateway: RunningGateway, key: str) -> None:
    for bad in (0, -5, 1.5, "60", 10**9):
        r = submit(gateway, key, {"prompt": "a", "model": SCHNELL, "deadline_seconds": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "deadline_seconds", bad


# ---- 5. priority --------------------------------------------------------------------------


def test_low_priority_goes_after_normal_and_is_not_demand(gateway: RunningGateway, key: str) -> None:
    low = submit(gateway, key, {"prompt": "l", "model": SCHNELL, "priority": "low"}).json()["job_id"]
    normal = submit(gateway, key, {"prompt": "n", "model": SCHNELL}).json()["job_id"]
    # Nothing ready: the normal job is warming (demand), the low one only queued and not demand.
    assert gateway.job(key, low).json()["status"] == "queued"
    assert gateway.job(key, normal).json()["status"] == "warming"
    q = gateway.worker().queue().models[SCHNELL]
    assert (q.warming, q.queued, q.low_priority, q.depth) == (1, 0, 1, 1)
    # Nor is its work: the operator prices the waiting work of the normal job alone.
    entry = gateway.gw.catalog.get(SCHNELL)
    assert entry is not None
    one_job = entry.spec.parameters.default_step_megapixels()
    assert q.queued_step_megapixels == pytest.approx(one_job)
    metrics = gateway.http.get("/metrics").text
    assert 'remotegpu_queue_low_priority{model="' + SCHNELL + '"} 1.0' in metrics

    gateway.ready(SCHNELL, "w1")
    assert gateway.job(key, normal).json()["queue_position"] == 0
    assert gateway.job(key, low).json()["queue_position"] == 1
    assert _run_next(gateway, SCHNELL) == normal  # submitted later, taken first
    assert _run_next(gateway, SCHNELL) == low
    r = submit(gateway, key, {"prompt": "x", "model": SCHNELL, "priority": "urgent"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "priority"


# ---- 6. queue position and ETA -------------------------------------------------------------


def test_queue_position_and_eta_from_recent_run_times(
    gateway: RunningGateway, key: str, clock: Clock
) -> None:
    gateway.ready(SCHNELL, "w1")
    w = gateway.worker()
    # One finished job that ran 10 s (the clock moves, not the test).
    first = submit(gateway, key, {"prompt": "0", "model": SCHNELL}).json()["job_id"]
    lease = w.lease(SCHNELL, "w1", wait_seconds=10)
    assert lease is not None and lease.job_id == first
    clock.advance(10)
    w.complete(first, lease.lease_token, png_bytes(512, 512))
    done = gateway.job(key, first).json()
    assert not {"queue_position", "estimated_start_at"} & set(done)  # finished: no ETA fields

    gateway.gw._stats_cache = (0.0, {})  # the 2 s cache of run times: read them now
    ids = [submit(gateway, key, {"prompt": str(i), "model": SCHNELL}).json()["job_id"] for i in range(3)]
    lease = w.lease(SCHNELL, "w1", wait_seconds=10)  # the first of them runs, half done
    assert lease is not None and lease.job_id == ids[0]
    clock.advance(4)
    w.heartbeat(ids[0], lease.lease_token, Progress(step=2, total_steps=4))
    now = clock()
    running = gateway.job(key, ids[0]).json()
    assert running["queue_position"] is None
    assert abs(ts(running["estimated_completion_at"]) - (now + 4)) <= 1.5  # 4 s per 2 steps, 2 to go
    second, third = (gateway.job(key, i).json() for i in ids[1:])
    assert (second["queue_position"], third["queue_position"]) == (0, 1)
    assert abs(ts(second["estimated_start_at"]) - (now + 4)) <= 1.5
    assert abs(ts(second["estimated_completion_at"]) - (now + 14)) <= 1.5
    # To the millisecond: whole seconds would be off by half a second on average.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", second["estimated_completion_at"])
    assert abs(ts(third["estimated_start_at"]) - (now + 14)) <= 1.5
    w.close()


def test_eta_is_null_until_a_run_time_is_known(gateway: RunningGateway, key: str) -> None:
    job = submit(gateway, key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    st = gateway.job(key, job).json()
    assert st["queue_position"] == 0
    assert st["estimated_start_at"] is None and st["estimated_completion_at"] is None


def test_a_sleeping_model_expects_its_last_cold_start(
    gateway: RunningGateway, key: str, clock: Clock
) -> None:
    """With a run time and a cold start measured, a job on a sleeping model expects to start
    after about as long as that cold start took, and to run the model's run time."""
    from remotegpu_base.protocol import RuntimeState, WorkerStatus

    w = gateway.worker()
    first = submit(gateway, key, {"prompt": "0", "model": SCHNELL}).json()["job_id"]  # waits: a cold start
    w.report_status(WorkerStatus(worker_id="w1", model=SCHNELL, state=RuntimeState.STARTING))
    time.sleep(0.3)
    w.report_status(WorkerStatus(worker_id="w1", model=SCHNELL, state=RuntimeState.READY))
    took = gateway.gw.cold_starts.durations[SCHNELL]
    assert took >= 0.3
    lease = w.lease(SCHNELL, "w1", wait_seconds=10)
    assert lease is not None and lease.job_id == first
    clock.advance(10)
    w.complete(first, lease.lease_token, png_bytes(512, 512))
    w.report_status(WorkerStatus(worker_id="w1", model=SCHNELL, state=RuntimeState.SLEEPING))
    gateway.gw._stats_cache = (0.0, {})

    job = submit(gateway, key, {"prompt": "1", "model": SCHNELL}).json()["job_id"]
    now = clock()
    st = gateway.job(key, job).json()
    assert st["status"] == "warming" and st["queue_position"] == 0
    start, end = ts(st["estimated_start_at"]), ts(st["estimated_completion_at"])
    assert now - 1 <= start <= now + took + 1
    assert abs(end - start - 10) <= 1
    w.close()
