"""`result_url` is a URL a client can open, whatever address the server binds: real
`remotegpu serve` and `remotegpu gateway` processes on IPv6 loopback and on every address."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.fixtures.processes import Proc
from tests.fixtures.tiny_models import copy_tiny_models
from tests.waiting import wait_for, wait_http
from tests.worker.conftest import REMOTEGPU, base_env, free_port, png_size

TINY = "remotegpu/tiny-random-flux1"


def create_key(data: Path) -> str:
    out = subprocess.run(
        [REMOTEGPU, "keys", "create", "--name", "me", "--data-dir", str(data)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def start(
    procs: Callable[..., Proc], command: str, data: Path, host: str, *flags: str, **env: str
) -> tuple[Proc, int]:
    port = free_port()
    p = procs(
        [REMOTEGPU, command, "--host", host, "--port", str(port), "--data-dir", str(data), *flags],
        base_env(**env),
        data.parent / f"{command}-{port}.log",
    )
    wait_http(f"http://{'[::1]' if ':' in host else '127.0.0.1'}:{port}/readyz", 240, p)
    return p, port


def submit(url: str, key: str, host_header: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    if host_header:
        headers["Host"] = host_header
    r = httpx.post(
        f"{url}/v1/inference/image",
        json={"model": TINY, "prompt": "x", "steps": 2},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["result_url"])


def test_serve_on_ipv6_loopback(procs: Callable[..., Proc], tmp_path: Path, tiny_data_dir: Path) -> None:
    data = tmp_path / "data"
    copy_tiny_models(tiny_data_dir, data)
    serve, port = start(procs, "serve", data, "::1")
    key = create_key(data)
    url = f"http://[::1]:{port}"
    result_url = submit(url, key)
    assert result_url.startswith(f"{url}/v1/inference/jobs/"), result_url
    # The in-process worker reaches the gateway too, so the job runs, and its result_url opens.
    job_id = result_url.split("/jobs/")[1].split("/")[0]

    def finished() -> dict[str, str] | None:
        r = httpx.get(f"{url}/v1/inference/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
        job = r.json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, 300, "the job to finish", every=0.5)
    assert job["status"] == "succeeded", (job, serve.log()[-3000:])
    assert job["result_url"].startswith(f"{url}/")
    assert png_size(httpx.get(job["result_url"], timeout=60).content) == (512, 512)
    assert "Traceback" not in serve.log(), serve.log()[-3000:]


def test_serve_on_every_address_follows_each_request(
    procs: Callable[..., Proc], tmp_path: Path, tiny_data_dir: Path
) -> None:
    data = tmp_path / "data"
    copy_tiny_models(tiny_data_dir, data)
    _, port = start(procs, "serve", data, "0.0.0.0")
    key = create_key(data)
    local = f"http://127.0.0.1:{port}"
    assert submit(local, key).startswith(f"{local}/v1/inference/jobs/")
    # A client that reached the server under another name gets URLs under that name.
    assert submit(local, key, "images.example.test:8443").startswith("http://images.example.test:8443/v1/")


def test_a_configured_public_url_wins(
    procs: Callable[..., Proc], tmp_path: Path, tiny_data_dir: Path
) -> None:
    data = tmp_path / "data"
    copy_tiny_models(tiny_data_dir, data)
    _, port = start(procs, "serve", data, "0.0.0.0", "--public-url", "https://img.example/")
    key = create_key(data)
    local = f"http://127.0.0.1:{port}"
    assert submit(local, key, "other.example:8443").startswith("https://img.example/v1/inference/jobs/")

    # `remotegpu gateway` alike: from the environment (what the chart sets), and on ::1 without it.
    gw_data = tmp_path / "gateway"
    gw_key = create_key(gw_data)
    _, port = start(procs, "gateway", gw_data, "::1", REMOTEGPU_PUBLIC_URL="https://api.example")
    assert submit(f"http://[::1]:{port}", gw_key).startswith("https://api.example/v1/inference/jobs/")
    _, port = start(procs, "gateway", gw_data, "::1")
    assert submit(f"http://[::1]:{port}", gw_key).startswith(f"http://[::1]:{port}/v1/inference/jobs/")
