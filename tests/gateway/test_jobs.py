"""Job lifecycle through the public API and the worker protocol: status, timing, results, cancel."""

from __future__ import annotations

import time
from datetime import datetime
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from remotegpu_base.protocol import HeartbeatAction, LeaseLost, Progress, RuntimeState, WorkerStatus

from tests.gateway.conftest import DEV, SCHNELL, RunningGateway, auth, png_bytes
from tests.waiting import wait_for

JOB_FIELDS = {
    "job_id",
    "job_type",
    "model",
    "status",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "wait_ms",
    "run_ms",
    "result_url",
    "error_message",
}
# Extension fields (issue 14), present while the job has not finished.
ETA_FIELDS = {"queue_position", "estimated_start_at", "estimated_completion_at"}


def parse_ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def test_enqueue_response(gateway: RunningGateway, key: str) -> None:
    r = gateway.submit(key, {"prompt": "a cat", "model": SCHNELL})
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"job_id", "job_type", "result_url"}
    assert body["job_type"] == "image"
    url = urlparse(body["result_url"])
    assert url.scheme == "http" and url.netloc == f"127.0.0.1:{gateway.port}"
    assert url.path == f"/v1/inference/jobs/{body['job_id']}/result"


def test_public_url_is_used_for_result_url(start_gateway: object) -> None:
    g = start_gateway(public_url="https://images.example.com")  # type: ignore[operator]
    r = g.submit(g.key(), {"prompt": "a", "model": SCHNELL})
    assert r.json()["result_url"].startswith("https://images.example.com/v1/inference/jobs/")


