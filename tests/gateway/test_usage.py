"""Usage metering against the running gateway (SQLite and PostgreSQL): the figures match
the jobs run, by model and by UTC day, through the admin API, the CLI and the metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import DEV, SCHNELL, Clock, RunningGateway, auth, png_bytes

ROOT = Path(__file__).resolve().parents[2]


class FrozenClock(Clock):
    """Moves only when the test says: run times are exactly what the test ran."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.time()

    def __call__(self) -> float:
        return self.start + self.offset


@pytest.fixture
def clock() -> Clock:
    return FrozenClock()


def run_job(
    g: RunningGateway, token: str, model: str, seconds: float, clock: Clock, end: str = "complete"
) -> str:
    """Submits a job, leases it and ends it (`complete`, `fail` or `cancel`) after `seconds` of run time."""
    job_id = g.submit(token, {"model": model, "prompt": "x"}).json()["job_id"]
    w = g.worker()
    try:
        lease = w.lease(model, "w1", wait_seconds=5)
        assert lease is not None and lease.job_id == job_id
        clock.advance(seconds)
        if end == "complete":
            w.complete(job_id, lease.lease_token, png_bytes())
        elif end == "fail":
            w.fail(job_id, lease.lease_token, "bad input: nope")
        else:
            assert g.http.post(f"/v1/inference/jobs/{job_id}/cancel", headers=auth(token)).status_code == 200
            w.release(job_id, lease.lease_token, reason="cancelled by its owner")
    finally:
        w.close()
    job = g.job(token, job_id).json()
    assert job["run_ms"] == round(seconds * 1000), job
    return job_id


def usage(g: RunningGateway, key_id: str, **params: str) -> dict[str, Any]:
    r = g.http.get(f"/v1/admin/keys/{key_id}/usage", params=params, headers=auth(g.key("adm", ["admin"])))
    assert r.status_code == 200, r.text
    return r.json()["keys"][0]  # type: ignore[no-any-return]


def day(clock: Clock) -> str:
    return datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%d")


def test_usage_matches_the_jobs_run(
    start_gateway: Callable[..., RunningGateway], clock: Clock, database_url: str, tmp_path: Path
) -> None:
    a = start_gateway()
    b = start_gateway()  # jobs finish through both replicas; the usage is one
    key, token = a.gw.store.create_key("team-a", ["inference"])
    other = a.key("team-b")
    clock.advance(86400 - clock() % 86400 + 3600)  # 01:00 UTC of a day
    first_day = day(clock)
    run_job(a, token, SCHNELL, 2.5, clock)
    run_job(b, token, SCHNELL, 1.5, clock)
    run_job(a, token, DEV, 10.0, clock, end="fail")
    run_job(b, token, DEV, 4.0, clock, end="cancel")
    run_job(a, other, SCHNELL, 7.0, clock)  # another key's job is not this key's usage
    queued = a.submit(token, {"model": SCHNELL, "prompt": "x"}).json()["job_id"]
    assert (
        a.http.post(f"/v1/inference/jobs/{queued}/cancel", headers=auth(token)).json()["cancel"]
        == "cancelled"
    )
    clock.advance(86400)
    second_day = day(clock)
    run_job(b, token, SCHNELL, 3.0, clock)
    a.submit(token, {"model": SCHNELL, "prompt": "unfinished"})  # not metered until it ends

    u = usage(a, key.id)
    assert u["key_id"] == key.id
    assert u["total"] == {"jobs": 6, "succeeded": 3, "failed": 1, "cancelled": 2, "gpu_seconds": 21.0}
    models = {m["model"]: m for m in u["by_model"]}
    assert models[SCHNELL] == {
        "model": SCHNELL,
        "jobs": 4,
        "succeeded": 3,
        "failed": 0,
        "cancelled": 1,
        "gpu_seconds": 7.0,
    }
    assert models[DEV] == {
        "model": DEV,
        "jobs": 2,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 1,
        "gpu_seconds": 14.0,
    }
    days = {(d["day"], d["model"]): (d["jobs"], d["gpu_seconds"]) for d in u["by_day"]}
    assert days == {
        (first_day, SCHNELL): (3, 4.0),
        (first_day, DEV): (2, 14.0),
        (second_day, SCHNELL): (1, 3.0),
    }
    only_second = usage(b, key.id, since=second_day)
    assert only_second["total"]["jobs"] == 1 and only_second["total"]["gpu_seconds"] == 3.0
    assert usage(a, key.id, until=first_day)["total"]["gpu_seconds"] == 18.0

    everyone = a.http.get("/v1/admin/usage", headers=auth(a.key("adm", ["admin"]))).json()
    totals = {k["key_id"]: k["total"]["gpu_seconds"] for k in everyone["keys"]}
    assert totals[key.id] == 21.0 and sum(totals.values()) == 28.0

    # The metrics, summed over both replicas.
    def metric(g: RunningGateway, line: str) -> float:
        for row in g.http.get("/metrics").text.splitlines():
            if row.startswith(line):
                return float(row.rsplit(" ", 1)[1])
        return 0.0

    gpu = f'remotegpu_key_gpu_seconds_total{{key="{key.id}",model="{SCHNELL}"}}'
    assert metric(a, gpu) + metric(b, gpu) == 7.0
    ok = f'remotegpu_key_jobs_total{{key="{key.id}",model="{SCHNELL}",status="succeeded"}}'
    assert metric(a, ok) + metric(b, ok) == 3.0

    # The CLI reads the same database.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "remotegpu.cli",
            "keys",
            "usage",
            "team-a",
            "--database-url",
            database_url,
            "--data-dir",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(first_day) and DEV in line and line.split()[-1] == "14.0" for line in lines), (
        out.stdout
    )
    assert lines[-1].split() == ["total", "6", "3", "1", "2", "21.0"], out.stdout


