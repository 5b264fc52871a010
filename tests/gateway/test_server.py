"""`remotegpu gateway` as a process: flags, worker token, models file, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from remotegpu.catalog import load_models_file
from remotegpu.protocol import WORKER_TOKEN_ENV, WorkerAPIClient
from tests.gateway.conftest import SCHNELL, auth, free_port, png_bytes

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


def test_gateway_command(tmp_path: Path, database_url: str) -> None:
    data = tmp_path / "data"
    models_file = tmp_path / "models.yaml"
    chosen = [m for m in load_models_file() if m.spec.model in (SCHNELL, "remotegpu/tiny-random-flux1")]
    models_file.write_text(yaml.safe_dump_all([m.to_resource() for m in chosen]))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in (WORKER_TOKEN_ENV, "REMOTEGPU_DATABASE_URL")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "remotegpu.cli",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data),
            "--database-url",
            database_url,
            "--models-file",
            str(models_file),
            "--public-url",
            "https://gw.example.test",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
        token_file = data / "worker-token"
        assert token_file.exists() and oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        created = cli("keys", "create", "--name", "t", "--database-url", database_url, env=env)
        key = created.stdout.strip().splitlines()[-1]
        models = httpx.get(f"{url}/v1/inference/models").json()["image"]
        assert sorted(m["model"] for m in models) == sorted(m.spec.model for m in chosen)
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
        assert httpx.get(f"{url}/readyz").json()["schema_version"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM as its exit status.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "generated a worker token" in out and "gateway stopped" in out
