"""The cold-start timeline of a job (extension): GET /v1/inference/jobs/{id}/timeline.

The phases come in as they do in a cluster: the operator reports the pod's, the worker
its own, the gateway records the first lease. Times are the gateway's clock plus offsets,
so nothing depends on how fast this machine runs."""

from __future__ import annotations

import json
from typing import Any

from remotegpu_base.protocol import (
    COLD_START_PHASES,
    ColdStartPhase,
    RuntimeState,
    WorkerPhases,
    WorkerStatus,
)

from tests.gateway.conftest import SCHNELL, Clock, RunningGateway, _closing, auth
from tests.waiting import wait_for

P = ColdStartPhase


def submit(g: RunningGateway, key: str) -> str:
    r = g.submit(key, {"prompt": "a lighthouse", "model": SCHNELL})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def timeline(g: RunningGateway, key: str, job_id: str, code: int = 200) -> dict[str, Any]:
    r = g.http.get(f"/v1/inference/jobs/{job_id}/timeline", headers=auth(key))
    assert r.status_code == code, r.text
    return dict(r.json())


def metric(g: RunningGateway, phase: str) -> float:
    text = g.http.get("/metrics").text
    prefix = f'remotegpu_cold_start_phase_seconds_count{{model="{SCHNELL}",phase="{phase}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_cold_job_shows_every_phase_in_order_and_a_warm_one_none(
    gateway: RunningGateway, key: str, clock: Clock
):
    g = gateway
    t0 = g.gw.clock()
    job = submit(g, key)
    assert g.job(key, job).json()["status"] == "warming"
    before = timeline(g, key, job)
    assert before["waited_for_capacity"] is None and before["phases"] == []
    pod = "schnell-worker-abc12"
    with _closing(g.worker()) as w:
        # the operator: its scale decision and the pod's status (second resolution)
        w.report_phases(
            WorkerPhases(
                worker_id=pod,
                model=SCHNELL,
                phases={P.SCALE_DECISION: t0 + 0.5, P.POD_SCHEDULED: t0 + 1, P.CONTAINER_STARTED: t0 + 2},
            )
        )
        # the worker: fetched the weights (a cold node cache), loaded, warmed
        clock.advance(13)
        w.report_phases(
            WorkerPhases(
                worker_id=pod,
                model=SCHNELL,
                phases={
                    P.WEIGHTS_FETCHED: t0 + 9,
                    P.PROCESS_STARTED: t0 + 9.2,
                    P.WEIGHTS_LOADED: t0 + 12,
                    P.WARMED: g.gw.clock(),
                },
            )
        )
        w.report_status(WorkerStatus(worker_id=pod, model=SCHNELL, state=RuntimeState.READY))
        lease = w.lease(SCHNELL, pod, wait_seconds=5)
        assert lease is not None and lease.job_id == job
        t = timeline(g, key, job)
        assert t["waited_for_capacity"] is True and t["worker_id"] == pod and t["weights_cached"] is False
        assert [p["phase"] for p in t["phases"]] == [p.value for p in COLD_START_PHASES]
        phases = {p["phase"]: p for p in t["phases"]}
        assert phases["scale_decision"]["seconds"] is None
        assert phases["pod_scheduled"]["seconds"] == 0.5
        assert phases["weights_fetched"]["seconds"] == 7.0
        assert phases["weights_loaded"]["seconds"] == 2.8
        assert 0 < phases["scale_decision"]["since_submit_seconds"] <= 0.5  # t0 was just before the submit
        ats = [p["at"] for p in t["phases"]]
        assert ats == sorted(ats)
        # the seed's job status is unchanged: no timeline fields in it
        assert set(g.job(key, job).json()) == {
            "job_id", "job_type", "model", "status", "created_at", "updated_at", "started_at",
            "completed_at", "wait_ms", "run_ms", "result_url", "error_message", "queue_position",
            "estimated_start_at", "estimated_completion_at",
        }  # fmt: skip
        w.complete(job, lease.lease_token, _png())
        # every phase after the first is in the histogram once
        for phase in COLD_START_PHASES[1:]:
            assert metric(g, phase.value) == 1, phase
        # a job submitted while the worker was ready did not wait: no phases
        warm = submit(g, key)
        lease = w.lease(SCHNELL, pod, wait_seconds=5)
        assert lease is not None and lease.job_id == warm
        t = timeline(g, key, warm)
        assert t["waited_for_capacity"] is False and t["phases"] == [] and t["worker_id"] == pod
        w.complete(warm, lease.lease_token, _png())
    assert metric(g, "first_lease") == 1  # a worker's later leases are not cold starts


