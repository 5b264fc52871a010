"""Autoscaling on a job trace: the operator's own decisions against KEDA's and Knative's defaults.

    .venv/bin/python bench/autoscale_sim.py --trace bench/traces/bursty.csv --gpus 4 \
        [--cold-start-seconds 60] [--json]

The trace is CSV with the header ``t_seconds,model,steps,width,height``: one row per
submitted job, t counted from 0, models are catalog ids (base/remotegpu_base/models.yaml).
A job runs steps x megapixels x the model's ``scaling.secondsPerStepMegapixel`` seconds
on one worker; a worker holds ``worker.gpu.count`` GPUs from the moment it is placed,
and takes the cold start to load before it runs a job. Pods that find no free GPU wait
(FIFO) like Pending pods. A scale-down removes waiting pods first, then loading ones,
then idle ones; a busy worker asked to go finishes its job first (graceful termination).

Policies, all on the same simulated clock, GPU pool and cold start:

- remotegpu: the operator's code (remotegpu_operator.scaling: decide, victims and the GPU
  reclaim across models), fed the observations the operator makes, every 0.5 s (the
  operator reacts to queue events within milliseconds).
- keda: a ScaledObject with KEDA's defaults (pollingInterval 30 s: 0 <-> 1 at a poll;
  cooldownPeriod 300 s before 1 -> 0), on queue length (one job per replica), and the HPA
  for 1 <-> N with its default behavior (15 s sync; up: max(100 %, 4 pods) per 15 s;
  down: 300 s stabilization window, 100 % per 15 s).
- knative: the KPA with its defaults, containerConcurrency 1 at the default 70 % target
  utilization (0.7 in flight per pod): a 2 s tick, the 60 s stable window, the 6 s
  panic window (panic at 200 % of the ready pods, held 60 s), max scale-down rate 2,
  scale to zero when the stable window is empty plus the 30 s grace period; the
  activator wakes a revision at zero on the first request.

Both baselines get the catalog's maxReplicas per model, like the operator. Printed per
policy: idle GPU-seconds (GPU held, no job running), p50/p95/p99 wait (submit -> start),
jobs that waited for a cold start, scale events; then the goal ratios against each baseline.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "base"))
sys.path.insert(0, str(REPO / "operator"))

from remotegpu_base.catalog import ImageModelSpec, load_models_file, step_megapixels  # noqa: E402
from remotegpu_base.protocol import ModelQueue  # noqa: E402
from remotegpu_operator import scaling  # noqa: E402

DT = 0.5  # the simulation step, seconds
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Job:
    t: float
    model: str
    seconds: float
    step_megapixels: float = 0.0
    start: float | None = None
    cold: bool = False  # it waited for a worker that was still loading when it arrived


@dataclass
class Pod:
    name: str
    model: str
    gpus: int
    created: float
    placed: float | None = None  # when it got its GPUs
    ready_at: float | None = None
    job: Job | None = None
    job_end: float = 0.0
    draining: bool = False
    released: float | None = None

    def ready(self, t: float) -> bool:
        return self.ready_at is not None and self.ready_at <= t


@dataclass
class ModelState:
    spec: ImageModelSpec
    waiting: deque[Job] = field(default_factory=deque)
    pods: list[Pod] = field(default_factory=list)  # live (not released) pods
    desired: int = 0


class Policy(Protocol):
    name: str

    def desired(self, sim: Sim, model: str, t: float) -> int | None:
        """The model's replica count now, or None to leave it."""
        ...

    def reclaim(self, sim: Sim, t: float) -> list[str]:
        """Pods to remove at once for another model (GPU arbitration)."""
        ...