def test_full_lifecycle_and_timing(gateway: RunningGateway, key: str) -> None:
    job_id = gateway.submit(key, {"prompt": "a cat", "model": SCHNELL}).json()["job_id"]
    # No worker for the model: warming.
    st = gateway.job(key, job_id).json()
    assert set(st) == JOB_FIELDS | ETA_FIELDS
    assert st["status"] == "warming" and st["run_ms"] == 0 and st["result_url"] is None
    assert st["started_at"] is None and st["completed_at"] is None and st["error_message"] is None
    assert st["model"] == SCHNELL and st["job_type"] == "image"
    # A worker reports ready: the same pending job is now queued.
    w = gateway.worker()
    w.report_status(WorkerStatus(worker_id="w1", model=SCHNELL, state=RuntimeState.READY))
    assert gateway.job(key, job_id).json()["status"] == "queued"
    time.sleep(0.3)
    lease = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert lease is not None and lease.job_id == job_id and lease.attempt == 1
    st = gateway.job(key, job_id).json()
    assert st["status"] == "running" and st["started_at"] is not None
    assert st["wait_ms"] >= 250
    time.sleep(0.3)
    reply = w.heartbeat(job_id, lease.lease_token, Progress(step=2, total_steps=4))
    assert reply.action == HeartbeatAction.CONTINUE
    st = gateway.job(key, job_id).json()
    assert st["run_ms"] >= 250 and st["result_url"] is None
    wait_while_running = st["wait_ms"]
    png = png_bytes(512, 512)
    w.complete(job_id, lease.lease_token, png)
    w.close()
    st = gateway.job(key, job_id).json()
    assert st["status"] == "succeeded" and st["error_message"] is None
    assert st["wait_ms"] == wait_while_running  # frozen once running
    created, started, completed = (parse_ts(st[k]) for k in ("created_at", "started_at", "completed_at"))
    assert created <= started <= completed
    assert abs(st["wait_ms"] - (started - created).total_seconds() * 1000) <= 1000
    assert st["run_ms"] >= 250
    # The result URL works without any key, exactly as given.
    r = httpx.get(st["result_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png


def test_result_access(gateway: RunningGateway, key: str) -> None:
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    enqueue_url = gateway.job(key, job_id).json()["result_url"]
    assert enqueue_url is None
    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert lease is not None
    path = f"/v1/inference/jobs/{job_id}/result"
    # Before success: the owner is told it is not ready.
    assert gateway.http.get(path, headers=auth(key)).status_code == 409
    w.complete(job_id, lease.lease_token, png_bytes())
    w.close()
    url = gateway.job(key, job_id).json()["result_url"]
    q = parse_qs(urlparse(url).query)
    # Owner's key without a signature.
    assert gateway.http.get(path, headers=auth(key)).status_code == 200
    # Another key: 404, as if it did not exist.
    other = gateway.key("other")
    assert gateway.http.get(path, headers=auth(other)).status_code == 404
    # No credentials / tampered / expired signature: 401.
    assert gateway.http.get(path).status_code == 401
    bad = q["signature"][0][:-2] + ("AA" if not q["signature"][0].endswith("AA") else "BB")
    assert gateway.http.get(path, params={"expires": q["expires"][0], "signature": bad}).status_code == 401
    past = int(time.time()) - 10
    sig = gateway.gw.signer.signature(job_id, past)
    assert gateway.http.get(path, params={"expires": past, "signature": sig}).status_code == 401
    # A signature for one job does not open another.
    job2 = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    r = gateway.http.get(
        f"/v1/inference/jobs/{job2}/result",
        params={"expires": q["expires"][0], "signature": q["signature"][0]},
    )
    assert r.status_code == 401


def test_owner_isolation(gateway: RunningGateway, key: str) -> None:
    other = gateway.key("other")
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    assert gateway.job(key, job_id).status_code == 200
    r = gateway.job(other, job_id)
    assert r.status_code == 404 and r.json()["error"]["field"] == "job_id"
    assert gateway.http.post(f"/v1/inference/jobs/{job_id}/cancel", headers=auth(other)).status_code == 404
    assert gateway.job(key, job_id).json()["status"] == "warming"  # the other key's cancel did nothing
    assert gateway.job(key, "no-such-job").status_code == 404


def test_job_status_needs_an_inference_key(gateway: RunningGateway, key: str) -> None:
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    assert gateway.http.get(f"/v1/inference/jobs/{job_id}").status_code == 401
    admin_only = gateway.key("admin", ["admin"])
    assert gateway.job(admin_only, job_id).status_code == 403


def cancel(g: RunningGateway, key: str, job_id: str) -> httpx.Response:
    return g.http.post(f"/v1/inference/jobs/{job_id}/cancel", headers=auth(key))


def test_cancel_pending_is_immediate(gateway: RunningGateway, key: str) -> None:
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    r = cancel(gateway, key, job_id)
    assert r.status_code == 200
    body = r.json()
    assert (
        body["status"] == "cancelled" and body["cancel"] == "cancelled" and body["completed_at"] is not None
    )
    assert body["run_ms"] == 0
    # A cancelled job is never leased.
    w = gateway.worker()
    assert w.lease(SCHNELL, "w1", wait_seconds=0.2) is None
    w.close()
    # Cancelling again changes nothing, and says so.
    again = cancel(gateway, key, job_id)
    assert again.status_code == 200 and again.json()["cancel"] == "already_cancelled"
    assert again.json()["completed_at"] == body["completed_at"]


def test_cancel_queued_with_ready_worker(gateway: RunningGateway, key: str) -> None:
    gateway.ready(SCHNELL)
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    assert gateway.job(key, job_id).json()["status"] == "queued"
    assert cancel(gateway, key, job_id).json()["status"] == "cancelled"


@pytest.mark.parametrize("worker_ends_with", ["fail", "release", "complete", "lease expiry"])
def test_cancel_running_is_done_by_the_worker(start_gateway: object, worker_ends_with: str) -> None:
    # Short enough for the expiry case to end soon, long enough that a loaded machine's slow
    # cancel request cannot let the lease lapse before the heartbeat (1 s could, on 2 busy cores).
    g = start_gateway(lease_ttl_seconds=4.0)  # type: ignore[operator]
    key = g.key()
    job_id = g.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = g.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert lease is not None
    r = cancel(g, key, job_id)
    assert r.status_code == 200
    assert r.json()["cancel"] == "requested" and r.json()["status"] == "running"
    assert w.heartbeat(job_id, lease.lease_token).action == HeartbeatAction.CANCEL
    if worker_ends_with == "fail":
        w.fail(job_id, lease.lease_token, "cancelled at step 2")
    elif worker_ends_with == "release":
        w.release(job_id, lease.lease_token, "cancelled")
    elif worker_ends_with == "complete":
        w.complete(job_id, lease.lease_token, png_bytes())
    else:
        wait_for(lambda: g.job(key, job_id).json()["status"] != "running", 60, "the lease to expire")
    w.close()
    st = g.job(key, job_id).json()
    assert st["status"] == "cancelled" and st["result_url"] is None and st["completed_at"] is not None
    assert st["run_ms"] > 0


def test_cancel_finished_changes_nothing(gateway: RunningGateway, key: str) -> None:
    ok = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    bad = gateway.submit(key, {"prompt": "b", "model": SCHNELL}).json()["job_id"]
    w = gateway.worker()
    l1 = w.lease(SCHNELL, "w1", wait_seconds=5)
    l2 = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert l1 is not None and l2 is not None and {l1.job_id, l2.job_id} == {ok, bad}
    w.complete(ok, (l1 if l1.job_id == ok else l2).lease_token, png_bytes())
    w.fail(bad, (l1 if l1.job_id == bad else l2).lease_token, "out of memory")
    w.close()
    for job_id, status in ((ok, "succeeded"), (bad, "failed")):
        r = cancel(gateway, key, job_id)
        assert r.status_code == 409
        assert status in r.json()["error"]["message"] and "changes nothing" in r.json()["error"]["message"]
        assert gateway.job(key, job_id).json()["status"] == status
    st = gateway.job(key, bad).json()
    assert st["error_message"] == "out of memory" and st["result_url"] is None


def test_failed_job_reports_error(gateway: RunningGateway, key: str) -> None:
    job_id = gateway.submit(key, {"prompt": "a", "model": DEV}).json()["job_id"]
    w = gateway.worker()
    lease = w.lease(DEV, "w1", wait_seconds=5)
    assert lease is not None
    w.fail(job_id, lease.lease_token, "CUDA out of memory")
    with pytest.raises(LeaseLost):
        w.heartbeat(job_id, lease.lease_token)
    w.close()
    st = gateway.job(key, job_id).json()
    assert st["status"] == "failed" and st["error_message"] == "CUDA out of memory"


def test_nul_characters_are_handled_alike_on_both_backends(gateway: RunningGateway, key: str) -> None:
    """PostgreSQL text cannot hold NUL (fuzzing found this): lookups miss, stored text is cleaned."""
    assert gateway.job(key, "a%00b").status_code == 404
    assert gateway.http.post("/v1/inference/jobs/%00/cancel", headers=auth(key)).status_code == 404
    admin = gateway.key("admin", ["admin"])
    r = gateway.http.post("/v1/admin/keys", json={"name": "x\x00y"}, headers=auth(admin))
    assert r.status_code == 201 and r.json()["name"] == "x\ufffdy"
    assert gateway.http.post("/v1/admin/keys/k%00/revoke", headers=auth(admin)).status_code == 404
    job_id = gateway.submit(key, {"prompt": "nul \x00 in prompt", "model": SCHNELL}).json()["job_id"]
    w = gateway.worker()
    assert w.lease("bad\x00model", "w1", wait_seconds=0) is None
    lease = w.lease(SCHNELL, "w\x001", wait_seconds=2)
    assert lease is not None and lease.job_id == job_id and lease.request.prompt == "nul \x00 in prompt"
    w.fail(job_id, lease.lease_token, "error \x00 text")
    w.close()
    assert gateway.job(key, job_id).json()["error_message"] == "error \ufffd text"
