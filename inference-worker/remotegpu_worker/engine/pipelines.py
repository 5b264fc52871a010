"""The inference engine: one diffusers FLUX pipeline, loaded once, run one request at a time.

Everything model-specific comes from the catalog entry (`ImageModelSpec`): which
pipeline family (`architecture`), where the weights are (`weights`), how they are
placed in memory (`serving.memory`), the dtype (`serving.dtype`), the warm-up, and
the request limits (`parameters`). The per-architecture code below only maps a
`GenerationRequest` onto the call signature of that diffusers pipeline.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotegpu.catalog import Architecture, ImageModel, ImageModelSpec, MemoryPlacement
from remotegpu.protocol import GenerationRequest
from remotegpu_worker.engine import optimize
from remotegpu_worker.engine import weights as weights_mod
from remotegpu_worker.engine.errors import BadInput, EngineNotReady, JobCancelled, OutOfMemory

log = logging.getLogger("remotegpu_worker.engine")

StepCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    png: bytes
    width: int
    height: int
    steps: int
    seconds: float  # the whole pipeline call (text encoding, denoising, VAE decode)
    denoise_seconds: float  # first transformer call to the last step's end
    encode_seconds: float  # PNG encoding

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.denoise_seconds if self.denoise_seconds > 0 else 0.0


@dataclass
class LoadInfo:
    source: str
    device: str
    dtype: str
    memory: str
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    pipeline: str = ""
    notes: list[str] = field(default_factory=list)


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(spec: ImageModelSpec, device: str) -> Any:
    import torch

    name = (spec.serving.dtype or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if name not in table:
        raise ValueError(f"serving.dtype {spec.serving.dtype!r} is not one of auto, {', '.join(table)}")
    return table[name]


def _quiet_progress_bars() -> None:
    """Loading progress bars are noise in a service log; load time is logged and exported."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


_IMPORT_LOCK = threading.Lock()
# One load at a time per process: from_pretrained builds modules under accelerate's
# init_empty_weights, which patches torch.nn.Module for the whole process, so a second
# load running at the same time gets meta tensors ("Cannot copy out of meta tensor").
_LOAD_LOCK = threading.Lock()


def preload_libraries() -> Any:
    """Imports torch, diffusers and the FLUX pipelines (the slow part of a cold start).

    Serialised: diffusers resolves its classes lazily, and two threads importing it at
    once can see a half-initialised module (the embedded default preloads in the
    background while a model may already be loading)."""
    with _IMPORT_LOCK:
        import diffusers
        import torch  # noqa: F401

        for name in (*_PIPELINES.values(), "DiffusionPipeline"):
            getattr(diffusers, name)
        _quiet_progress_bars()
        return diffusers


def _cpu_threads(spec: ImageModelSpec, device: str) -> int | None:
    """Intra-op threads for CPU inference: $REMOTEGPU_TORCH_THREADS, else 1 for the tiny
    random-weight models (their ops are too small to gain from threads, and a busy
    machine makes spinning thread pools many times slower), else torch's default."""
    env = os.environ.get("REMOTEGPU_TORCH_THREADS")
    if env:
        return max(1, int(env))
    if device == "cpu" and spec.weights.random:
        return 1
    return None


def _is_oom(e: BaseException) -> bool:
    import torch

    oom_types: tuple[type[BaseException], ...] = (MemoryError, torch.cuda.OutOfMemoryError)
    if hasattr(torch, "OutOfMemoryError"):
        oom_types += (torch.OutOfMemoryError,)
    return isinstance(e, oom_types) or "out of memory" in str(e).lower()


