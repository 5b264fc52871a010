"""Prometheus metrics under the `remotegpu_` prefix, on a registry per app instance."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from remotegpu_base.protocol import QueueSnapshot

JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _QueueCollector(Collector):
    def __init__(self, snapshot: Callable[[], QueueSnapshot], states: Callable[[], dict[str, str]]):
        self._snapshot = snapshot
        self._states = states

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        depth = GaugeMetricFamily(
            "remotegpu_queue_depth",
            "Jobs per model and state (queued, warming, running)",
            labels=["model", "state"],
        )
        oldest = GaugeMetricFamily(
            "remotegpu_queue_oldest_wait_seconds", "Age of the oldest job waiting per model", labels=["model"]
        )
        low = GaugeMetricFamily(
            "remotegpu_queue_low_priority",
            "Low-priority jobs waiting per model (not in remotegpu_queue_depth: they are not demand)",
            labels=["model"],
        )
        for model, q in sorted(snap.models.items()):
            low.add_metric([model], q.low_priority)
            depth.add_metric([model, "queued"], q.queued)
            depth.add_metric([model, "warming"], q.warming)
            depth.add_metric([model, "running"], q.running)
            oldest.add_metric([model], q.oldest_wait_seconds)
        runtime = GaugeMetricFamily(
            "remotegpu_model_runtime_state",
            "1 for the model's current runtime state",
            labels=["model", "state"],
        )
        for model, state in sorted(self._states().items()):
            for s in ("ready", "starting", "sleeping"):
                runtime.add_metric([model, s], 1.0 if s == state else 0.0)
        return [depth, low, oldest, runtime]


class ColdStartTracker:
    """Observes `remotegpu_model_cold_start_seconds`: how long a model stays `starting`
    (workers wanted, none ready) before its first worker is ready. Call `update()`
    whenever a model's runtime state may have changed (the runtime registry's on_change)."""

    def __init__(self, histogram: Histogram, states: Callable[[], dict[str, str]]):
        self._histogram = histogram
        self._states = states
        self._since: dict[str, float] = {}
        self._last: dict[str, str] = {}
        # The latest cold start's seconds per model, from the first job that waited for it
        # (or `starting`, if earlier) to ready: what the ETA of a waiting job expects.
        self.durations: dict[str, float] = {}
        self._waiting_since: dict[str, float] = {}
        self._lock = threading.Lock()

    def job_waits(self, model: str) -> None:
        """A job was queued for a model with no ready worker: a cold start begins (for the
        ETA, which then counts the operator's decision and the pod's start too)."""
        with self._lock:
            self._waiting_since.setdefault(model, time.monotonic())

    def ready_in(self, model: str) -> float | None:
        """Seconds until the model is expected ready (as long as its latest cold start took,
        less the time this one has run); None without one measured."""
        took = self.durations.get(model)
        if took is None:
            return None
        begun = [t for t in (self._since.get(model), self._waiting_since.get(model)) if t is not None]
        return max(0.0, took - (time.monotonic() - min(begun))) if begun else took

    def update(self) -> None:
        states = self._states()
        with self._lock:
            self._update(states, time.monotonic())

    def _update(self, states: dict[str, str], now: float) -> None:
        for model, state in states.items():
            if state == self._last.get(model):
                continue
            self._last[model] = state
            if state == "starting":
                self._since.setdefault(model, now)
            elif state == "ready":
                started = self._since.pop(model, None)
                waited = self._waiting_since.pop(model, None)
                if started is not None:
                    self._histogram.labels(model).observe(now - started)
                begun = [t for t in (started, waited) if t is not None]
                if begun:
                    self.durations[model] = now - min(begun)
            elif self._since.pop(model, None) is not None:  # the start gave up: no cold start
                self._waiting_since.pop(model, None)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter(
            "remotegpu_jobs_submitted", "Jobs accepted by model", ["model"], registry=r
        )
        self.jobs_finished = Counter(
            "remotegpu_jobs_finished", "Jobs that reached a terminal status", ["model", "status"], registry=r
        )
        self.jobs_purged = Counter(
            "remotegpu_jobs_purged",
            "Finished jobs deleted with their images after the retention period",
            registry=r,
        )
        self.job_wait = Histogram(
            "remotegpu_job_wait_seconds",
            "Time from submit to running",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_run = Histogram(
            "remotegpu_job_run_seconds",
            "Time in running until finished",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.cold_start = Histogram(
            "remotegpu_model_cold_start_seconds",
            "Time a model spent starting (workers wanted, none ready) until its first ready worker",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.cold_start_phase = Histogram(
            "remotegpu_cold_start_phase_seconds",
            "A worker's cold-start phases (scale_decision .. first_lease): each phase's seconds since the one before",
            ["model", "phase"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "remotegpu_http_requests",
            "HTTP requests by route, method and code",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_latency = Histogram(
            "remotegpu_http_request_duration_seconds",
            "HTTP request latency by route and method",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        # Usage per API key (usage.py), counted by the replica that metered each job: sum
        # over replicas. The key label is the key's id (`remotegpu keys list` names it).
        self.key_jobs = Counter(
            "remotegpu_key_jobs",
            "Finished jobs by API key, model and status (usage metering)",
            ["key", "model", "status"],
            registry=r,
        )
        self.key_gpu_seconds = Counter(
            "remotegpu_key_gpu_seconds",
            "GPU-seconds (the jobs' run time) by API key and model",
            ["key", "model"],
            registry=r,
        )
        self.rate_limited = Counter(
            "remotegpu_rate_limited_requests",
            "Requests refused with 429 by the per-key limit they hit",
            ["limit"],
            registry=r,
        )

        self.bodies = Gauge(
            "remotegpu_http_request_bodies",
            "Request bodies being read (reading) and waiting for a slot to be read (waiting)",
            ["state"],
            registry=r,
        )

    def add_queue_collector(
        self, snapshot: Callable[[], QueueSnapshot], states: Callable[[], dict[str, str]]
    ) -> None:
        self.registry.register(_QueueCollector(snapshot, states))

    def track_cold_starts(self, states: Callable[[], dict[str, str]]) -> ColdStartTracker:
        """The tracker whose `update` goes to the runtime registry's on_change."""
        return ColdStartTracker(self.cold_start, states)

    def finished(self, model: str, status: str, started_at: float | None, completed_at: float | None) -> None:
        self.jobs_finished.labels(model, status).inc()
        if started_at is not None and completed_at is not None:
            self.job_run.labels(model).observe(max(0.0, completed_at - started_at))


class HttpMetricsMiddleware:
    """Pure ASGI: counts requests and observes latency by route template (bounded labels)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.http_requests.labels(path, method, str(status["code"])).inc()
            self.metrics.http_latency.labels(path, method).observe(time.perf_counter() - start)
