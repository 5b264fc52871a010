"""What the live progress stream and the webhook deliveries add to a job's time.

A real gateway (uvicorn in this process; SQLite in a temp dir, or --database-url) and a
simulated worker on the real protocol run the same short job (STEPS steps over RUN s)
one after another, JOBS times per setup:

  - baseline: no step reports, nobody watching;
  - progress: the worker reports every step (as the real worker does, from its heartbeat
              thread) and a client follows the job's event stream (SSE) to its end;
  - webhooks: as progress, plus signed webhooks (job.running, job.completed) to a
              receiver on loopback.

For each it prints the median and p90 of submit -> completion seen by the worker, the
extra milliseconds against the baseline and the ratio, and for webhooks the median time
from the job's completion to the receiver getting job.completed.

    .venv/bin/python bench/extensions_overhead.py [--jobs 30] [--run 0.4] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eta import Gateway, SimWorker  # noqa: E402


class Receiver:
    def __init__(self) -> None:
        self.got: dict[str, float] = {}  # job id -> when job.completed arrived
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                import json

                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if body["type"] == "job.completed":
                    outer.got[body["data"]["job_id"]] = time.time()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def follow(url: str, key: str, job_id: str) -> None:
    with (
        httpx.Client(base_url=url, timeout=60) as c,
        c.stream(
            "GET", f"/v1/inference/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        for _ in r.iter_lines():
            pass  # to the end of the stream


def run_setup(
    g: Gateway, name: str, jobs: int, run: float, steps: int, receiver: Receiver | None
) -> dict[str, Any]:
    sim = SimWorker(g.url, f"w-{name}", run, steps=steps, report_steps=name != "baseline").start()
    times = []
    hook_lag = []
    for _ in range(jobs):
        extra = {"webhook_url": receiver.url} if receiver else {}
        t0 = time.time()
        job_id = g.submit(**extra)
        watcher = None
        if name != "baseline":
            watcher = threading.Thread(target=follow, args=(g.url, g.key, job_id))
            watcher.start()
        while job_id not in sim.completed:
            time.sleep(0.002)
        times.append(sim.completed[job_id] - t0)
        if watcher:
            watcher.join(timeout=30)
        if receiver:
            deadline = time.monotonic() + 30
            while job_id not in receiver.got and time.monotonic() < deadline:
                time.sleep(0.002)
            hook_lag.append(receiver.got[job_id] - sim.completed[job_id])
    sim.leave()
    times.sort()
    return {
        "p50": statistics.median(times) * 1000,
        "p90": times[int(0.9 * (len(times) - 1))] * 1000,
        "hook": statistics.median(hook_lag) * 1000 if hook_lag else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--run", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--database-url")
    args = ap.parse_args()
    receiver = Receiver()
    with tempfile.TemporaryDirectory() as tmp:
        g = Gateway(args.database_url, Path(tmp), webhook_allowed_networks=["127.0.0.0/8"])
        g.gw.store.set_webhook_secret(g.gw.store.authenticate(g.key).id)  # type: ignore[union-attr]
        try:
            res = {
                name: run_setup(
                    g, name, args.jobs, args.run, args.steps, receiver if name == "webhooks" else None
                )
                for name in ("baseline", "progress", "webhooks")
            }
        finally:
            g.stop()
    base = res["baseline"]["p50"]
    print(f"job time, submit -> completed ({args.jobs} jobs each, {args.steps} steps over {args.run:g}s)")
    for name, r in res.items():
        line = f"  {name:<9} p50 {r['p50']:7.1f} ms  p90 {r['p90']:7.1f} ms  extra {r['p50'] - base:+6.1f} ms  x{r['p50'] / base:.3f}"
        if r["hook"] is not None:
            line += f"  (job.completed received {r['hook']:.1f} ms after completion, median)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
