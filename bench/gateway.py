"""Gateway submit benchmark: POST /v1/inference/image vs a bare FastAPI endpoint.

Both servers run the same way (uvicorn, one process, same settings) in their own
process, one after the other in the same run; the load generator (asyncio + httpx, a
fixed number of concurrent clients) is a third process. For SQLite and for PostgreSQL
(a throwaway server started here, default durability settings) it prints submit
throughput, p50/p99 latency, and the ratio of the gateway's throughput to the bare
endpoint's (target: at least 0.5).

    .venv/bin/python bench/gateway.py [--seconds 10] [--concurrency 32] [--backend sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.localcluster import free_port  # noqa: E402

MODEL = "black-forest-labs/FLUX.1-schnell"
BODY = {"prompt": "a lighthouse at dusk, oil painting", "model": MODEL, "steps": 4, "seed": 7}
TOKEN = "bench-worker-token"


# ---- servers (run in child processes) ------------------------------------------------------


def bare_app():  # type: ignore[no-untyped-def]
    import uuid

    app = FastAPI()

    @app.post("/v1/inference/image")
    async def submit(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        assert body["model"]
        job_id = str(uuid.uuid4())
        return JSONResponse(
            {
                "job_id": job_id,
                "job_type": "image",
                "result_url": f"http://x/v1/inference/jobs/{job_id}/result",
            },
            status_code=202,
        )

    return app


def gateway_app(database_url: str, data_dir: str):  # type: ignore[no-untyped-def]
    from remotegpu_gateway.app import create_app
    from remotegpu_gateway.settings import Settings

    return create_app(Settings(database_url=database_url, data_dir=Path(data_dir), worker_token=TOKEN))


def serve(kind: str, port: int, database_url: str, data_dir: str) -> None:
    import uvicorn

    app = bare_app() if kind == "bare" else gateway_app(database_url, data_dir)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- load generator ------------------------------------------------------------------------


async def load(url: str, key: str, seconds: float, concurrency: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        # warm-up
        for _ in range(20):
            await client.post("/v1/inference/image", json=BODY, headers=headers)
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/inference/image", json=BODY, headers=headers)
                    ok = r.status_code == 202
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def run_load(url: str, key: str, seconds: float, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--load",
            url,
            "--key",
            key,
            "--seconds",
            str(seconds),
            "--concurrency",
            str(concurrency),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"load generator failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def wait_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    kind: str, database_url: str, data_dir: str, key: str, seconds: float, concurrency: int
) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            kind,
            "--port",
            str(port),
            "--db",
            database_url,
            "--data-dir",
            data_dir,
        ]
    )
    try:
        wait_up(port, proc)
        cpu0 = cpu_seconds(proc.pid)
        out = run_load(f"http://127.0.0.1:{port}", key, seconds, concurrency)
        # Server CPU per request: independent of what else the machine is doing.
        out["cpu_ms"] = (cpu_seconds(proc.pid) - cpu0) * 1000 / max(1, out["requests"] + 20)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_backend(
    name: str, database_url: str, seconds: float, concurrency: int
) -> dict[str, dict[str, float]]:
    from remotegpu_gateway.store import Store

    with tempfile.TemporaryDirectory(prefix="bench-gw-") as data_dir:
        store = Store(database_url)
        store.migrate()
        key = store.create_key("bench", ["inference"])[1]
        store.close()
        bare = measure("bare", database_url, data_dir, key, seconds, concurrency)
        gw = measure("gateway", database_url, data_dir, key, seconds, concurrency)
    return {"bare": bare, "gateway": gw}


def report(name: str, res: dict[str, dict[str, float]]) -> None:
    b, g = res["bare"], res["gateway"]
    print(f"--- {name}")
    for label, r in (("bare FastAPI", b), ("gateway submit", g)):
        print(
            f"  {label:<15} {r['rps']:8.0f} req/s   p50 {r['p50_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms"
            f"   server CPU {r['cpu_ms']:5.2f} ms/req   ({int(r['requests'])} requests, {int(r['errors'])} errors)"
        )
    print(f"  ratio gateway/bare throughput: {g['rps'] / b['rps']:.2f}  (target >= 0.50)")
    print(f"  ratio bare/gateway server CPU per request: {b['cpu_ms'] / g['cpu_ms']:.2f}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--serve")
    p.add_argument("--port", type=int)
    p.add_argument("--db")
    p.add_argument("--data-dir")
    p.add_argument("--load")
    p.add_argument("--key")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.db, args.data_dir)
        return 0
    if args.load:
        print(json.dumps(asyncio.run(load(args.load, args.key, args.seconds, args.concurrency))))
        return 0

    print(
        f"gateway submit benchmark: {args.seconds:.0f} s per server, {args.concurrency} concurrent clients, "
        f"{os.cpu_count()} CPUs"
    )
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as d:
            report(
                "SQLite", bench_backend("sqlite", f"sqlite:///{d}/bench.db", args.seconds, args.concurrency)
            )
    if args.backend in ("postgres", "both"):
        from tests.fixtures.postgres import PostgresServer, create_database

        server = PostgresServer(fsync=True).start()
        try:
            url = create_database(server.url)
            report("PostgreSQL", bench_backend("postgres", url, args.seconds, args.concurrency))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