def test_a_second_worker_with_a_cached_node_has_no_fetch_phase(gateway: RunningGateway, key: str):
    g = gateway
    job = submit(g, key)
    t0 = g.gw.clock()
    pod = "schnell-worker-def34"
    with _closing(g.worker()) as w:
        w.report_phases(
            WorkerPhases(
                worker_id=pod,
                model=SCHNELL,
                phases={P.PROCESS_STARTED: t0, P.WEIGHTS_LOADED: t0 + 1, P.WARMED: t0 + 1.5},
            )
        )
        lease = w.lease(SCHNELL, pod, wait_seconds=5)
        assert lease is not None
        t = timeline(g, key, job)
        assert t["weights_cached"] is True
        assert [p["phase"] for p in t["phases"]] == [
            "process_started",
            "weights_loaded",
            "warmed",
            "first_lease",
        ]
        # the operator's report may come after the lease: the timeline fills in
        w.report_phases(WorkerPhases(worker_id=pod, model=SCHNELL, phases={P.CONTAINER_STARTED: t0 - 0.4}))
        t = timeline(g, key, job)
        assert t["phases"][0]["phase"] == "container_started"
        w.complete(job, lease.lease_token, _png())


def test_the_timeline_follows_the_jobs_auth_rules(gateway: RunningGateway, key: str):
    g = gateway
    job = submit(g, key)
    other = g.key("other")
    r = g.http.get(f"/v1/inference/jobs/{job}/timeline", headers=auth(other))
    assert r.status_code == 404
    r = g.http.get(f"/v1/inference/jobs/{job}/timeline")
    assert r.status_code == 401
    admin_only = g.key("admin", ["admin"])
    r = g.http.get(f"/v1/inference/jobs/{job}/timeline", headers=auth(admin_only))
    assert r.status_code == 403
    r = g.http.get("/v1/inference/jobs/nope/timeline", headers=auth(key))
    assert r.status_code == 404
    spec = g.http.get("/openapi.json").json()
    assert "/v1/inference/jobs/{job_id}/timeline" in spec["paths"]


def test_bad_phase_reports_are_refused(gateway: RunningGateway):
    r = gateway.http.post(
        "/internal/v1/workers/phases",
        json={"worker_id": "w", "model": SCHNELL, "phases": {"teleported": 1.0}},
        headers=auth("test-worker-token"),
    )
    assert r.status_code == 422
    r = gateway.http.post(
        "/internal/v1/workers/phases",
        json={"worker_id": "w", "model": SCHNELL, "phases": {"warmed": 1.0}},
        headers=auth("wrong-token"),
    )
    assert r.status_code == 401


def _png() -> bytes:
    from tests.gateway.conftest import png_bytes

    return png_bytes()


def test_remotegpu_jobs_timeline_prints_the_phases(gateway: RunningGateway, key: str):
    from tests.gateway.test_cli_extensions import cli

    g = gateway
    job = submit(g, key)
    r = cli(g, key, "jobs", "timeline", job)
    assert r.returncode == 0 and "has not run yet" in r.stdout, r.stderr
    t0 = g.gw.clock()
    with _closing(g.worker()) as w:
        w.report_phases(
            WorkerPhases(
                worker_id="pod-1",
                model=SCHNELL,
                phases={P.CONTAINER_STARTED: t0, P.PROCESS_STARTED: t0 + 0.25, P.WEIGHTS_LOADED: t0 + 0.5},
            )
        )
        lease = w.lease(SCHNELL, "pod-1", wait_seconds=5)
        assert lease is not None
        r = cli(g, key, "jobs", "timeline", job)
        assert r.returncode == 0, r.stderr
        assert "waited for worker pod-1 (weights cached on the node)" in r.stdout
        lines = r.stdout.splitlines()
        assert [line.split()[0] for line in lines[2:]] == [
            "container_started", "process_started", "weights_loaded", "first_lease",
        ]  # fmt: skip
        assert "0.250s" in lines[3]
        r = cli(g, key, "jobs", "timeline", job, "--json")
        assert json.loads(r.stdout)["worker_id"] == "pod-1"
        w.complete(job, lease.lease_token, _png())
    r = cli(g, g.key("other"), "jobs", "timeline", job)
    assert r.returncode == 2 and "404" in r.stderr or "no job" in r.stderr


def test_cold_starts_go_with_the_jobs_after_the_retention(start_gateway, clock: Clock):
    g = start_gateway(retention_seconds=2.0, purge_interval_seconds=0.2)
    key = g.key()
    job = submit(g, key)
    with _closing(g.worker()) as w:
        w.report_phases(WorkerPhases(worker_id="old-pod", model=SCHNELL, phases={P.WARMED: g.gw.clock()}))
        lease = w.lease(SCHNELL, "old-pod", wait_seconds=5)
        assert lease is not None
        w.complete(job, lease.lease_token, _png())
    assert g.gw.store.worker_start("old-pod") is not None
    clock.advance(3)
    wait_for(lambda: g.job(key, job).status_code == 404, 20, "the finished job to be deleted")
    assert timeline(g, key, job, 404)
    assert g.gw.store.worker_start("old-pod") is None
