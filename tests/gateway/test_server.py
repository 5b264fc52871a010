"""`remotegpu gateway` as a process: flags, worker token, models file, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml
from remotegpu_base.catalog import load_models_file
from remotegpu_base.protocol import WORKER_TOKEN_ENV, WorkerAPIClient
from remotegpu_gateway.store import MIGRATIONS

from tests.gateway.conftest import SCHNELL, auth, free_port, png_bytes
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "remotegpu.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_gateway(
    tmp_path: Path, database_url: str, models: list[str], *flags: str
) -> tuple[subprocess.Popen[str], str, Path, dict[str, str]]:
    """A `remotegpu gateway` process serving `models`; returns it once /healthz answers."""
    data = tmp_path / "data"
    tmp_path.mkdir(parents=True, exist_ok=True)
    models_file = tmp_path / "models.yaml"
    chosen = [m for m in load_models_file() if m.spec.model in models]
    models_file.write_text(yaml.safe_dump_all([m.to_resource() for m in chosen]))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in (WORKER_TOKEN_ENV, "REMOTEGPU_DATABASE_URL")}
    argv = ["gateway", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data)]
    argv += ["--database-url", database_url, "--models-file", str(models_file), *flags]
    proc = subprocess.Popen(
        [sys.executable, "-m", "remotegpu.cli", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=1) as client:  # one SSL context, not one per try
        while True:
            try:
                if client.get(f"{url}/healthz").status_code == 200:
                    return proc, url, data, env
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"gateway did not start:\n{proc.communicate()[0]}")
            time.sleep(0.1)


def test_gateway_command(tmp_path: Path, database_url: str) -> None:
    chosen = [SCHNELL, "remotegpu/tiny-random-flux1"]
    proc, url, data, env = start_gateway(
        tmp_path, database_url, chosen, "--public-url", "https://gw.example.test"
    )
    try:
        token_file = data / "worker-token"
        assert token_file.exists() and oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        created = cli("keys", "create", "--name", "t", "--database-url", database_url, env=env)
        key = created.stdout.strip().splitlines()[-1]
        models = httpx.get(f"{url}/v1/inference/models").json()["image"]
        assert sorted(m["model"] for m in models) == sorted(chosen)
        r = httpx.post(f"{url}/v1/inference/image", json={"prompt": "a", "model": SCHNELL}, headers=auth(key))
        assert r.status_code == 202 and r.json()["result_url"].startswith(
            "https://gw.example.test/v1/inference/"
        )
        w = WorkerAPIClient(url, token)
        lease = w.lease(SCHNELL, "w1", wait_seconds=5)
        assert lease is not None
        w.complete(lease.job_id, lease.lease_token, png_bytes(8, 8))
        w.close()
        assert (
            httpx.get(f"{url}/v1/inference/jobs/{lease.job_id}", headers=auth(key)).json()["status"]
            == "succeeded"
        )
        assert "remotegpu_jobs_submitted_total" in httpx.get(f"{url}/metrics").text
        assert httpx.get(f"{url}/readyz").json()["schema_version"] == MIGRATIONS[-1][0]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM as its exit status.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "generated a worker token" in out and "gateway stopped" in out


def catalog(url: str) -> dict[str, dict]:
    return {m["model"]: m for m in httpx.get(f"{url}/v1/inference/models", timeout=30).json()["image"]}


def test_sigterm_ends_open_long_polls_instead_of_waiting_them_out(tmp_path: Path, database_url: str) -> None:
    """Workers hold 20 s lease polls and operators queue polls: a rolling restart of the
    gateway must not wait for them (uvicorn would, up to its 10 s graceful timeout)."""
    proc, url, data, _env = start_gateway(tmp_path, database_url, [SCHNELL])
    token = (data / "worker-token").read_text().strip()
    answers: dict[str, object] = {}

    def lease() -> None:
        w = WorkerAPIClient(url, token, timeout=90)
        answers["lease"] = w.lease(SCHNELL, "w-draining", wait_seconds=60)
        w.close()

    queue_polling = threading.Event()

    def queue() -> None:
        snap = httpx.get(f"{url}/internal/v1/queue", headers=auth(token), timeout=90).json()
        queue_polling.set()
        r = httpx.get(
            f"{url}/internal/v1/queue",
            params={"since": snap["version"], "wait_seconds": 60},
            headers=auth(token),
            timeout=90,
        )
        answers["queue"] = r.status_code

    polls = [threading.Thread(target=f) for f in (lease, queue)]
    for t in polls:
        t.start()
    # Both polls are open and waiting: the lease poll shows as a ready worker; the queue
    # poll is sent (then a margin for the server to take it in, on a loaded machine too).
    wait_for(lambda: catalog(url)[SCHNELL]["runtime"]["ready_workers"] == 1, 60, "the lease poll")
    assert queue_polling.wait(60)
    time.sleep(2)
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    took = time.monotonic() - stopped
    for t in polls:
        t.join(10)
    assert answers == {"lease": None, "queue": 200}, out
    # The polls wait 60 s; uvicorn alone would hold the shutdown for its 10 s graceful timeout.
    assert took < 8, f"shutdown took {took:.1f}s: it waited for the long-polls\n{out}"


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def test_state_at_rest_is_private(tmp_path: Path) -> None:
    """The data folder is 0700 and the SQLite database (with its WAL files, which hold the
    URL-signing secret and key hashes) and the worker token are 0600, under a umask of 022,
    for a fresh data folder and for one left behind by an older version (0755/0644)."""
    old_umask = os.umask(0o022)  # what a user's shell usually has; the children inherit it
    try:
        for fresh in (True, False):
            data = tmp_path / ("fresh" if fresh else "old") / "data"
            data.parent.mkdir()
            if not fresh:
                data.mkdir(parents=True, mode=0o755)
                (data / "remotegpu.db").touch(mode=0o644)
            url = f"sqlite:///{data / 'remotegpu.db'}"
            proc, base, data, env = start_gateway(data.parent, url, [SCHNELL])
            try:
                created = cli("keys", "create", "--name", "t", "--data-dir", str(data), env=env)
                key = created.stdout.strip().splitlines()[-1]
                r = httpx.post(
                    f"{base}/v1/inference/image", json={"prompt": "a", "model": SCHNELL}, headers=auth(key)
                )
                assert r.status_code == 202, r.text
                assert _mode(data) == "0o700"
                files = sorted(p.name for p in data.iterdir() if p.is_file())
                assert {"remotegpu.db", "remotegpu.db-wal", "worker-token"} <= set(files), files
                assert {f: _mode(data / f) for f in files} == {f: "0o600" for f in files}
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=30)
    finally:
        os.umask(old_umask)
