"""The model catalog, defined once: the `ImageModel` spec.

The same schema is the CRD's spec (crds/imagemodels.yaml), the embedded default's
models file (base/remotegpu_base/models.yaml) and the entry a worker receives. Kubernetes
field names are camelCase; the public API renders parameters in snake_case.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "remotegpu.ai"
API_VERSION = "v1alpha1"
KIND = "ImageModel"
PLURAL = "imagemodels"


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """The ImageModel `body` as the controlling owner of what the operator makes for it
    (worker Deployment, pre-warm DaemonSet): they go when it goes."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# The spec's fixed preset table (aspect ratio -> sizes). Requests and input images
# must match one of these; a model may allow a subset.
SIZE_PRESETS: dict[str, list[tuple[int, int]]] = {
    "1:1": [(512, 512), (1024, 1024), (2048, 2048)],
    "4:3": [(1024, 768), (1536, 1152), (2048, 1536)],
    "3:4": [(768, 1024), (1152, 1536), (1536, 2048)],
    "16:9": [(1280, 720), (1536, 864), (2048, 1152)],
    "9:16": [(720, 1280), (864, 1536), (1152, 2048)],
}
ALL_SIZES: list[str] = [f"{w}x{h}" for sizes in SIZE_PRESETS.values() for w, h in sizes]
MAX_INPUT_IMAGE_SIDE = 8192
# Text-encoder tokens a prompt may take when serving.maxSequenceLength is unset: what
# every FLUX pipeline's encoder reads by default.
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def size_name(width: int, height: int) -> str:
    return f"{width}x{height}"


def parse_size(name: str) -> tuple[int, int]:
    w, _, h = name.partition("x")
    return int(w), int(h)


class Architecture(StrEnum):
    """Which diffusers pipeline serves the model."""

    FLUX1 = "flux1"  # FluxPipeline (schnell, dev)
    FLUX1_KONTEXT = "flux1-kontext"  # FluxKontextPipeline
    FLUX2 = "flux2"  # Flux2Pipeline
    FLUX2_KLEIN = "flux2-klein"  # Flux2KleinPipeline


class MemoryPlacement(StrEnum):
    """Where the weights live while serving (inference-worker/README.md: what fits where)."""

    AUTO = "auto"  # chosen at load time from the pipeline's size and the GPU's memory
    GPU = "gpu"  # everything resident
    # Transformer and VAE resident; the text encoder streamed in from pinned host memory
    # for each prompt (FLUX.2-dev in bf16 on an 80 GB GPU).
    TEXT_ENCODER_OFFLOAD = "text-encoder-offload"
    MODEL_CPU_OFFLOAD = "model-cpu-offload"  # each model moved in whole when it runs
    SEQUENTIAL_CPU_OFFLOAD = "sequential-cpu-offload"  # layer by layer; slowest, smallest


class Quantization(StrEnum):
    """Lossy, opt-in: the image changes (bench/worker_gpu.py reports the PSNR against bf16)."""

    NONE = "none"
    FP8 = "fp8"  # torchao float8 weights and activations (per-row scales) in the transformer


class StepCacheType(StrEnum):
    """diffusers' step caches: skip transformer work on steps that change little. Lossy."""

    FIRST_BLOCK = "first-block"  # First-Block-Cache
    TAYLORSEER = "taylorseer"  # TaylorSeer: predict blocks' outputs from earlier steps


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Size(_Spec):
    width: int
    height: int

    @property
    def name(self) -> str:
        return size_name(self.width, self.height)


class PromptParams(_Spec):
    max_length: int = Field(ge=1)


class NegativePromptParams(_Spec):
    supported: bool = False
    max_length: int = Field(default=2048, ge=1)


class SizeParams(_Spec):
    default: Size
    allowed: list[str] = Field(default_factory=lambda: list(ALL_SIZES))

    @model_validator(mode="after")
    def _known_presets(self) -> SizeParams:
        unknown = [s for s in self.allowed if s not in ALL_SIZES]
        if unknown:
            raise ValueError(f"sizes {unknown} are not presets; presets are {ALL_SIZES}")
        if self.default.name not in self.allowed:
            raise ValueError(f"default size {self.default.name} is not in allowed sizes")
        return self