def test_a_job_ended_without_its_replica_metering_it_is_metered_by_the_sweep(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    # The background reaper waits an hour: only the test's own sweep meters (the reaper's first
    # round, late on a loaded machine, would otherwise meter the job before the first check).
    gateway = start_gateway(reaper_interval_seconds=3600)
    key, token = gateway.gw.store.create_key("k", ["inference"])
    job_id = gateway.submit(token, {"model": SCHNELL, "prompt": "x"}).json()["job_id"]
    store = gateway.gw.store
    lease = store.lease(SCHNELL, "w1", 30)
    assert lease is not None
    clock.advance(5)
    store.complete(
        job_id, lease.lease_token or "", "results/none.png"
    )  # no HTTP hook: as if the replica died
    assert usage(gateway, key.id)["total"]["jobs"] == 0
    gateway.gw.reap(sweep=True)
    assert usage(gateway, key.id)["total"] == {
        "jobs": 1,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 0,
        "gpu_seconds": 5.0,
    }
    gateway.gw.reap(sweep=True)  # metered once
    assert usage(gateway, key.id)["total"]["jobs"] == 1


def test_usage_outlives_the_retention_of_jobs(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    import anyio

    g = start_gateway(retention_seconds=3600)
    key, token = g.gw.store.create_key("k", ["inference"])
    job_id = run_job(g, token, SCHNELL, 2.0, clock)
    clock.advance(7200)
    assert anyio.run(g.gw.purge) == 1
    assert g.job(token, job_id).status_code == 404
    assert usage(g, key.id)["total"]["gpu_seconds"] == 2.0


def test_jobs_that_never_ran_count_no_gpu_seconds(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    g = start_gateway(start_timeout_seconds=60)
    key, token = g.gw.store.create_key("k", ["inference"])
    job_id = g.submit(token, {"model": SCHNELL, "prompt": "x"}).json()["job_id"]
    clock.advance(120)
    g.gw.reap(sweep=True)
    assert g.job(token, job_id).json()["status"] == "failed"
    assert usage(g, key.id)["total"] == {
        "jobs": 1,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 0,
        "gpu_seconds": 0.0,
    }


def test_unknown_key_and_bad_dates(gateway: RunningGateway) -> None:
    headers = auth(gateway.key("adm", ["admin"]))
    assert gateway.http.get("/v1/admin/keys/key_nope/usage", headers=headers).status_code == 404
    key_id = gateway.gw.store.list_keys()[0].id
    r = gateway.http.get(f"/v1/admin/keys/{key_id}/usage", params={"since": "yesterday"}, headers=headers)
    assert r.status_code == 422
    empty = gateway.http.get(f"/v1/admin/keys/{key_id}/usage", headers=headers).json()
    assert empty["keys"][0]["total"]["jobs"] == 0
