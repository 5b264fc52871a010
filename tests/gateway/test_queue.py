"""The per-model queue and leases: order, fencing, expiry, attempts, long-polls, worker auth."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from remotegpu_base.protocol import PREFIX, LeaseLost, RuntimeState, WorkerAPIClient, WorkerStatus

from tests.gateway.conftest import DEV, SCHNELL, Clock, RunningGateway, auth, png_bytes
from tests.waiting import wait_for


def submit_n(g: RunningGateway, key: str, model: str, n: int) -> list[str]:
    return [g.submit(key, {"prompt": f"p{i}", "model": model}).json()["job_id"] for i in range(n)]


def test_fifo_per_model(gateway: RunningGateway, key: str) -> None:
    a = submit_n(gateway, key, SCHNELL, 3)
    b = submit_n(gateway, key, DEV, 2)
    w = gateway.worker()
    got_b = [w.lease(DEV, "wd", wait_seconds=1) for _ in range(3)]
    got_a = [w.lease(SCHNELL, "ws", wait_seconds=1) for _ in range(4)]
    w.close()
    assert [x.job_id for x in got_b if x] == b and got_b[2] is None
    assert [x.job_id for x in got_a if x] == a and got_a[3] is None


def test_empty_lease_waits_then_204(gateway: RunningGateway) -> None:
    w = gateway.worker()
    t0 = time.monotonic()
    assert w.lease(SCHNELL, "w1", wait_seconds=0.5) is None
    assert 0.45 <= time.monotonic() - t0 < 30
    w.close()


def test_stale_lease_token_is_refused(start_gateway: Any, clock: Clock) -> None:
    g = start_gateway(lease_ttl_seconds=30)
    key = g.key()
    job_id = g.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w1, w2 = g.worker(), g.worker()
    first = w1.lease(SCHNELL, "w1", wait_seconds=5)
    assert first is not None
    # w1 goes silent past its TTL; the reaper puts the job back in the queue for w2, whose
    # own lease has the whole TTL ahead of it (the clock does not move again).
    clock.advance(31)
    second = w2.lease(SCHNELL, "w2", wait_seconds=30)
    assert second is not None and second.job_id == job_id and second.attempt == 2
    assert second.lease_token != first.lease_token
    for call in (
        lambda: w1.complete(job_id, first.lease_token, png_bytes(color=(1, 1, 1))),
        lambda: w1.heartbeat(job_id, first.lease_token),
        lambda: w1.fail(job_id, first.lease_token, "late"),
        lambda: w1.release(job_id, first.lease_token),
    ):
        with pytest.raises(LeaseLost):
            call()
    good = png_bytes(color=(2, 2, 2))
    w2.complete(job_id, second.lease_token, good)
    # And after completion the winner's token is spent too.
    with pytest.raises(LeaseLost):
        w1.complete(job_id, first.lease_token, png_bytes(color=(3, 3, 3)))
    w1.close()
    w2.close()
    st = g.job(key, job_id).json()
    assert st["status"] == "succeeded"
    assert httpx.get(st["result_url"]).content == good


def test_heartbeat_keeps_the_lease(start_gateway: Any, clock: Clock) -> None:
    g = start_gateway(lease_ttl_seconds=30)
    key = g.key()
    job_id = g.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = g.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert lease is not None
    for _ in range(4):  # 80 s, well past the TTL, with a heartbeat every 20 s
        clock.advance(20)
        w.heartbeat(job_id, lease.lease_token)
        assert g.gw.store.expire_leases() == []
    assert g.job(key, job_id).json()["status"] == "running"
    w.complete(job_id, lease.lease_token, png_bytes())
    w.close()
    assert g.job(key, job_id).json()["status"] == "succeeded"


def test_expired_leases_use_up_bounded_attempts(start_gateway: Any, clock: Clock) -> None:
    g = start_gateway(lease_ttl_seconds=30, max_attempts=2)
    key = g.key()
    job_id = g.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = g.worker()
    first = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert first is not None and first.attempt == 1
    clock.advance(31)
    second = w.lease(SCHNELL, "w1", wait_seconds=30)
    assert second is not None and second.attempt == 2
    clock.advance(31)
    wait_for(lambda: g.job(key, job_id).json()["status"] != "running", 30, "the second lease to expire")
    assert w.lease(SCHNELL, "w1", wait_seconds=0.5) is None
    w.close()
    st = g.job(key, job_id).json()
    assert st["status"] == "failed"
    assert "lease" in st["error_message"] and "attempt 2 of 2" in st["error_message"]


def test_retryable_failure_requeues_until_attempts_run_out(start_gateway: Any) -> None:
    g = start_gateway(max_attempts=3)
    key = g.key()
    job_id = g.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = g.worker()
    for attempt in (1, 2, 3):
        lease = w.lease(SCHNELL, "w1", wait_seconds=5)
        assert lease is not None and lease.attempt == attempt
        w.fail(job_id, lease.lease_token, "transient", retryable=True)
        expected = "failed" if attempt == 3 else "queued"  # its worker polls: ready
        assert g.job(key, job_id).json()["status"] == expected
    w.close()
    st = g.job(key, job_id).json()
    assert st["error_message"].startswith("transient") and "3 attempts" in st["error_message"]


def test_release_does_not_use_an_attempt(start_gateway: Any) -> None:
    g = start_gateway(max_attempts=1)
    key = g.key()
    job_id = g.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = g.worker()
    for _ in range(3):
        lease = w.lease(SCHNELL, "w1", wait_seconds=5)
        assert lease is not None and lease.attempt == 1
        w.release(job_id, lease.lease_token, "draining")
        st = g.job(key, job_id).json()
        assert st["status"] == "queued" and st["started_at"] is None and st["run_ms"] == 0
    w.close()


def test_concurrent_workers_never_share_a_job(gateway: RunningGateway, key: str) -> None:
    jobs = set(submit_n(gateway, key, SCHNELL, 40))
    leased: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        w = gateway.worker()
        while True:
            lease = w.lease(SCHNELL, f"w{i}", wait_seconds=0.3)
            if lease is None:
                break
            w.complete(lease.job_id, lease.lease_token, png_bytes(8, 8))
            with lock:
                leased.append(lease.job_id)
        w.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(leased) == sorted(jobs)
    assert all(gateway.job(key, j).json()["status"] == "succeeded" for j in jobs)


def test_lease_long_poll_wakes_on_submit(start_gateway: Any) -> None:
    # A 30 s fallback poll: only the submit's wake-up can make this fast.
    g = start_gateway(poll_interval_seconds=30)
    key = g.key()
    result: dict[str, Any] = {}

    def wait() -> None:
        w = g.worker()
        result["lease"] = w.lease(SCHNELL, "w1", wait_seconds=20)
        result["at"] = time.monotonic()
        w.close()

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.5)
    submitted = time.monotonic()
    job_id = g.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    t.join(timeout=25)
    assert result["lease"] is not None and result["lease"].job_id == job_id
    # Without the wake-up the poll would find it only after its 30 s fallback interval
    # (past the 20 s wait: no lease at all); 10 s is a margin a loaded machine meets.
    assert result["at"] - submitted < 10.0


def test_queue_long_poll_wakes_on_submit(start_gateway: Any) -> None:
    g = start_gateway(poll_interval_seconds=30)
    key = g.key()
    w = g.worker()
    snap = w.queue()
    assert snap.models[SCHNELL].depth == 0
    out: dict[str, Any] = {}

    def wait() -> None:
        c = g.worker()
        out["snap"] = c.queue(since=snap.version, wait_seconds=20)
        out["at"] = time.monotonic()
        c.close()

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.5)
    submitted = time.monotonic()
    g.submit(key, {"prompt": "a", "model": SCHNELL})
    t.join(timeout=25)
    assert out["at"] - submitted < 10.0  # the 20 s wait without the wake-up
    new = out["snap"]
    assert new.version > snap.version
    assert new.models[SCHNELL].warming == 1 and new.models[SCHNELL].queued == 0
    # Nothing changes: the long-poll returns after wait_seconds with the same version.
    t0 = time.monotonic()
    same = w.queue(since=new.version, wait_seconds=0.5)
    assert time.monotonic() - t0 >= 0.45 and same.version == new.version
    w.close()


def test_queue_snapshot_counts(gateway: RunningGateway, key: str) -> None:
    submit_n(gateway, key, SCHNELL, 3)
    submit_n(gateway, key, DEV, 2)
    w = gateway.worker()
    w.report_status(WorkerStatus(worker_id="wd", model=DEV, state=RuntimeState.READY))
    lease = w.lease(DEV, "wd", wait_seconds=2)
    assert lease is not None
    time.sleep(0.2)
    snap = w.queue()
    s, d = snap.models[SCHNELL], snap.models[DEV]
    assert (s.queued, s.warming, s.running) == (0, 3, 0)
    assert (d.queued, d.warming, d.running) == (1, 0, 1)
    assert s.oldest_wait_seconds >= 0.2 and d.depth == 2
    # Every catalog model is listed, also with an empty queue.
    assert snap.models["remotegpu/tiny-random-flux1"].depth == 0
    # The worker holding the lease is named, so the operator keeps its pod on scale-down.
    assert d.busy_workers == ["wd"] and s.busy_workers == []
    w.complete(lease.job_id, lease.lease_token, png_bytes(color=(3, 3, 3)))
    assert w.queue().models[DEV].busy_workers == []
    w.close()


def test_internal_api_needs_the_worker_token(gateway: RunningGateway, key: str) -> None:
    calls = [
        ("POST", "/lease", {"model": SCHNELL, "worker_id": "x", "wait_seconds": 0}),
        ("POST", "/jobs/j/heartbeat", {"lease_token": "t"}),
        ("POST", "/jobs/j/fail", {"lease_token": "t", "error_message": "e"}),
        ("POST", "/jobs/j/release", {"lease_token": "t"}),
        ("POST", "/jobs/j/complete", None),
        ("GET", "/queue", None),
        ("POST", "/workers/status", {"worker_id": "x", "model": SCHNELL, "state": "ready"}),
    ]
    for headers in ({}, auth("wrong-token"), auth(key)):
        for method, path, body in calls:
            r = gateway.http.request(method, PREFIX + path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
    bad = WorkerAPIClient(gateway.url, "nope")
    with pytest.raises(httpx.HTTPStatusError):
        bad.queue()
    bad.close()


def test_complete_requires_a_png(gateway: RunningGateway, key: str) -> None:
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=2)
    assert lease is not None
    with pytest.raises(httpx.HTTPStatusError) as e:
        w.complete(job_id, lease.lease_token, b"GIF89a not a png")
    assert e.value.response.status_code == 400
    w.complete(job_id, lease.lease_token, png_bytes())
    w.close()


@pytest.mark.postgres
def test_replicas_share_the_queue_and_wake_each_other(postgres_database_url: str, tmp_path: Any) -> None:
    """Two gateway replicas on one PostgreSQL: LISTEN/NOTIFY wakes long-polls on the other one."""
    from remotegpu_gateway.settings import Settings

    from tests.gateway.conftest import WORKER_TOKEN

    def settings(name: str) -> Settings:
        return Settings(
            database_url=postgres_database_url,
            data_dir=tmp_path / name,
            results_dir=tmp_path / "shared-results",  # a volume both replicas mount
            worker_token=WORKER_TOKEN,
            poll_interval_seconds=30,  # only NOTIFY can make the wake-ups below fast
        )

    a, b = RunningGateway(settings("a")), RunningGateway(settings("b"))
    try:
        key = a.key()
        out: dict[str, Any] = {}

        def lease_on_b() -> None:
            w = b.worker()
            out["lease"] = w.lease(SCHNELL, "wb", wait_seconds=20)
            out["lease_at"] = time.monotonic()
            w.close()

        def queue_on_b() -> None:
            # Woken by the first change after `since`: under load that can still be the
            # lease poll's ready mark, so it waits again until the submit shows.
            w = b.worker()
            since, deadline = b.gw.notifier.version, time.monotonic() + 20
            while True:
                snap = w.queue(since=since, wait_seconds=max(0.0, deadline - time.monotonic()))
                if snap.models[SCHNELL].depth == 1 or time.monotonic() >= deadline:
                    break
                since = snap.version
            out["snap"], out["snap_at"] = snap, time.monotonic()
            w.close()

        threads = [threading.Thread(target=lease_on_b), threading.Thread(target=queue_on_b)]
        threads[0].start()
        time.sleep(0.5)  # the lease poll marks B's worker ready (a version bump) before we read it
        threads[1].start()
        time.sleep(0.5)
        submitted = time.monotonic()
        job_id = a.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
        for t in threads:
            t.join(timeout=25)
        assert out["lease"] is not None and out["lease"].job_id == job_id
        # Without NOTIFY both would wait out their 20 s (the 30 s fallback poll is longer).
        assert out["snap"].models[SCHNELL].depth == 1
        assert out["lease_at"] - submitted < 10.0 and out["snap_at"] - submitted < 10.0
        # The worker completes through B; the owner reads the result through A.
        w = b.worker()
        w.complete(job_id, out["lease"].lease_token, png_bytes(8, 8))
        w.close()
        st = a.job(key, job_id).json()
        assert st["status"] == "succeeded"
        assert httpx.get(st["result_url"]).status_code == 200
    finally:
        a.stop()
        b.stop()


def test_queue_snapshot_prices_the_normal_jobs_in_steps_times_megapixels(
    gateway: RunningGateway, key: str
) -> None:
    """The operator sizes capacity from the queued work, so a 1024² job at 4 steps weighs
    eight times a 512² one at 2 steps; low-priority jobs are not demand and weigh nothing."""
    big = {"prompt": "big", "model": SCHNELL, "steps": 4, "size": {"width": 1024, "height": 1024}}
    small = {"prompt": "small", "model": SCHNELL, "steps": 2, "size": {"width": 512, "height": 512}}
    low = {**big, "priority": "low"}
    for body in (big, small, low):
        assert gateway.submit(key, body).status_code == 202
    w = gateway.worker()
    q = w.queue().models[SCHNELL]
    assert q.queued_step_megapixels == pytest.approx(4 * 1.048576 + 2 * 0.262144)
    assert q.depth == 2 and q.low_priority == 1
    w.close()