class Sim:
    def __init__(self, jobs: list[Job], specs: dict[str, ImageModelSpec], gpus: int, cold_start: float):
        self.jobs = sorted(jobs, key=lambda j: j.t)
        self.models = {m: ModelState(specs[m]) for m in sorted({j.model for j in jobs})}
        self.gpus = gpus
        self.cold_start = cold_start
        self.pending: deque[Pod] = deque()  # pods waiting for GPUs, FIFO
        self.done: list[Pod] = []
        self.scale_events = 0
        self._serial = 0

    # -- the cluster ----------------------------------------------------------------
    def free_gpus(self) -> int:
        held = sum(p.gpus for m in self.models.values() for p in m.pods if p.placed is not None)
        return self.gpus - held

    def queue(self, model: str, t: float) -> ModelQueue:
        m = self.models[model]
        running = [p for p in m.pods if p.job is not None]
        waiting = len(m.waiting)
        any_ready = any(p.ready(t) for p in m.pods)
        return ModelQueue(
            queued_step_megapixels=sum(j.step_megapixels for j in m.waiting),
            queued=waiting if any_ready else 0,
            warming=0 if any_ready else waiting,
            running=len(running),
            busy_workers=[p.name for p in running],
        )

    def workers(self, model: str, t: float) -> list[scaling.Worker]:
        return [
            scaling.Worker(
                name=p.name,
                scheduled=p.placed is not None,
                ready=p.ready(t),
                busy=p.job is not None,
                started=EPOCH + timedelta(seconds=p.created),
            )
            for p in self.models[model].pods
            if not p.draining
        ]

    def scale(self, model: str, n: int, t: float, victims: list[str] | None = None) -> None:
        m = self.models[model]
        live = [p for p in m.pods if not p.draining]
        if n == len(live):
            return
        self.scale_events += 1
        if n > len(live):
            for _ in range(n - len(live)):
                self._serial += 1
                pod = Pod(f"{model}-{self._serial}", model, max(1, m.spec.worker.gpu.count), created=t)
                m.pods.append(pod)
                self.pending.append(pod)
            return
        names = victims or scaling.victims(self.workers(model, t), len(live) - n)
        for name in names[: len(live) - n]:
            pod = next(p for p in live if p.name == name)
            self.remove(pod, t)

    def remove(self, pod: Pod, t: float) -> None:
        if pod.job is not None:
            pod.draining = True  # graceful: finishes its job, then goes
            return
        self._release(pod, t)

    def _release(self, pod: Pod, t: float) -> None:
        if pod in self.pending:
            self.pending.remove(pod)
        pod.released = t
        self.models[pod.model].pods.remove(pod)
        self.done.append(pod)

    def _place(self, t: float) -> None:
        while self.pending and self.pending[0].gpus <= self.free_gpus():
            pod = self.pending.popleft()
            pod.placed = t
            pod.ready_at = t + self.cold_start

    def _work(self, t: float) -> None:
        """Runs jobs up to time t (exactly: a worker that ends a job starts the next at that moment)."""
        for m in self.models.values():
            for pod in list(m.pods):
                while True:
                    if pod.job is not None:
                        if pod.job_end > t:
                            break
                        free_at = pod.job_end
                        pod.job = None
                        if pod.draining:
                            self._release(pod, free_at)
                            break
                    else:
                        if pod.ready_at is None or pod.ready_at > t or pod.draining:
                            break
                        free_at = max(pod.ready_at, t - DT)
                    if not m.waiting or m.waiting[0].t > t:
                        break
                    job = m.waiting.popleft()
                    job.start = max(free_at, job.t)
                    job.cold = pod.ready_at is not None and pod.ready_at > job.t
                    pod.job, pod.job_end = job, job.start + job.seconds

    # -- the run --------------------------------------------------------------------
    def run(self, policy: Policy) -> dict[str, Any]:
        arrivals = deque(self.jobs)
        t = 0.0
        last = self.jobs[-1].t if self.jobs else 0.0
        limit = last + 6 * 3600
        while t <= limit:
            while arrivals and arrivals[0].t <= t:
                job = arrivals.popleft()
                self.models[job.model].waiting.append(job)
            self._work(t)
            for name in policy.reclaim(self, t):
                pod = next(p for m in self.models.values() for p in m.pods if p.name == name)
                self.scale_events += 1
                self.remove(pod, t)
            for model in self.models:
                n = policy.desired(self, model, t)
                if n is not None:
                    self.scale(model, n, t)
            self._place(t)
            self._work(t)
            if self._settled():
                if not arrivals:
                    break
                # Nothing runs and nothing waits: jump to the next arrival (on the step grid).
                t = max(t + DT, math.ceil(arrivals[0].t / DT) * DT)
                continue
            t += DT
        for m in self.models.values():
            for pod in list(m.pods):
                self._release(pod, t)
        return self.report()

    def _settled(self) -> bool:
        return all(not m.waiting and not m.pods for m in self.models.values())

    def report(self) -> dict[str, Any]:
        held = sum(p.gpus * ((p.released or 0.0) - p.placed) for p in self.done if p.placed is not None)
        busy = sum(
            j.seconds * max(1, self.models[j.model].spec.worker.gpu.count)
            for j in self.jobs
            if j.start is not None
        )
        waits = sorted((j.start or math.inf) - j.t for j in self.jobs)
        return {
            "idle_gpu_seconds": round(held - busy, 1),
            "p50_wait_seconds": round(percentile(waits, 50), 2),
            "p95_wait_seconds": round(percentile(waits, 95), 2),
            "p99_wait_seconds": round(percentile(waits, 99), 2),
            "cold_starts": sum(j.cold for j in self.jobs),
            "scale_events": self.scale_events,
            "jobs": len(self.jobs),
        }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    k = (len(values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# -- the operator's policy ------------------------------------------------------------


class RemoteGPU:
    """remotegpu_operator.scaling, fed what the operator observes; state carried like handlers.Memory."""

    name = "remotegpu"

    def __init__(self) -> None:
        self.memory: dict[str, scaling.Observation] = {}
        self.decisions: dict[str, scaling.Decision] = {}

    def _observation(self, sim: Sim, model: str, t: float) -> scaling.Observation:
        m = sim.models[model]
        live = [p for p in m.pods if not p.draining]
        prev = self.memory.get(model)
        q = sim.queue(model, t)
        return scaling.Observation(
            scaling=m.spec.scaling,
            pinned=m.spec.replicas,
            queue=q,
            current=len(live),
            unschedulable=sum(1 for p in live if p.placed is None),
            last_active=prev.last_active if prev else None,
            last_saturated=prev.last_saturated if prev else None,
            was_active=prev.was_active if prev else False,
            was_saturated=prev.was_saturated if prev else False,
            scale_downs=prev.scale_downs if prev else (),
            job_seconds=scaling.job_seconds(m.spec),
            cold_start_seconds=sim.cold_start,  # what the operator measures from its pods
            ready=sum(1 for p in live if p.ready(t)),
        )

    def desired(self, sim: Sim, model: str, t: float) -> int | None:
        now = EPOCH + timedelta(seconds=t)
        obs = self._observation(sim, model, t)
        d = scaling.decide(obs, now)
        assert obs.queue is not None
        self.memory[model] = replace(
            obs,
            last_active=d.last_active,
            last_saturated=d.last_saturated,
            scale_downs=d.scale_downs,
            was_active=obs.queue.depth > 0,
            was_saturated=obs.queue.depth > 0 and d.last_saturated == now,
        )
        self.decisions[model] = d
        if d.direction_from(obs.current) is scaling.Direction.DOWN:
            sim.scale(model, d.desired, t, scaling.victims(sim.workers(model, t), obs.current - d.desired))
            return None
        return d.desired

    def reclaim(self, sim: Sim, t: float) -> list[str]:
        if not sim.pending:
            return []  # nobody waits for a GPU: scaling.reclaim() would return nothing
        now = EPOCH + timedelta(seconds=t)
        claims = []
        for model, m in sim.models.items():
            q = sim.queue(model, t)
            workers = sim.workers(model, t)
            claims.append(
                scaling.Claim(
                    model=model,
                    priority=m.spec.scaling.priority,
                    work_seconds=(q.queued + q.warming) * scaling.job_seconds(m.spec),
                    waiting_pods=sum(1 for w in workers if not w.scheduled),
                    gpus_per_worker=max(1, m.spec.worker.gpu.count),
                    idle=tuple(w for w in workers if w.ready and not w.busy),
                    workers=sum(1 for w in workers if w.scheduled),
                    min_residency_seconds=m.spec.scaling.min_residency_seconds,
                )
            )
        released: list[str] = []
        for r in scaling.reclaim(claims, now).reclaims:
            released += r.pods
            # The donor's memory records the scale-down (it counts against its rate limit).
            prev = self.memory.get(r.donor)
            if prev is not None:
                self.memory[r.donor] = replace(prev, scale_downs=(*prev.scale_downs, (now, len(r.pods))))
        return released


# -- the baselines --------------------------------------------------------------------


class Keda:
    """KEDA ScaledObject defaults on queue length, with the HPA's default behavior for 1 <-> N."""

    name = "keda"
    POLLING = 30.0
    COOLDOWN = 300.0
    HPA_SYNC = 15.0
    STABILIZATION_DOWN = 300.0
    TARGET = 1.0  # queue length per replica

    def __init__(self) -> None:
        self.replicas: dict[str, int] = {}
        self.last_active: dict[str, float] = {}
        self.recommendations: dict[str, deque[tuple[float, int]]] = {}
        self.polling = self.syncing = False

    def desired(self, sim: Sim, model: str, t: float) -> int | None:
        m = sim.models[model]
        n = self.replicas.setdefault(model, 0)
        q = sim.queue(model, t)
        length = q.depth
        mx = m.spec.scaling.max_replicas
        if self.polling:
            if length > 0:
                self.last_active[model] = t
                if n == 0:
                    n = 1  # KEDA activates the workload
            elif n > 0 and t - self.last_active.get(model, -math.inf) >= self.COOLDOWN:
                n = 0  # KEDA deactivates after the cooldown
                self.recommendations.pop(model, None)
        if n > 0 and self.syncing:
            raw = max(1, min(mx, math.ceil(length / self.TARGET)))
            recs = self.recommendations.setdefault(model, deque())
            recs.append((t, raw))
            while recs and recs[0][0] < t - self.STABILIZATION_DOWN:
                recs.popleft()
            if raw >= n:
                n = min(raw, max(2 * n, n + 4))  # scale-up policies: 100 % or 4 pods per 15 s
            else:
                n = max(max(r for _, r in recs), 0)  # stabilized: the highest in 300 s
        self.replicas[model] = n
        return n

    def reclaim(self, sim: Sim, t: float) -> list[str]:
        # Called first in every step: is this a polling / HPA sync instant?
        self.polling, self.syncing = t % self.POLLING == 0, t % self.HPA_SYNC == 0
        return []


class Knative:
    """The Knative Pod Autoscaler's defaults, containerConcurrency 1 at 70 % utilization."""

    name = "knative"
    TICK = 2.0
    STABLE = 60.0
    PANIC = 6.0
    TARGET = 0.7
    PANIC_THRESHOLD = 2.0
    MAX_DOWN_RATE = 2.0
    GRACE = 30.0

    def __init__(self) -> None:
        self.samples: dict[str, deque[tuple[float, int]]] = {}
        self.replicas: dict[str, int] = {}
        self.panic_until: dict[str, float] = {}
        self.zero_since: dict[str, float] = {}
        self.ticking = False

    def desired(self, sim: Sim, model: str, t: float) -> int | None:
        m = sim.models[model]
        n = self.replicas.setdefault(model, 0)
        q = sim.queue(model, t)
        samples = self.samples.setdefault(model, deque())
        samples.append((t, q.depth))  # requests in flight (at the activator or in a pod)
        while samples and samples[0][0] <= t - self.STABLE:
            samples.popleft()
        if n == 0 and q.depth > 0:
            n = 1  # the activator pokes the autoscaler on the first request
        if self.ticking:
            mx = m.spec.scaling.max_replicas
            # Averages over the whole window: steps without a sample (nothing ran) count as 0.
            stable = sum(c for _, c in samples) / (self.STABLE / DT)
            panic = sum(c for s, c in samples if s > t - self.PANIC) / (self.PANIC / DT)
            want_stable = min(mx, math.ceil(stable / self.TARGET))
            want_panic = min(mx, math.ceil(panic / self.TARGET))
            ready = sum(1 for p in m.pods if p.ready(t) and not p.draining)
            if want_panic / max(ready, 1) >= self.PANIC_THRESHOLD and want_panic > 0:
                self.panic_until[model] = t + self.STABLE
            if t < self.panic_until.get(model, -math.inf):
                want = max(want_panic, n)  # panic mode never scales down
            else:
                want = max(want_stable, math.floor(n / self.MAX_DOWN_RATE))  # floor, as the KPA does
            if want == 0 and n > 0:
                since = self.zero_since.setdefault(model, t)
                want = 0 if t - since >= self.GRACE else 1
            else:
                self.zero_since.pop(model, None)
            n = want
        self.replicas[model] = n
        return n

    def reclaim(self, sim: Sim, t: float) -> list[str]:
        self.ticking = t % self.TICK == 0  # called first in every step (t is on the 0.5 s grid)
        return []


# -- the command ----------------------------------------------------------------------


def load_trace(path: Path, specs: dict[str, ImageModelSpec]) -> list[Job]:
    jobs = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        want = ["t_seconds", "model", "steps", "width", "height"]
        if reader.fieldnames != want:
            raise SystemExit(f"{path}: the header must be {','.join(want)}, not {reader.fieldnames}")
        for n, row in enumerate(reader, start=2):
            model = row["model"]
            if model not in specs:
                raise SystemExit(
                    f"{path}:{n}: unknown model {model!r}; use a catalog id: {', '.join(sorted(specs))}"
                )
            spec = specs[model]
            work = step_megapixels(int(row["steps"]), int(row["width"]), int(row["height"]))
            seconds = work * spec.scaling.seconds_per_step_megapixel
            jobs.append(Job(float(row["t_seconds"]), model, seconds, work))
    if not jobs:
        raise SystemExit(f"{path}: no jobs")
    return jobs


def simulate(trace: Path, gpus: int, cold_start: float | None) -> dict[str, Any]:
    specs = {m.spec.model: m.spec for m in load_models_file()}
    out: dict[str, Any] = {"policies": {}}
    for policy in (RemoteGPU(), Keda(), Knative()):
        jobs = load_trace(trace, specs)
        start = (
            cold_start
            if cold_start is not None
            else max(specs[j.model].scaling.cold_start_seconds for j in jobs)
        )
        out["policies"][policy.name] = Sim(jobs, specs, gpus, start).run(policy)
    return out


def ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    p = result["policies"]
    ours = p["remotegpu"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else (1.0 if a == b else math.inf)

    return {
        base: {
            "idle_gpu_seconds": ratio(ours["idle_gpu_seconds"], p[base]["idle_gpu_seconds"]),
            "p95_wait_seconds": ratio(ours["p95_wait_seconds"], p[base]["p95_wait_seconds"]),
        }
        for base in ("keda", "knative")
    }


def goals(result: dict[str, Any]) -> dict[str, bool]:
    p = result["policies"]
    ours, keda, knative = p["remotegpu"], p["keda"], p["knative"]
    return {
        "keda: >= 30% fewer idle GPU-seconds at an equal or better p95": ours["idle_gpu_seconds"]
        <= 0.7 * keda["idle_gpu_seconds"]
        and ours["p95_wait_seconds"] <= keda["p95_wait_seconds"],
        "knative: better p95 at equal or fewer idle GPU-seconds": ours["p95_wait_seconds"]
        < knative["p95_wait_seconds"]
        and ours["idle_gpu_seconds"] <= knative["idle_gpu_seconds"],
    }


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, required=True, help="CSV: t_seconds,model,steps,width,height")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the pool")
    ap.add_argument(
        "--cold-start-seconds",
        type=float,
        default=None,
        help="worker load time (default: the catalog's scaling.coldStartSeconds)",
    )
    ap.add_argument("--json", action="store_true", help='print {"policies": {...}} as one JSON object')
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.gpus < 1:
        ap.error("--gpus must be at least 1")
    result = simulate(args.trace, args.gpus, args.cold_start_seconds)
    if args.json:
        print(json.dumps(result))
        return 0
    cols = [
        "idle_gpu_seconds",
        "p50_wait_seconds",
        "p95_wait_seconds",
        "p99_wait_seconds",
        "cold_starts",
        "scale_events",
        "jobs",
    ]
    print(f"{args.trace.name}: {args.gpus} GPUs")
    print(f"{'policy':<10}" + "".join(f"{c:>18}" for c in cols))
    for name, r in result["policies"].items():
        print(f"{name:<10}" + "".join(f"{r[c]:>18}" for c in cols))
    for base, r in ratios(result).items():
        print(
            f"remotegpu / {base}: idle GPU-seconds x{r['idle_gpu_seconds']}, p95 wait x{r['p95_wait_seconds']}"
        )
    for goal, met in goals(result).items():
        print(f"goal {'MET' if met else 'NOT met'}: {goal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
