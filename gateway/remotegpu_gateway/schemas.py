"""Request and response bodies of the public API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

# Per-key limits are stored as 32-bit integers (PostgreSQL `integer`).
MAX_LIMIT = 2**31 - 1
Guidance = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class SizeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: StrictInt = Field(description="Width in pixels; with height, one of the size presets")
    height: StrictInt = Field(description="Height in pixels; with width, one of the size presets")


class ImageRequest(BaseModel):
    """POST /v1/inference/image. Unknown fields are rejected (422); see the endpoint notes."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr = Field(min_length=1, description="Main generation prompt (required)")
    model: StrictStr = Field(min_length=1, description="A model ID from GET /v1/inference/models (required)")
    negative_prompt: StrictStr | None = Field(default=None, description="Only for models that support it")
    size: SizeIn | None = Field(
        default=None, description="One of the model's size presets; default: model default"
    )
    steps: StrictInt | None = Field(default=None, description="Default: the model's default")
    guidance: Guidance | None = Field(
        default=None, description="Default: the model's default; fixed on some models"
    )
    seed: StrictInt | None = Field(default=None, ge=0, le=2**32 - 1, description="Default: random")
    input_images_base64: list[StrictStr] | None = Field(
        default=None, description="Source images as raw base64 or data URLs; count within the model's limits"
    )
    # Extensions (optional; see gateway/README.md).
    priority: Literal["normal", "low"] | None = Field(
        default=None,
        description="Extension. `low`: runs only on workers already up (never wakes a sleeping model or adds "
        "replicas), after the model's normal jobs. Default `normal`",
    )
    deadline_seconds: StrictInt | None = Field(
        default=None,
        ge=1,
        le=7 * 24 * 3600,
        description="Extension. A job not finished this long after it was submitted is cancelled (running or "
        "not), with the reason in error_message",
    )
    webhook_url: StrictStr | None = Field(
        default=None,
        max_length=2000,
        description="Extension. http(s) URL that receives signed Standard Webhooks (job.running, job.completed); "
        "private, loopback and link-local addresses only if the gateway allows them. The API key needs a "
        "webhook secret (`remotegpu keys webhook-secret NAME`)",
    )
    webhook_events: list[Literal["running", "completed"]] | None = Field(
        default=None,
        min_length=1,
        description="Extension. Which webhooks to send (default both); `completed` covers succeeded, failed and "
        "cancelled",
    )
    # Extensions (optional): how the worker encodes the result.
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        default=None, description="Extension: the result's format, served with its content type; default png"
    )
    output_quality: StrictInt | None = Field(
        default=None, ge=1, le=100, description="Extension: jpeg/webp quality 1-100 (default 90); not for png"
    )


class EnqueueResponse(BaseModel):
    job_id: str
    job_type: Literal["image"] = "image"
    result_url: str


class JobStatusResponse(BaseModel):
    job_id: str
    job_type: Literal["image"] = "image"
    model: str
    status: Literal["queued", "warming", "running", "succeeded", "failed", "cancelled"]
    created_at: str
    updated_at: str
    started_at: str | None
    completed_at: str | None
    wait_ms: int
    run_ms: int
    result_url: str | None
    error_message: str | None
    # Extensions, present while the job has not finished (see gateway/README.md).
    queue_position: int | None = Field(
        default=None, description="Extension. Waiting jobs of the model a worker takes first (0: next)"
    )
    estimated_start_at: str | None = Field(
        default=None,
        description="Extension. Expected start, UTC to the millisecond (null: not yet estimable)",
    )
    estimated_completion_at: str | None = Field(
        default=None,
        description="Extension. Expected completion, UTC to the millisecond (null: not yet estimable)",
    )


class TimelinePhase(BaseModel):
    phase: Literal[
        "scale_decision",
        "pod_scheduled",
        "container_started",
        "weights_fetched",
        "process_started",
        "weights_loaded",
        "warmed",
        "first_lease",
    ]
    at: str = Field(description="When the worker reached the phase, UTC to the millisecond")
    seconds: float | None = Field(description="Time since the phase before (null for the first)")
    since_submit_seconds: float = Field(description="Time since the job was submitted (negative: before it)")


class JobTimelineResponse(BaseModel):
    """Extension: the cold start a job waited for."""

    job_id: str
    model: str
    worker_id: str | None = Field(description="The worker (pod) that ran the job; null before it ran")
    waited_for_capacity: bool | None = Field(
        description="Submitted before its worker was ready; null before the job ran"
    )
    weights_cached: bool | None = Field(
        description="The worker fetched no weights (they were in its node's cache); null when not reported"
    )
    created_at: str
    phases: list[TimelinePhase]