class StepsParams(_Spec):
    default: int = Field(ge=1)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> StepsParams:
        if not self.min <= self.default <= self.max:
            raise ValueError("steps must satisfy min <= default <= max")
        return self


class GuidanceParams(_Spec):
    default: float = Field(ge=0)
    min: float = Field(default=0.0, ge=0)
    max: float = Field(default=20.0, ge=0)
    # A fixed guidance cannot be changed by requests (e.g. schnell's 0).
    fixed: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> GuidanceParams:
        if not self.min <= self.default <= self.max:
            raise ValueError("guidance must satisfy min <= default <= max")
        return self


class InputImageParams(_Spec):
    min: int = Field(default=0, ge=0)
    max: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> InputImageParams:
        if self.min > self.max:
            raise ValueError("inputImages.min must be <= inputImages.max")
        return self


def step_megapixels(steps: int, width: int, height: int) -> float:
    """A job's work: denoising steps x megapixels (the autoscaler prices it in GPU-seconds)."""
    return steps * width * height / 1e6


class Parameters(_Spec):
    prompt: PromptParams
    negative_prompt: NegativePromptParams = Field(default_factory=NegativePromptParams)
    size: SizeParams
    steps: StepsParams
    guidance: GuidanceParams
    input_images: InputImageParams = Field(default_factory=InputImageParams)

    def default_step_megapixels(self) -> float:
        """The work of a job at the default steps and size."""
        return step_megapixels(self.steps.default, self.size.default.width, self.size.default.height)

    def public(self, max_tokens: int) -> dict[str, Any]:
        """The snake_case rendering served by GET /v1/inference/models."""
        return {
            # max_tokens (an extension): the text-encoder token limit behind max_length
            "prompt": {"required": True, "max_length": self.prompt.max_length, "max_tokens": max_tokens},
            "negative_prompt": {
                "supported": self.negative_prompt.supported,
                "max_length": self.negative_prompt.max_length if self.negative_prompt.supported else None,
            },
            "size": {
                "default": {"width": self.size.default.width, "height": self.size.default.height},
                "allowed": [{"width": w, "height": h} for w, h in map(parse_size, self.size.allowed)],
            },
            "steps": {"default": self.steps.default, "min": self.steps.min, "max": self.steps.max},
            "guidance": {
                "default": self.guidance.default,
                "min": self.guidance.min,
                "max": self.guidance.max,
                "fixed": self.guidance.fixed,
            },
            "seed": {"min": 0, "max": 2**32 - 1, "default": None},
            "input_images": {"min": self.input_images.min, "max": self.input_images.max},
        }


class Weights(_Spec):
    # A Hugging Face repo id (resolved from the local cache when HF_HUB_OFFLINE=1)
    # or a local folder written by save_pretrained.
    source: str
    revision: str | None = None
    # Random-weight models built by `remotegpu models build-tiny`; they produce noise.
    random: bool = False


class SecretKeyRef(_Spec):
    name: str = Field(min_length=1)
    key: str = "token"


class HuggingFaceSource(_Spec):
    repo: str = Field(min_length=1)
    # A commit hash pins the weights (a branch or tag is resolved at each fetch).
    revision: str | None = None
    token_secret: SecretKeyRef | None = None  # HF_TOKEN for gated or private repos
    endpoint: str | None = None  # HF_ENDPOINT: a mirror or a private Hub


class PVCSource(_Spec):
    claim_name: str = Field(min_length=1)
    path: str = ""  # the model's folder inside the claim


class HostPathSource(_Spec):
    path: str = Field(min_length=1)


class S3Credentials(_Spec):
    """A Secret with an access key (the chart's objectStorage.existingSecret has the same keys)."""

    name: str = Field(min_length=1)
    access_key_id_key: str = Field(default="accessKeyId", min_length=1)
    secret_access_key_key: str = Field(default="secretAccessKey", min_length=1)


# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, a letter or digit at each end.
S3_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class S3Source(_Spec):
    """An S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...): every object under
    `prefix` is a file of the model's folder (as save_pretrained wrote it)."""

    bucket: str
    prefix: str = ""  # the model's folder in the bucket, e.g. "models/flux1-dev"
    endpoint: str | None = None  # an S3-compatible server's URL; unset: AWS S3
    region: str | None = None  # unset: us-east-1
    # Unset: the pod's own identity (IRSA / workload identity on the worker's ServiceAccount).
    credentials_secret: S3Credentials | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not re.match(S3_BUCKET_PATTERN, v):
            raise ValueError(
                f"cache.source.s3.bucket {v!r} is not a bucket name: give the bucket alone (3-63 lowercase "
                "letters, digits, dots, hyphens), the folder in prefix and the server in endpoint"
            )
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(
                f"cache.source.s3.endpoint {v!r} must be the server's URL, e.g. http://seaweedfs-s3.storage:8333 "
                "(leave it unset for AWS S3)"
            )
        return v

    @property
    def key_prefix(self) -> str:
        """The prefix as object keys start with it: no leading slash, one trailing slash."""
        p = self.prefix.strip("/")
        return f"{p}/" if p else ""


class CacheSource(_Spec):
    """Where the fetcher gets the weights (exactly one; none: weights.source as a Hub repo)."""

    hugging_face: HuggingFaceSource | None = None
    s3: S3Source | None = None
    pvc: PVCSource | None = None
    host_path: HostPathSource | None = None

    @model_validator(mode="after")
    def _one(self) -> CacheSource:
        if sum(x is not None for x in (self.hugging_face, self.s3, self.pvc, self.host_path)) != 1:
            raise ValueError("cache.source takes exactly one of huggingFace, s3, pvc, hostPath")
        return self


class NodeLocalCache(_Spec):
    # The node's folder for model caches (created if missing; writable by uid 10001).
    path: str = "/var/lib/remotegpu/models"


class SharedCache(_Spec):
    claim_name: str = Field(min_length=1)  # a ReadWriteMany PersistentVolumeClaim


class CacheVerify(StrEnum):
    SIZES = "Sizes"  # every file present at its recorded size (a partial fetch is caught)
    FULL = "Full"  # and its SHA-256 (a corrupted file is caught; reads every byte)


class ModelCache(_Spec):
    """Weights fetched once per node (or once per shared volume) and mounted read-only."""

    source: CacheSource | None = None
    node_local: NodeLocalCache | None = None
    pvc: SharedCache | None = None
    # Fetch on the GPU nodes the workers may use before the first job (a DaemonSet).
    prewarm: bool = False
    # What each worker pod checks before it starts (pre-warm pods check Full).
    verify: CacheVerify = CacheVerify.SIZES

    @model_validator(mode="after")
    def _one_place(self) -> ModelCache:
        if (self.node_local is None) == (self.pvc is None):
            raise ValueError("cache takes exactly one of nodeLocal, pvc")
        return self


class StepCache(_Spec):
    type: StepCacheType
    # first-block: relative change of the first block's residual under which a step reuses
    # the cached rest of the transformer (higher: faster, further from the full image).
    threshold: float = Field(default=0.05, gt=0)
    # taylorseer: denoising steps between two full computations.
    interval: int = Field(default=5, ge=1)


class Serving(_Spec):
    memory: MemoryPlacement = MemoryPlacement.GPU
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    warmup_steps: int = Field(default=1, ge=0)
    # The longest prompt in text-encoder tokens (FLUX.1-schnell was trained on 256); unset:
    # 512. A longer prompt fails the job with `bad input`, never silently cut.
    max_sequence_length: int | None = Field(default=None, ge=1, le=512)
    # Lossless speed-ups (remotegpu_worker.engine.optimize); unset: the measured defaults
    # for the architecture on a GPU, [] none. $REMOTEGPU_OPTIMIZATIONS overrides both.
    optimizations: list[str] | None = None
    quantization: Quantization = Quantization.NONE
    step_cache: StepCache | None = None
    # Strength of a negative prompt on FLUX.1 models (true CFG: a second pass per step).
    true_cfg_scale: float = Field(default=4.0, gt=1.0)


