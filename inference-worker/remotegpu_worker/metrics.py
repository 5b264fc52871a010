"""Prometheus metrics of a worker, in their own registry (the embedded default runs the
gateway in the same process, with its own registry)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_SECONDS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

OUTCOMES = ("succeeded", "failed", "cancelled", "released", "lost")


class _GpuMemoryCollector:
    """GPU memory per CUDA device, read at scrape time (nothing when there is no CUDA)."""

    def collect(self) -> Any:
        try:
            import torch

            if not torch.cuda.is_available():
                return
            allocated = GaugeMetricFamily(
                "remotegpu_worker_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]
            )
            reserved = GaugeMetricFamily(
                "remotegpu_worker_gpu_memory_reserved_bytes",
                "GPU memory reserved by the caching allocator",
                labels=["device"],
            )
            peak = GaugeMetricFamily(
                "remotegpu_worker_gpu_memory_peak_bytes", "Peak GPU memory held by tensors", labels=["device"]
            )
            total = GaugeMetricFamily(
                "remotegpu_worker_gpu_memory_total_bytes", "GPU memory size", labels=["device"]
            )
            for i in range(torch.cuda.device_count()):
                d = str(i)
                allocated.add_metric([d], float(torch.cuda.memory_allocated(i)))
                reserved.add_metric([d], float(torch.cuda.memory_reserved(i)))
                peak.add_metric([d], float(torch.cuda.max_memory_allocated(i)))
                total.add_metric([d], float(torch.cuda.get_device_properties(i).total_memory))
            yield from (allocated, reserved, peak, total)
        except Exception:  # noqa: BLE001 - a scrape must not fail because of CUDA
            return


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.inference_seconds = Histogram(
            "remotegpu_worker_inference_seconds",
            "Pipeline call time per image (text encoding, denoising, VAE decode)",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.encode_seconds = Histogram(
            "remotegpu_worker_encode_seconds",
            "PNG encoding time per image (outside the engine lock: it overlaps the next job)",
            ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.job_seconds = Histogram(
            "remotegpu_worker_job_seconds",
            "Lease to complete/fail/release, per job",
            ["model", "outcome"],
            buckets=_SECONDS,
            registry=r,
        )
        self.steps_per_second = Gauge(
            "remotegpu_worker_steps_per_second",
            "Denoising steps per second of the last image",
            ["model"],
            registry=r,
        )
        self.denoise_steps = Counter(
            "remotegpu_worker_denoise_steps",
            "Denoising steps run (rate / denoise seconds = steps/s)",
            ["model"],
            registry=r,
        )
        self.denoise_seconds = Counter(
            "remotegpu_worker_denoise_seconds", "Time spent in denoising loops", ["model"], registry=r
        )
        self.load_seconds = Gauge(
            "remotegpu_worker_model_load_seconds",
            "Time to load the weights (from_pretrained and placement)",
            ["model"],
            registry=r,
        )
        self.warmup_seconds = Gauge(
            "remotegpu_worker_model_warmup_seconds", "Time of the warm-up generation", ["model"], registry=r
        )
        self.jobs = Counter("remotegpu_worker_jobs", "Jobs by outcome", ["model", "outcome"], registry=r)
        self.ready = Gauge("remotegpu_worker_ready", "1 once loaded and warmed up", ["model"], registry=r)
        self.busy = Gauge("remotegpu_worker_busy", "1 while a job is running", ["model"], registry=r)
        self.draining = Gauge("remotegpu_worker_draining", "1 after SIGTERM", ["model"], registry=r)
        self.heartbeat_errors = Counter(
            "remotegpu_worker_heartbeat_errors",
            "Heartbeats that failed (network or gateway errors)",
            ["model"],
            registry=r,
        )
        r.register(_GpuMemoryCollector())

    def init_model(self, model: str) -> None:
        """Creates the labelled series so they read 0 before the first job."""
        for o in OUTCOMES:
            self.jobs.labels(model, o)
        self.ready.labels(model).set(0)
        self.busy.labels(model).set(0)
        self.draining.labels(model).set(0)
        self.denoise_steps.labels(model)
        self.denoise_seconds.labels(model)
