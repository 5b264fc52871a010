"""`remotegpu generate` with the extensions (event stream, Idempotency-Key, priority, wait)
and `remotegpu jobs list`, as real processes against the running gateway."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from remotegpu_base.protocol import Progress

from tests.gateway.conftest import SCHNELL, RunningGateway, png_bytes

REMOTEGPU = str(Path(sys.executable).parent / "remotegpu")


def cli(g: RunningGateway, key: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REMOTEGPU_URL": g.url, "REMOTEGPU_API_KEY": key}
    return subprocess.run([REMOTEGPU, *args], env=env, capture_output=True, text=True, timeout=timeout)


def worker_runs_one(g: RunningGateway, steps: int = 3) -> threading.Thread:
    """A worker (the protocol, in a thread) that takes one job, reports its steps, completes it."""

    def run() -> None:
        w = g.worker()
        try:
            lease = w.lease(SCHNELL, "w1", wait_seconds=60)
            assert lease is not None
            for step in range(1, steps + 1):
                w.heartbeat(lease.job_id, lease.lease_token, Progress(step=step, total_steps=steps))
            w.complete(lease.job_id, lease.lease_token, png_bytes(512, 512))
        finally:
            w.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_generate_follows_the_event_stream_and_lists_jobs(
    gateway: RunningGateway, key: str, tmp_path: Path
) -> None:
    gateway.ready(SCHNELL, "w1")
    t = worker_runs_one(gateway)
    out = tmp_path / "a.png"
    r = cli(
        gateway,
        key,
        "generate",
        "--model",
        SCHNELL,
        "a cat",
        "-o",
        str(out),
        "--idempotency-key",
        "cat-1",
        "--priority",
        "low",
        "--deadline-seconds",
        "300",
    )
    t.join(timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    assert "running" in r.stderr and "succeeded" in r.stderr and "wrote" in r.stderr

    # The same Idempotency-Key again: the original job, nothing new runs.
    again = cli(
        gateway,
        key,
        "generate",
        "--model",
        SCHNELL,
        "a cat",
        "-o",
        str(tmp_path / "b.png"),
        "--idempotency-key",
        "cat-1",
        "--priority",
        "low",
        "--deadline-seconds",
        "300",
    )
    assert again.returncode == 0, again.stderr
    assert "original job" in again.stderr and (tmp_path / "b.png").read_bytes() == out.read_bytes()

    listed = cli(gateway, key, "jobs", "list", "--status", "succeeded")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].startswith("JOB") and len(lines) == 2 and "succeeded" in lines[1] and SCHNELL in lines[1]


def test_generate_with_wait_and_with_poll(gateway: RunningGateway, key: str, tmp_path: Path) -> None:
    gateway.ready(SCHNELL, "w1")
    for flags in (["--wait", "30"], ["--poll"]):
        t = worker_runs_one(gateway)
        out = tmp_path / f"{flags[0][2:]}.png"
        r = cli(gateway, key, "generate", "--model", SCHNELL, "x", "-o", str(out), *flags)
        t.join(timeout=60)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes().startswith(b"\x89PNG") and "wrote" in r.stderr


def test_keys_webhook_secret_creates_and_rotates(gateway: RunningGateway) -> None:
    record, _ = gateway.gw.store.create_key("hooks", ["inference"])
    db = ["--database-url", gateway.settings.database_url]
    first = subprocess.run(
        [REMOTEGPU, "keys", "webhook-secret", "hooks", *db], capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0, first.stderr + first.stdout
    secret = first.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_") and gateway.gw.store.webhook_secret(record.id) == secret
    by_id = subprocess.run(
        [REMOTEGPU, "keys", "webhook-secret", record.id, *db], capture_output=True, text=True, timeout=60
    )
    rotated = by_id.stdout.strip().splitlines()[-1]
    assert by_id.returncode == 0 and rotated.startswith("whsec_") and rotated != secret
    assert gateway.gw.store.webhook_secret(record.id) == rotated
    missing = subprocess.run(
        [REMOTEGPU, "keys", "webhook-secret", "nobody", *db], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "no key nobody" in missing.stdout


def test_the_progress_bar_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """What `remotegpu generate` draws on a terminal from the stream's events: one line,
    rewritten, with the queue position and expected start, then the steps' bar."""
    from remotegpu.client import _Status

    display = _Status()
    display.tty = True
    display.show({"status": "queued", "wait_ms": 0, "run_ms": 0, "queue_position": 2}, 0.5)
    display.queue({"queue_position": 1, "estimated_start_at": None}, 1.0)
    display.show({"status": "running", "wait_ms": 1200, "run_ms": 0}, 1.2)
    display.progress(2, 4, 2.0)
    display.done()
    frames = capsys.readouterr().err.split("\r")
    assert "position 2" in frames[1] and "position 1" in frames[2]
    assert frames[-1].startswith("running") and "[##########..........] 2/4 steps" in frames[-1]
    assert frames[-1].endswith("\n")