class GPU(_Spec):
    count: int = Field(default=1, ge=0)
    resource_name: str = "nvidia.com/gpu"


class QoS(StrEnum):
    """The worker pods' Kubernetes QoS class, from their CPU and memory requests and limits."""

    # limits = requests for CPU and memory: evicted last, never OOM-killed before others
    GUARANTEED = "Guaranteed"
    # requests as given, limits as given (no CPU limit: bursts on idle cores)
    BURSTABLE = "Burstable"


# A restricted container securityContext (the Pod Security Standards' "restricted" level);
# the worker image runs as uid 10001.
RESTRICTED_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


class WorkerPod(_Spec):
    image: str = "ghcr.io/remotegpu/worker:0.1.0"
    command: list[str] | None = None
    env: list[dict[str, Any]] = Field(default_factory=list)
    # CPU, memory and ephemeral-storage requests and limits (the catalog's per model);
    # the GPU limit comes from `gpu`.
    resources: dict[str, Any] = Field(default_factory=dict)
    qos: QoS = QoS.GUARANTEED
    gpu: GPU = Field(default_factory=GPU)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str | None = None
    runtime_class_name: str | None = None  # e.g. nvidia
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list)
    # The container's securityContext; unset: RESTRICTED_SECURITY_CONTEXT.
    security_context: dict[str, Any] | None = None
    pod_annotations: dict[str, str] = Field(default_factory=dict)  # extra annotations on worker pods
    volumes: list[dict[str, Any]] = Field(default_factory=list)  # e.g. a PVC with the weights cache
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)
    service_account_name: str | None = None
    termination_grace_period_seconds: int = Field(default=300, ge=0)


class ScalingMode(StrEnum):
    QUEUE = "Queue"  # the operator scales the workers from the queued work
    EXTERNAL = "External"  # an HPA or KEDA scales the worker Deployment; the operator only reports
    FIXED = "Fixed"  # always minReplicas workers (`kubectl scale` sets it); maxReplicas unused


class Scaling(_Spec):
    mode: ScalingMode = ScalingMode.QUEUE
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=1, ge=0)
    jobs_per_replica: int = Field(default=1, ge=1)
    # Idle window before a scale-down; None: derived from the cold start (idle_window()).
    idle_seconds: int | None = Field(default=None, ge=0)
    scale_up_limit: int = Field(default=4, ge=1)  # most replicas added per decision
    # Scale-down rate limit, like the HPA's behavior policy: at most scaleDownLimit
    # replicas removed per scaleDownPeriodSeconds.
    scale_down_limit: int = Field(default=1, ge=1)
    scale_down_period_seconds: int = Field(default=60, ge=0)
    # Work-based capacity: enough workers to drain the queued GPU-seconds within this time.
    target_drain_seconds: float = Field(default=60.0, gt=0)
    # GPU-seconds one step costs per megapixel until the operator has measured it.
    seconds_per_step_megapixel: float = Field(default=0.25, gt=0)
    # A worker's load time (pod start to ready) until the operator has measured it.
    cold_start_seconds: float = Field(default=60.0, ge=0)
    # Higher-priority models take idle GPUs of lower-priority ones when GPUs run out.
    priority: int = 0
    # A worker is not reclaimed for another model before it has lived this long.
    min_residency_seconds: int = Field(default=120, ge=0)
    # Longest a job waits to start before it fails; None: the gateway's default (15 min).
    start_timeout_seconds: int | None = Field(default=None, ge=1)

    def idle_window(self, cold_start_seconds: float | None = None) -> float:
        """Seconds an idle worker is kept: idleSeconds, else the cold start / (e - 1).

        Keeping an idle worker costs GPU-seconds; stopping it costs a cold start when the
        next job comes. cold start / (e - 1) is the mean threshold of the randomized
        ski-rental rule, which is within e / (e - 1) of the best choice in hindsight.
        `cold_start_seconds` is the measured load time (else coldStartSeconds).
        """
        if self.idle_seconds is not None:
            return float(self.idle_seconds)
        cold = self.cold_start_seconds if cold_start_seconds is None else cold_start_seconds
        return cold / (math.e - 1)

    @model_validator(mode="after")
    def _bounds(self) -> Scaling:
        if self.mode is not ScalingMode.FIXED and self.min_replicas > self.max_replicas:
            raise ValueError("scaling.minReplicas must be <= scaling.maxReplicas")
        return self


