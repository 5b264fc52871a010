"""The internal worker protocol between the gateway and inference workers.

The gateway serves these routes (authenticated by the worker token, never by user
API keys); workers and the operator call them through `WorkerAPIClient`. Both sides
import the paths and bodies from here, so they cannot drift apart.

    POST {PREFIX}/lease                      LeaseRequest -> 200 Lease | 204 (nothing within wait_seconds)
    POST {PREFIX}/jobs/{job_id}/heartbeat    Heartbeat -> 200 HeartbeatReply | 409 lease lost
    POST {PREFIX}/jobs/{job_id}/complete     body: the image (the request's output_format), header X-Lease-Token -> 200 | 409 stale token
    POST {PREFIX}/jobs/{job_id}/fail         Failure -> 200 | 409 stale token
    POST {PREFIX}/jobs/{job_id}/release      Release -> 200 | 409 (hand the job back to the queue, e.g. on SIGTERM)
    GET  {PREFIX}/queue?since=V&wait_seconds=S   -> QueueSnapshot (long-polls until version > since)
    POST {PREFIX}/workers/status             WorkerStatus -> 200 (runtime state reports)
"""

from __future__ import annotations

import base64
import time
from datetime import datetime
from enum import StrEnum
from typing import Literal

import httpx
from pydantic import BaseModel, Field

PREFIX = "/internal/v1"
LEASE_TOKEN_HEADER = "X-Lease-Token"
WORKER_TOKEN_ENV = "REMOTEGPU_WORKER_TOKEN"


# Result image formats (a request's output_format) and the media type each is served as.
OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# JPEG and WebP quality when a request names none (PNG is lossless and takes none).
DEFAULT_OUTPUT_QUALITY = 90


def image_format(data: bytes) -> str | None:
    """The output format whose signature `data` starts with, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class JobStatus(StrEnum):
    QUEUED = "queued"
    WARMING = "warming"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


class RuntimeState(StrEnum):
    READY = "ready"
    STARTING = "starting"
    SLEEPING = "sleeping"


class GenerationRequest(BaseModel):
    """A validated request with the model's defaults applied: what the worker runs."""

    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    # Raw image file bytes (PNG/JPEG/WebP), base64 in JSON; already validated by the gateway.
    input_images_base64: list[str] = Field(default_factory=list)
    # The result's encoding; output_quality (1-100) for jpeg and webp, None: DEFAULT_OUTPUT_QUALITY.
    output_format: OutputFormat = "png"
    output_quality: int | None = Field(default=None, ge=1, le=100)

    def input_images(self) -> list[bytes]:
        return [base64.b64decode(s) for s in self.input_images_base64]


class LeaseRequest(BaseModel):
    model: str
    worker_id: str
    wait_seconds: float = Field(default=20.0, ge=0, le=60)


class Lease(BaseModel):
    job_id: str
    model: str
    lease_token: str
    lease_expires_at: datetime
    lease_ttl_seconds: float
    attempt: int
    request: GenerationRequest


class Progress(BaseModel):
    step: int
    total_steps: int


class Heartbeat(BaseModel):
    lease_token: str
    progress: Progress | None = None


class HeartbeatAction(StrEnum):
    CONTINUE = "continue"
    CANCEL = "cancel"


class HeartbeatReply(BaseModel):
    action: HeartbeatAction
    lease_expires_at: datetime


class Failure(BaseModel):
    lease_token: str
    error_message: str
    # A retryable failure puts the job back in the queue (bounded attempts).
    retryable: bool = False


class Release(BaseModel):
    lease_token: str
    reason: str = "worker draining"


class ModelQueue(BaseModel):
    queued: int = 0
    warming: int = 0
    running: int = 0
    # Waiting low-priority jobs, in neither `queued` nor `warming` (so not in `depth`): they
    # run only on workers already up; the operator never scales for them.
    low_priority: int = 0
    oldest_wait_seconds: float = 0.0
    # Worker IDs (pod names) holding a lease on one of this model's jobs. The operator
    # marks those pods with a high pod-deletion-cost, so a scale-down takes idle ones.
    busy_workers: list[str] = Field(default_factory=list)
    # Sum of steps x megapixels over the queued and warming jobs: the operator prices
    # the queue in GPU-seconds with it. None from a gateway that does not report it
    # (the operator then assumes every job has the model's default steps and size).
    queued_step_megapixels: float | None = None

    @property
    def depth(self) -> int:
        return self.queued + self.warming + self.running