class JobListResponse(BaseModel):
    jobs: list[JobStatusResponse]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class WebhookDeliveryInfo(BaseModel):
    id: str = Field(description="The webhook-id header (the same on every retry)")
    event: Literal["job.running", "job.completed"]
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: float
    next_attempt_at: float | None
    last_attempt_at: float | None
    delivered_at: float | None
    last_status_code: int | None
    last_error: str | None


class WebhookDeliveries(BaseModel):
    deliveries: list[WebhookDeliveryInfo]


class WebhookSecret(BaseModel):
    key_id: str
    webhook_secret: str = Field(description="whsec_ secret that signs this key's webhooks; shown only here")


class CancelResponse(JobStatusResponse):
    cancel: Literal["cancelled", "requested", "already_cancelled"] = Field(
        description="cancelled: done now; requested: the worker stops at its next step; "
        "already_cancelled: nothing changed"
    )
    message: str


class ErrorItem(BaseModel):
    field: str | None
    message: str


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None
    errors: list[ErrorItem]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Summary(BaseModel):
    count: int
    p50: int | None
    p95: int | None


class RecentSummaryStats(BaseModel):
    window_seconds: int
    wait_ms: Summary
    run_ms: Summary
    total_ms: Summary


class Runtime(BaseModel):
    state: Literal["ready", "starting", "sleeping"]
    available: bool
    unavailable_reason: str | None
    ready_workers: int


class ModelEntry(BaseModel):
    model: str
    description: str
    parameters: dict[str, Any]
    runtime: Runtime
    recent_summary_stats: RecentSummaryStats


class ModelsResponse(BaseModel):
    image: list[ModelEntry]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=200)
    scopes: list[Literal["inference", "admin"]] = Field(default=["inference"], min_length=1)
    expires_in_seconds: StrictInt | None = Field(
        default=None, ge=1, le=10 * 365 * 24 * 3600, description="The secret expires this long after creation"
    )
    # Extension: the key's own limits (absent: the gateway's defaults; 0: unlimited).
    requests_per_minute: StrictInt | None = Field(default=None, ge=0, le=MAX_LIMIT)
    max_concurrent_jobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LIMIT)
    gpu_seconds_per_day: float | None = Field(default=None, ge=0, le=MAX_LIMIT, allow_inf_nan=False)


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_seconds: StrictInt = Field(default=0, ge=0, le=30 * 24 * 3600)


class KeySecretInfo(BaseModel):
    id: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class KeyInfo(BaseModel):
    id: str
    name: str
    scopes: list[str]
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    secrets: list[KeySecretInfo]


class KeyWithSecret(KeyInfo):
    key: str = Field(description="The secret, shown only in this response")


class KeyLimitsUpdate(BaseModel):
    """PATCH body: the named limits change (null: back to the gateway's default), others stay."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: StrictInt | None = Field(
        default=None, ge=0, le=MAX_LIMIT, description="0: unlimited"
    )
    max_concurrent_jobs: StrictInt | None = Field(
        default=None, ge=0, le=MAX_LIMIT, description="0: unlimited"
    )
    gpu_seconds_per_day: float | None = Field(
        default=None, ge=0, le=MAX_LIMIT, allow_inf_nan=False, description="0: unlimited"
    )


class KeyLimitOverrides(BaseModel):
    requests_per_minute: int | None
    max_concurrent_jobs: int | None
    gpu_seconds_per_day: float | None


class KeyLimitsView(BaseModel):
    key_id: str
    requests_per_minute: int = Field(description="In force (the key's own, else the default); 0: unlimited")
    max_concurrent_jobs: int
    gpu_seconds_per_day: float
    overrides: KeyLimitOverrides = Field(description="The key's own values; null: the gateway's default")


class UsageBucket(BaseModel):
    jobs: int = Field(description="Finished jobs: succeeded + failed + cancelled")
    succeeded: int
    failed: int
    cancelled: int
    gpu_seconds: float = Field(description="The jobs' run time (run_ms / 1000)")


class ModelUsage(UsageBucket):
    model: str


class DayUsage(ModelUsage):
    day: str = Field(description="UTC date the jobs finished, YYYY-MM-DD")


class KeyUsage(BaseModel):
    key_id: str
    total: UsageBucket
    by_model: list[ModelUsage]
    by_day: list[DayUsage]


class UsageReport(BaseModel):
    since: str | None
    until: str | None
    keys: list[KeyUsage]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with $defs inlined (for openapi_extra request bodies)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.split("/")[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)