class ImageModelSpec(_Spec):
    model: str = Field(min_length=1)  # the public model ID clients send
    architecture: Architecture
    description: str = ""
    # A fixed worker count, capped at scaling.maxReplicas; None means autoscale. (The CRD's
    # scale subresource writes scaling.minReplicas, a path that always has a value.)
    replicas: int | None = Field(default=None, ge=0)
    parameters: Parameters
    weights: Weights
    serving: Serving = Field(default_factory=Serving)
    worker: WorkerPod = Field(default_factory=WorkerPod)
    scaling: Scaling = Field(default_factory=Scaling)
    cache: ModelCache | None = None

    @model_validator(mode="after")
    def _cache_has_a_source(self) -> ImageModelSpec:
        if self.cache is not None and self.cache.source is None and self.weights.random:
            raise ValueError(
                "cache.source is required for random-weight models (weights.source is a local folder)"
            )
        return self

    @model_validator(mode="after")
    def _step_cache_fits(self) -> ImageModelSpec:
        cache = self.serving.step_cache
        flux2 = self.architecture in (Architecture.FLUX2, Architecture.FLUX2_KLEIN)
        if cache is not None and cache.type is StepCacheType.FIRST_BLOCK and flux2:
            # diffusers 0.42's hook subtracts a FLUX.2 double block's tuple from a single
            # block's tensor; TaylorSeer has no such assumption.
            raise ValueError(
                "the first-block step cache does not work on FLUX.2 in diffusers 0.42; "
                "use stepCache.type taylorseer"
            )
        return self

    def cache_source(self) -> CacheSource | None:
        """Where the model cache's fetcher gets the weights (None without a cache)."""
        if self.cache is None:
            return None
        return self.cache.source or CacheSource(
            hugging_face=HuggingFaceSource(repo=self.weights.source, revision=self.weights.revision)
        )

    @property
    def max_prompt_tokens(self) -> int:
        return self.serving.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH

    def public_parameters(self) -> dict[str, Any]:
        return self.parameters.public(max_tokens=self.max_prompt_tokens)


class ImageModel(BaseModel):
    """One catalog entry: a resource name and its spec."""

    name: str
    spec: ImageModelSpec

    @classmethod
    def from_resource(cls, obj: dict[str, Any]) -> ImageModel:
        return cls(name=obj["metadata"]["name"], spec=ImageModelSpec.model_validate(obj["spec"]))

    def to_resource(self, namespace: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name}
        if namespace:
            meta["namespace"] = namespace
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": meta,
            "spec": self.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        }


DEFAULT_MODELS_FILE = Path(__file__).with_name("models.yaml")


def load_models_file(path: Path | str = DEFAULT_MODELS_FILE) -> list[ImageModel]:
    """Reads a models file: ImageModel resources as YAML documents (kubectl-compatible)."""
    models = []
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            if doc.get("kind") != KIND:
                raise ValueError(f"{path}: expected kind {KIND}, got {doc.get('kind')!r}")
            models.append(ImageModel.from_resource(doc))
    ids = [m.spec.model for m in models]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"{path}: model IDs listed twice: {sorted(dupes)}")
    return models