def decode_image(data: bytes, index: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"input image {index} could not be decoded: {e}") from None
    return img.convert("RGB")


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ImageEngine:
    """Loads one model's pipeline and runs `GenerationRequest`s on it.

    Thread-safe: generate() calls are serialised (one job at a time per GPU).
    """

    def __init__(
        self,
        model: ImageModel | ImageModelSpec,
        data_dir: Path | None = None,
        device: str | None = None,
        optimizations: list[str] | None = None,
    ):
        self.spec: ImageModelSpec = model.spec if isinstance(model, ImageModel) else model
        self.data_dir = data_dir
        self.device = pick_device(device)
        self.optimizations = optimize.from_env() if optimizations is None else list(optimizations)
        optimize.validate(self.optimizations)
        self.pipe: Any = None
        self.info: LoadInfo | None = None
        self.ready = False
        self._lock = threading.Lock()

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.spec.model

    def load(self) -> LoadInfo:
        """Loads the weights through `from_pretrained` and places them per serving.memory
        (one load at a time per process)."""
        with _LOAD_LOCK:
            return self._load()

    def _load(self) -> LoadInfo:
        diffusers = preload_libraries()
        import torch

        started = time.monotonic()
        threads = _cpu_threads(self.spec, self.device)
        if threads:
            torch.set_num_threads(threads)
        loc = weights_mod.resolve(self.spec, self.data_dir)
        if loc.local_dir is not None and not (loc.local_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{self.spec.model}: no diffusers pipeline at {loc.local_dir}")
        dtype = pick_dtype(self.spec, self.device)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if loc.revision:
            kwargs["revision"] = loc.revision
        log.info("loading %s from %s (%s, %s)", self.spec.model, loc.source, self.device, dtype)
        pipe = diffusers.DiffusionPipeline.from_pretrained(loc.source, **kwargs)
        expected = _PIPELINES[self.spec.architecture]
        if type(pipe).__name__ != expected:
            raise TypeError(
                f"{self.spec.model}: {loc.source} holds a {type(pipe).__name__}, but architecture "
                f"{self.spec.architecture.value} needs {expected}"
            )
        pipe.set_progress_bar_config(disable=True)
        memory = self.spec.serving.memory
        notes: list[str] = []
        if self.device.startswith("cuda"):
            if memory is MemoryPlacement.GPU:
                pipe.to(self.device)
            elif memory is MemoryPlacement.MODEL_CPU_OFFLOAD:
                pipe.enable_model_cpu_offload(device=self.device)
            elif memory is MemoryPlacement.SEQUENTIAL_CPU_OFFLOAD:
                pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
            if memory is not MemoryPlacement.GPU:
                notes.append(f"serving.memory={memory.value} has no effect without a GPU")
        if self.optimizations:
            notes += [f"optimisation: {o}" for o in optimize.apply(pipe, self.optimizations)]
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.pipe = pipe
        self.info = LoadInfo(
            source=loc.source,
            device=self.device,
            dtype=str(dtype).removeprefix("torch."),
            memory=memory.value,
            load_seconds=time.monotonic() - started,
            pipeline=type(pipe).__name__,
            notes=notes,
        )
        log.info("loaded %s in %.2fs", self.spec.model, self.info.load_seconds)
        return self.info

    def attach(self, pipe: Any, load_seconds: float = 0.0) -> LoadInfo:
        """Uses an already-built pipeline (benchmarks build full-size random weights in memory)."""
        for component in pipe.components.values():
            if hasattr(component, "eval"):
                component.eval()  # what from_pretrained does: no dropout
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.info = LoadInfo(
            source="(in memory)",
            device=self.device,
            dtype=str(pipe.transformer.dtype).removeprefix("torch."),
            memory=self.spec.serving.memory.value,
            load_seconds=load_seconds,
            pipeline=type(pipe).__name__,
        )
        return self.info

    def warm_up(self) -> float:
        """Runs serving.warmupSteps denoising steps at the default size; then the engine is ready."""
        if self.pipe is None:
            raise EngineNotReady("load() first")
        started = time.monotonic()
        n = self.spec.serving.warmup_steps
        if n > 0:
            p = self.spec.parameters
            from PIL import Image

            images = []
            count = min(max(p.input_images.min, 1), p.input_images.max)
            for _ in range(count):
                images.append(
                    png_bytes(Image.new("RGB", (p.size.default.width, p.size.default.height), (128,) * 3))
                )
            import base64

            req = GenerationRequest(
                prompt="warm-up",
                width=p.size.default.width,
                height=p.size.default.height,
                steps=n,
                guidance=p.guidance.default,
                seed=0,
                input_images_base64=[base64.b64encode(b).decode() for b in images],
            )
            self.generate(req, _warmup=True)
        seconds = time.monotonic() - started
        if self.info is not None:
            self.info.warmup_seconds = seconds
        self.ready = True
        log.info("warmed up %s in %.2fs", self.spec.model, seconds)
        return seconds

    def unload(self) -> None:
        with self._lock:
            self.ready = False
            self.pipe = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    # ---- generation -------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
        *,
        _warmup: bool = False,
    ) -> GenerationResult:
        """Runs one request. Raises JobCancelled (at a step boundary), BadInput or OutOfMemory."""
        if self.pipe is None or (not self.ready and not _warmup):
            raise EngineNotReady(f"{self.spec.model} is not loaded")
        images = [decode_image(b, i) for i, b in enumerate(request.input_images())]
        kwargs = self.call_kwargs(request, images)
        with self._lock:
            return self._run(request, kwargs, cancel, on_step)

    def call_kwargs(self, request: GenerationRequest, images: list[Any]) -> dict[str, Any]:
        """Maps a request onto the pipeline's call signature (validated against the catalog)."""
        import torch

        spec = self.spec
        p = spec.parameters
        arch = spec.architecture
        if request.width <= 0 or request.height <= 0 or request.width % 16 or request.height % 16:
            raise BadInput(f"size {request.width}x{request.height} must be positive multiples of 16")
        if request.steps < 1:
            raise BadInput("steps must be at least 1")
        if not p.input_images.min <= len(images) <= p.input_images.max:
            raise BadInput(
                f"{spec.model} takes {p.input_images.min}..{p.input_images.max} input images, got {len(images)}"
            )
        guidance = p.guidance.default if p.guidance.fixed else request.guidance
        kwargs: dict[str, Any] = {
            "prompt": request.prompt,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.steps,
            "guidance_scale": guidance,
            # A CPU generator: the same seed gives the same initial noise on any device.
            "generator": torch.Generator(device="cpu").manual_seed(request.seed % 2**64),
        }
        if spec.serving.max_sequence_length is not None:
            kwargs["max_sequence_length"] = spec.serving.max_sequence_length
        if request.negative_prompt:
            if not p.negative_prompt.supported:
                raise BadInput(f"{spec.model} does not support negative_prompt")
            if arch in (Architecture.FLUX1, Architecture.FLUX1_KONTEXT):
                # True classifier-free guidance: a second transformer pass per step, mixed
                # at serving.trueCfgScale (> 1). `guidance` keeps its meaning (the distilled
                # guidance embedding).
                kwargs["negative_prompt"] = request.negative_prompt
                kwargs["true_cfg_scale"] = spec.serving.true_cfg_scale
            elif arch is Architecture.FLUX2_KLEIN and not self.pipe.config.is_distilled:
                with torch.inference_mode():
                    neg, _ids = self.pipe.encode_prompt(
                        prompt=request.negative_prompt,
                        device=self.pipe._execution_device,
                        max_sequence_length=kwargs.get("max_sequence_length", 512),  # 512: its default
                    )
                kwargs["negative_prompt_embeds"] = neg
            else:
                raise BadInput(f"{spec.model}: the {arch.value} pipeline has no negative prompt")
        if arch is Architecture.FLUX1_KONTEXT:
            kwargs["image"] = images[0] if images else None
            # Kontext rescales the output to max_area at the requested aspect ratio:
            # max_area = width*height keeps the exact requested size.
            kwargs["max_area"] = request.width * request.height
            # Real weights: resize the source to a Kontext training resolution (the
            # model card's behaviour); random tiny weights keep it as is (fast).
            kwargs["_auto_resize"] = not spec.weights.random
        elif arch in (Architecture.FLUX2, Architecture.FLUX2_KLEIN):
            if images:
                kwargs["image"] = images
        elif images:
            raise BadInput(f"{spec.model} takes no input images")
        return kwargs

    def _run(
        self,
        request: GenerationRequest,
        kwargs: dict[str, Any],
        cancel: threading.Event | None,
        on_step: StepCallback | None,
    ) -> GenerationResult:
        import torch

        pipe = self.pipe
        total = request.steps
        marks: dict[str, float] = {}

        def first_forward(_module: Any, _args: Any) -> None:
            marks.setdefault("denoise_start", time.monotonic())

        def step_end(_pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            marks["denoise_end"] = time.monotonic()
            if on_step is not None:
                on_step(i + 1, total)
            if cancel is not None and cancel.is_set():
                raise JobCancelled(getattr(cancel, "reason", "cancelled"), step=i + 1)
            return tensors

        if cancel is not None and cancel.is_set():
            raise JobCancelled(getattr(cancel, "reason", "cancelled"), step=0)
        hook = pipe.transformer.register_forward_pre_hook(first_forward)
        started = time.monotonic()
        try:
            with torch.inference_mode():
                out = pipe(**kwargs, callback_on_step_end=step_end)
        except JobCancelled:
            self._after_interrupt()
            raise
        except Exception as e:
            if _is_oom(e):
                self._after_interrupt()
                raise OutOfMemory(
                    f"out of {'GPU' if self.device.startswith('cuda') else 'host'} memory generating "
                    f"{request.width}x{request.height} with {len(request.input_images_base64)} input image(s): {e}"
                ) from e
            if isinstance(e, ValueError):
                raise BadInput(f"the pipeline rejected the request: {e}") from e
            raise
        finally:
            hook.remove()
        seconds = time.monotonic() - started
        image = out.images[0]
        if image.size != (request.width, request.height):
            # Presets are multiples of 16, so this does not happen with FLUX's VAE; keep the
            # contract (exact size) if a pipeline ever rounds differently.
            log.warning("pipeline returned %s for %sx%s; resizing", image.size, request.width, request.height)
            from PIL import Image

            image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
        enc_start = time.monotonic()
        png = png_bytes(image)
        denoise = marks.get("denoise_end", time.monotonic()) - marks.get("denoise_start", started)
        return GenerationResult(
            png=png,
            width=request.width,
            height=request.height,
            steps=total,
            seconds=seconds,
            denoise_seconds=max(denoise, 1e-9),
            encode_seconds=time.monotonic() - enc_start,
        )

    def _after_interrupt(self) -> None:
        try:
            self.pipe.maybe_free_model_hooks()
        except Exception:  # noqa: BLE001
            pass
        try:
            import torch

            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


_PIPELINES: dict[Architecture, str] = {
    Architecture.FLUX1: "FluxPipeline",
    Architecture.FLUX1_KONTEXT: "FluxKontextPipeline",
    Architecture.FLUX2: "Flux2Pipeline",
    Architecture.FLUX2_KLEIN: "Flux2KleinPipeline",
}


class CancelFlag(threading.Event):
    """A threading.Event that remembers why it was set (cancelled, lease lost, draining)."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = "cancelled"

    def trigger(self, reason: str) -> None:
        if not self.is_set():
            self.reason = reason
            self.set()
