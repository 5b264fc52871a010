"""The ETA's error: how far a job's `estimated_completion_at`, read right after submitting,
is from when it really completed.

A real gateway (uvicorn in this process, SQLite in a temp dir, or --database-url) and
simulated workers speaking the real worker protocol over loopback HTTP: each job takes
RUN seconds (+-10% jitter) in STEPS steps and reports each step, like the real worker.

  - steady: WORKERS ready workers, jobs arriving at random (Poisson) at 80% utilisation;
  - cold:   the model sleeps; a burst of jobs arrives; after an operator delay a worker
            reports `starting`, then `ready` COLD seconds later, and serves the burst;
            then it goes away and the model sleeps again. The first cycle has no cold
            start measured yet (its estimates are null); the later ones are scored.

The error of a job is |predicted - actual| / actual, both counted from its submit. It
prints p50 and p90 per scenario and how many jobs had no estimate. Goal: p50 within 20%.

    .venv/bin/python bench/eta.py [--jobs 40] [--workers 2] [--run 1.0] [--cold 3.0] [--cycles 4]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remotegpu_base.protocol import Progress, RuntimeState, WorkerAPIClient, WorkerStatus  # noqa: E402
from remotegpu_gateway.app import create_app  # noqa: E402
from remotegpu_gateway.connections import uvicorn_config  # noqa: E402
from remotegpu_gateway.settings import Settings  # noqa: E402

from cluster.localcluster import free_port  # noqa: E402

MODEL = "black-forest-labs/FLUX.1-schnell"
TOKEN = "bench-worker-token"


class Gateway:
    """The gateway app under uvicorn in a thread, as the tests and `remotegpu gateway` run it."""

    def __init__(self, database_url: str | None, data: Path, **settings: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        s = Settings(
            database_url=database_url or f"sqlite:///{data / 'gateway.db'}",
            data_dir=data,
            worker_token=TOKEN,
            reaper_interval_seconds=0.2,
            **settings,
        )
        self.app = create_app(s)
        self.gw = self.app.state.gateway
        self.server = uvicorn.Server(
            uvicorn_config(self.app, s, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.key = self.gw.store.create_key("bench", ["inference"])[1]
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )

    def submit(self, **extra: Any) -> str:
        r = self.http.post("/v1/inference/image", json={"prompt": "p", "model": MODEL, **extra})
        r.raise_for_status()
        return str(r.json()["job_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/inference/jobs/{job_id}").json())

    def stop(self) -> None:
        self.gw.notifier.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82"
)


class SimWorker:
    """A worker that leases jobs and 'runs' each for `run` s in `steps` steps, reporting each
    step from a heartbeat thread as the real worker does."""

    def __init__(self, url: str, worker_id: str, run: float, steps: int = 4, report_steps: bool = True):
        self.url, self.worker_id, self.run_seconds, self.steps = url, worker_id, run, steps
        self.report_steps = report_steps
        self.stop = threading.Event()
        self.completed: dict[str, float] = {}  # job id -> time.time() its completion returned
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, state: RuntimeState = RuntimeState.READY) -> SimWorker:
        with closing(WorkerAPIClient(self.url, TOKEN)) as w:
            w.report_status(WorkerStatus(worker_id=self.worker_id, model=MODEL, state=state))
        self.thread.start()
        return self

    def _loop(self) -> None:
        with closing(WorkerAPIClient(self.url, TOKEN)) as w:
            while not self.stop.is_set():
                lease = w.lease(MODEL, self.worker_id, wait_seconds=1)
                if lease is None:
                    continue
                run = self.run_seconds * random.uniform(0.9, 1.1)
                progress: list[Progress] = []
                stepped, done = threading.Event(), threading.Event()
                reporter = threading.Thread(target=self._report, args=(lease, progress, stepped, done))
                reporter.start()
                for step in range(1, self.steps + 1):
                    time.sleep(run / self.steps)
                    if self.report_steps:
                        progress[:] = [Progress(step=step, total_steps=self.steps)]
                        stepped.set()
                done.set()
                stepped.set()
                reporter.join()
                w.complete(lease.job_id, lease.lease_token, PNG)
                self.completed[lease.job_id] = time.time()

    def _report(
        self, lease: Any, progress: list[Progress], stepped: threading.Event, done: threading.Event
    ) -> None:
        """The real worker's heartbeat thread: each step as it ends, off the rendering thread."""
        with closing(WorkerAPIClient(self.url, TOKEN)) as hb:
            while True:
                stepped.wait(2.0)
                if done.is_set():
                    return
                stepped.clear()
                hb.heartbeat(lease.job_id, lease.lease_token, progress[0] if progress else None)

    def leave(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        with closing(WorkerAPIClient(self.url, TOKEN)) as w:
            w.report_status(WorkerStatus(worker_id=self.worker_id, model=MODEL, state=RuntimeState.SLEEPING))


def ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def score(preds: list[tuple[str, float, float | None]], completed: dict[str, float]) -> dict[str, Any]:
    errors = []
    missing = 0
    for job_id, submitted, predicted in preds:
        if predicted is None:
            missing += 1
            continue
        actual = completed[job_id] - submitted
        errors.append(abs((predicted - submitted) - actual) / actual)
    errors.sort()
    pct = (
        (lambda p: errors[min(len(errors) - 1, int(p * len(errors)))] * 100)
        if errors
        else (lambda p: float("nan"))
    )
    return {"scored": len(errors), "no_estimate": missing, "p50": pct(0.5), "p90": pct(0.9)}


def steady(g: Gateway, jobs: int, workers: int, run: float) -> dict[str, Any]:
    sims = [SimWorker(g.url, f"steady-{i}", run).start() for i in range(workers)]
    # A few jobs first, so that a run time is known (their estimates are null: not scored).
    for _ in range(workers):
        g.submit()
    time.sleep(run * 1.5)
    g.gw._stats_cache = (0.0, {})
    preds = []
    rate = 0.8 * workers / run
    for _ in range(jobs):
        submitted = time.time()
        job_id = g.submit()
        preds.append((job_id, submitted, ts(g.status(job_id).get("estimated_completion_at"))))
        time.sleep(random.expovariate(rate))
    done = {}
    deadline = time.monotonic() + jobs * run + 60
    while not all(j in done for j, _, _ in preds) and time.monotonic() < deadline:
        done = {k: v for s in sims for k, v in s.completed.items()}
        time.sleep(0.1)
    for s in sims:
        s.leave()
    return score(preds, done)


def cold(g: Gateway, cycles: int, burst: int, run: float, cold_seconds: float) -> dict[str, Any]:
    preds: list[tuple[str, float, float | None]] = []
    done: dict[str, float] = {}
    for cycle in range(cycles):
        time.sleep(0.5)
        submitted = []
        for _ in range(burst):
            t = time.time()
            job_id = g.submit()
            est = ts(g.status(job_id).get("estimated_completion_at"))
            submitted.append((job_id, t, est))
        if cycle > 0:
            preds += submitted  # the first cycle measures the first cold start
        time.sleep(0.2)  # the operator's decision and pod start
        sim = SimWorker(g.url, f"cold-{cycle}", run)
        with closing(WorkerAPIClient(g.url, TOKEN)) as w:
            w.report_status(WorkerStatus(worker_id=sim.worker_id, model=MODEL, state=RuntimeState.STARTING))
        time.sleep(cold_seconds)
        sim.start()
        while not all(j in sim.completed for j, _, _ in submitted):
            time.sleep(0.1)
        done.update(sim.completed)
        sim.leave()
        g.gw._stats_cache = (0.0, {})
    return score(preds, done)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run", type=float, default=1.0, help="seconds per job")
    ap.add_argument("--cold", type=float, default=3.0, help="seconds from starting to ready")
    ap.add_argument("--cycles", type=int, default=4, help="cold-start cycles (the first is not scored)")
    ap.add_argument("--burst", type=int, default=3, help="jobs per cold start")
    ap.add_argument("--database-url", help="default: SQLite in a temp dir")
    args = ap.parse_args()
    random.seed(7)
    with tempfile.TemporaryDirectory() as tmp:
        g = Gateway(args.database_url, Path(tmp))
        try:
            res = {
                "steady": steady(g, args.jobs, args.workers, args.run),
                "cold start": cold(g, args.cycles, args.burst, args.run, args.cold),
            }
        finally:
            g.stop()
    print(
        f"ETA error of estimated_completion_at read at submit (run {args.run:g}s, workers {args.workers}, "
        f"cold start {args.cold:g}s)"
    )
    for name, r in res.items():
        ok = "ok" if r["p50"] <= 20 else "ABOVE GOAL"
        print(
            f"  {name:<10}  p50 {r['p50']:5.1f}%  p90 {r['p90']:5.1f}%  ({r['scored']} jobs scored, "
            f"{r['no_estimate']} without an estimate)  goal p50 <= 20%: {ok}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