class QueueSnapshot(BaseModel):
    # Increases whenever any model's queue changes; pass it back as `since` to long-poll.
    version: int
    models: dict[str, ModelQueue]


class WorkerStatus(BaseModel):
    worker_id: str
    model: str
    state: RuntimeState
    load_seconds: float | None = None
    # Consecutive failed loads of the model. With state `sleeping` the worker gave up:
    # the model's waiting jobs fail now, saying so (the next job starts a fresh try).
    load_failures: int = Field(default=0, ge=0)


class ColdStartPhase(StrEnum):
    """A worker's cold start, in the order it happens: what a job that waited for capacity
    waited on.

    The operator reports the first three (from the Deployment's scale-up and the pod's
    status), the worker the next four, the gateway the first lease. The weights are
    fetched by the pod's init container, before the worker's own container starts.
    """

    SCALE_DECISION = "scale_decision"  # the operator raised the replicas
    POD_SCHEDULED = "pod_scheduled"  # the scheduler bound the pod to a node
    CONTAINER_STARTED = "container_started"  # the pod's first container started (the fetcher's, if any)
    WEIGHTS_FETCHED = "weights_fetched"  # the fetcher downloaded them (absent when the node had them)
    PROCESS_STARTED = "process_started"  # the worker process began (before torch's import)
    WEIGHTS_LOADED = "weights_loaded"  # the pipeline is on its device
    WARMED = "warmed"  # compiled and warmed up: ready
    FIRST_LEASE = "first_lease"  # the worker took its first job


COLD_START_PHASES: list[ColdStartPhase] = list(ColdStartPhase)


class WorkerPhases(BaseModel):
    """When a worker reached phases of its cold start (UNIX seconds)."""

    worker_id: str = Field(min_length=1, max_length=300)
    model: str
    phases: dict[ColdStartPhase, float]


class LeaseLost(Exception):
    """The gateway refused a lease token: the job was re-leased, cancelled or finished."""


class WorkerAPIClient:
    """Synchronous client of the internal API (workers run their loop in a thread)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0):
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def lease(self, model: str, worker_id: str, wait_seconds: float = 20.0) -> Lease | None:
        body = LeaseRequest(model=model, worker_id=worker_id, wait_seconds=wait_seconds)
        r = self._http.post("/lease", json=body.model_dump(), timeout=wait_seconds + 30)
        if r.status_code == 204:
            return None
        r.raise_for_status()
        return Lease.model_validate(r.json())

    def heartbeat(self, job_id: str, lease_token: str, progress: Progress | None = None) -> HeartbeatReply:
        r = self._http.post(
            f"/jobs/{job_id}/heartbeat",
            json=Heartbeat(lease_token=lease_token, progress=progress).model_dump(),
        )
        self._raise_lost(r)
        return HeartbeatReply.model_validate(r.json())

    def complete(self, job_id: str, lease_token: str, image: bytes, media_type: str = "image/png") -> None:
        r = self._http.post(
            f"/jobs/{job_id}/complete",
            content=image,
            headers={LEASE_TOKEN_HEADER: lease_token, "Content-Type": media_type},
        )
        self._raise_lost(r)

    def fail(self, job_id: str, lease_token: str, error_message: str, retryable: bool = False) -> None:
        body = Failure(lease_token=lease_token, error_message=error_message, retryable=retryable)
        self._raise_lost(self._http.post(f"/jobs/{job_id}/fail", json=body.model_dump()))

    def release(self, job_id: str, lease_token: str, reason: str = "worker draining") -> None:
        body = Release(lease_token=lease_token, reason=reason)
        self._raise_lost(self._http.post(f"/jobs/{job_id}/release", json=body.model_dump()))

    def queue(self, since: int | None = None, wait_seconds: float = 0.0) -> QueueSnapshot:
        params: dict[str, float | int] = {"wait_seconds": wait_seconds}
        if since is not None:
            params["since"] = since
        r = self._http.get("/queue", params=params, timeout=wait_seconds + 30)
        r.raise_for_status()
        return QueueSnapshot.model_validate(r.json())

    def report_phases(self, phases: WorkerPhases) -> None:
        self._http.post("/workers/phases", json=phases.model_dump(mode="json")).raise_for_status()

    def report_status(self, status: WorkerStatus) -> None:
        self._http.post("/workers/status", json=status.model_dump(mode="json")).raise_for_status()

    @staticmethod
    def _raise_lost(r: httpx.Response) -> None:
        if r.status_code == 409:
            raise LeaseLost(r.text)
        r.raise_for_status()


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)
