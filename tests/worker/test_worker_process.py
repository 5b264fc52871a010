"""`remotegpu worker` as a real process: readiness, metrics, SIGTERM drain, SIGKILL mid-job."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.processes import Proc
from tests.waiting import wait_for, wait_http
from tests.worker.conftest import REMOTEGPU, WORKER_TOKEN, RunningGateway, base_env, free_port, png_size
from tests.worker.test_loop import TINY, LoopThread, wait_running


def start_worker(
    procs: Callable[..., Proc], gw: RunningGateway, data_dir: Path, log: Path, ready: bool = True, **env: str
) -> tuple[Proc, str]:
    port = free_port()
    p = procs(
        [
            REMOTEGPU,
            "worker",
            "--model",
            TINY,
            "--gateway-url",
            gw.url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ],
        base_env(
            **{
                "REMOTEGPU_WORKER_TOKEN": WORKER_TOKEN,
                "REMOTEGPU_LEASE_WAIT_SECONDS": "1",
                "REMOTEGPU_HEARTBEAT_SECONDS": "0.5",
                "REMOTEGPU_DEVICE": "cpu",
                **env,
            }
        ),
        log,
    )
    url = f"http://127.0.0.1:{port}"
    if ready:
        wait_http(f"{url}/readyz", 300, p)
    return p, url


def test_sigterm_finishes_the_current_job_then_exits(
    procs: Callable[..., Proc], gateway: RunningGateway, tiny_data_dir: Path, tmp_path: Path
) -> None:
    p, url = start_worker(procs, gateway, tiny_data_dir, tmp_path / "worker.log")
    assert httpx.get(f"{url}/healthz").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert 'remotegpu_worker_model_load_seconds{model="remotegpu/tiny-random-flux1"}' in metrics
    assert 'remotegpu_worker_ready{model="remotegpu/tiny-random-flux1"} 1.0' in metrics

    job_id = gateway.submit(TINY, "drain me gently", steps=40, size={"width": 1024, "height": 1024})
    wait_running(gateway, job_id)
    p.signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 0, p.log()[-3000:]
    job = gateway.job(job_id)
    assert job["status"] == "succeeded", (job, p.log()[-3000:])
    assert png_size(gateway.result(job_id)) == (1024, 1024)
    assert "draining" in p.log()


def test_sigterm_on_an_idle_worker_ends_its_lease_poll_at_once(
    procs: Callable[..., Proc], gateway: RunningGateway, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """An idle worker waits in a long lease poll (20 s in a pod); told to stop, it says so and
    the gateway ends the poll: it exits promptly, and a job that arrives meanwhile is not
    leased to it only to be handed back."""
    p, _ = start_worker(
        procs, gateway, tiny_data_dir, tmp_path / "worker.log", REMOTEGPU_LEASE_WAIT_SECONDS="60"
    )
    ready_workers = lambda: gateway.gw.registry.runtime(TINY).ready_workers  # noqa: E731
    wait_for(lambda: ready_workers() == 1, 60, "the worker in its lease poll")
    stopped = time.monotonic()
    p.signal(signal.SIGTERM)
    wait_for(lambda: ready_workers() == 0, 30, "the worker to say it is leaving")
    job_id = gateway.submit(TINY, "not for a leaving worker")
    assert p.wait(timeout=120) == 0, p.log()[-3000:]
    took = time.monotonic() - stopped
    leases = gateway.gw.metrics.registry.get_sample_value("remotegpu_job_wait_seconds_count", {"model": TINY})
    assert not leases, f"the job was leased {leases:.0f} time(s) by the leaving worker\n{p.log()[-3000:]}"
    assert gateway.gw.store.get_job(job_id, None).status == "pending"
    # Well below the poll (the longest the protocol allows), with a margin for a loaded
    # machine: only a poll cut short passes.
    assert took < 45, f"the worker took {took:.1f}s to stop: it waited out its 60 s poll"


def test_sigterm_past_the_grace_hands_the_job_back(
    procs: Callable[..., Proc], gateway: RunningGateway, tiny_data_dir: Path, tmp_path: Path, engines: Any
) -> None:
    # The catalog entry comes from $REMOTEGPU_MODEL_SPEC here (as the operator passes it).
    import json

    from remotegpu_base.catalog import load_models_file

    entry = next(m for m in load_models_file() if m.spec.model == TINY)
    p, _ = start_worker(
        procs,
        gateway,
        tiny_data_dir,
        tmp_path / "worker.log",
        REMOTEGPU_DRAIN_GRACE_SECONDS="0.5",
        REMOTEGPU_MODEL_SPEC=json.dumps(entry.to_resource()),
    )
    job_id = gateway.submit(TINY, "hand me back", steps=50, size={"width": 1024, "height": 1024})
    wait_running(gateway, job_id)
    p.signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0, p.log()[-3000:]
    record = gateway.gw.store.get_job(job_id, None)
    assert record.status == "pending", record  # back in the queue, not lost, no attempt used
    assert record.attempt == 0
    lt = LoopThread(engines("flux1"), gateway)
    try:
        assert (
            gateway.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=300)["status"] == "succeeded"
        )
    finally:
        lt.stop()


def test_sigkill_mid_job_the_job_completes_after_lease_expiry(
    procs: Callable[..., Proc],
    gateway_factory: Callable[..., RunningGateway],
    tiny_data_dir: Path,
    tmp_path: Path,
    engines: Any,
) -> None:
    gw = gateway_factory(lease_ttl=6.0)  # heartbeats every 0.5 s: a loaded machine's stall is no lapse
    p, _ = start_worker(procs, gw, tiny_data_dir, tmp_path / "worker.log")
    job_id = gw.submit(TINY, "survive a crash", steps=50, size={"width": 1024, "height": 1024}, seed=3)
    wait_running(gw, job_id)
    p.signal(signal.SIGKILL)
    p.wait(timeout=30)
    killed_at = time.monotonic()
    # Nobody renews the lease: the gateway re-queues the job after the TTL ...
    deadline = time.monotonic() + 30
    while gw.gw.store.get_job(job_id, None).status == "running":
        assert time.monotonic() < deadline, "lease never expired"
        time.sleep(0.1)
    assert time.monotonic() - killed_at < 15
    # ... and a healthy worker completes it (second attempt).
    lt = LoopThread(engines("flux1"), gw)
    try:
        job = gw.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
        assert job["status"] == "succeeded", job
        assert gw.gw.store.get_job(job_id, None).attempt == 2
        assert png_size(gw.result(job_id)) == (1024, 1024)
    finally:
        lt.stop()


def test_bad_configuration_fails_fast(tmp_path: Path) -> None:
    import subprocess

    r = subprocess.run(
        [
            REMOTEGPU,
            "worker",
            "--model",
            "no/such-model",
            "--gateway-url",
            "http://127.0.0.1:9",
            "--data-dir",
            str(tmp_path),
        ],
        env=base_env(REMOTEGPU_WORKER_TOKEN="x"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "not in" in r.stderr
    spec = '{"model": "remotegpu/x", "architecture": "flux1"}'
    r = subprocess.run(
        [
            REMOTEGPU,
            "worker",
            "--model",
            "remotegpu/x",
            "--gateway-url",
            "http://127.0.0.1:9",
            "--data-dir",
            str(tmp_path),
        ],
        env=base_env(REMOTEGPU_WORKER_TOKEN="x", REMOTEGPU_MODEL_SPEC=spec),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "parameters" in r.stderr


def test_a_worker_that_cannot_load_tells_the_gateway(
    procs: Callable[..., Proc], gateway: RunningGateway, tmp_path: Path
) -> None:
    """A pod whose model will not load exits (Kubernetes restarts it), but first tells the
    gateway, so a job that times out waiting says the model failed to load, not that no
    capacity came up; the waiting job itself stays queued for the next try."""
    p, _ = start_worker(procs, gateway, tmp_path / "no-weights", tmp_path / "worker.log", ready=False)
    job_id = gateway.submit(TINY, "waits for a worker that can load")
    assert p.wait(timeout=120) == 1, p.log()[-3000:]
    assert gateway.gw.registry.load_failures(TINY) == 1
    assert gateway.gw.store.get_job(job_id, None).status == "pending"


def test_a_job_waiting_for_the_worker_gets_its_startup_phases(
    procs: Callable[..., Proc], gateway: RunningGateway, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The worker reports process start, the fetcher's download (its record), load and warm-up."""
    job_id = gateway.submit(TINY, "wait for me")  # before any worker exists: a cold start
    record = tmp_path / "fetch.json"
    fetched_at = time.time()
    record.write_text(f'{{"fetched": true, "started_at": {fetched_at - 1}, "finished_at": {fetched_at}}}')
    p, _ = start_worker(
        procs, gateway, tiny_data_dir, tmp_path / "worker.log", REMOTEGPU_FETCH_RECORD=str(record)
    )
    assert gateway.wait(job_id, {"succeeded"}, timeout=120)["status"] == "succeeded"
    t = gateway.http.get(f"/v1/inference/jobs/{job_id}/timeline").json()
    assert t["waited_for_capacity"] is True and t["weights_cached"] is False
    names = [x["phase"] for x in t["phases"]]
    # the fetch (the pod's init container) ends before the worker process starts
    assert names == ["weights_fetched", "process_started", "weights_loaded", "warmed", "first_lease"], t
    loaded, warmed, leased = (t["phases"][i]["at"] for i in (2, 3, 4))
    assert loaded <= warmed <= leased
    p.signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
