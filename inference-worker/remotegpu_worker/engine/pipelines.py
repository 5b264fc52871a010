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

from remotegpu_base.catalog import (
    Architecture,
    ImageModel,
    ImageModelSpec,
    MemoryPlacement,
    Quantization,
    parse_size,
)
from remotegpu_base.protocol import DEFAULT_OUTPUT_QUALITY, OUTPUT_MEDIA_TYPES, GenerationRequest

from remotegpu_worker.engine import lossy, optimize, placement, prompts
from remotegpu_worker.engine import weights as weights_mod
from remotegpu_worker.engine.errors import BadInput, EngineNotReady, JobCancelled, OutOfMemory
from remotegpu_worker.engine.true_cfg import BatchedTrueCFG

log = logging.getLogger("remotegpu_worker.engine")

StepCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    data: bytes  # the encoded image (the request's output_format)
    media_type: str
    width: int
    height: int
    steps: int
    seconds: float  # the whole pipeline call (text encoding, denoising, VAE decode)
    denoise_seconds: float  # first transformer call to the last step's end
    encode_seconds: float  # image encoding (outside the engine lock)

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


# zlib level 1: about half the encode time of Pillow's default 6 on photographs, for
# files some 15% larger (bench/png_encode.py measures both).
PNG_COMPRESS_LEVEL = 1


# WebP's fastest method: a third of the default 4's encode time, files within a few
# percent of its size (bench/png_encode.py measures every format).
WEBP_METHOD = 0


def png_bytes(image: Any) -> bytes:
    return encode_image(image, "png")


def encode_image(image: Any, output_format: str, quality: int | None = None) -> bytes:
    """The image as PNG (lossless; quality unused), JPEG or WebP (quality 1-100)."""
    buf = io.BytesIO()
    q = quality if quality is not None else DEFAULT_OUTPUT_QUALITY
    if output_format == "png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=q)
    elif output_format == "webp":
        image.save(buf, format="WEBP", quality=q, method=WEBP_METHOD)
    else:
        raise ValueError(f"unknown output format {output_format!r}; expected png, jpeg or webp")
    return buf.getvalue()


@dataclass
class Rendered:
    """A pipeline's output image, before encoding (which runs outside the engine lock)."""

    image: Any
    width: int
    height: int
    steps: int
    seconds: float
    denoise_seconds: float
    output_format: str = "png"
    output_quality: int | None = None

    def encode(self) -> GenerationResult:
        started = time.monotonic()
        data = encode_image(self.image, self.output_format, self.output_quality)
        return GenerationResult(
            data=data,
            media_type=OUTPUT_MEDIA_TYPES[self.output_format],
            width=self.width,
            height=self.height,
            steps=self.steps,
            seconds=self.seconds,
            denoise_seconds=self.denoise_seconds,
            encode_seconds=time.monotonic() - started,
        )


def load_options(
    spec: ImageModelSpec,
    device: str,
    loc: weights_mod.WeightsLocation,
    dtype: Any,
    gpu_bytes: int | None = None,
) -> tuple[dict[str, Any], str]:
    """from_pretrained's keyword arguments, and how the weights will arrive (for the log and
    LoadInfo.notes). On a GPU where the whole pipeline will be resident, `device_map` loads
    each tensor straight from the (memory-mapped) file onto the GPU: no whole copy of the
    model in host memory first. Otherwise the CPU load, placed by prepare()."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if loc.revision:
        kwargs["revision"] = loc.revision
    if not device.startswith("cuda"):
        return kwargs, f"loaded on {device}"
    import torch

    index = torch.device(device).index
    if index is not None and index != torch.cuda.current_device():
        # diffusers takes the device type alone ("cuda"): the current device.
        return kwargs, f"loaded on the CPU, then moved to {device} (not the current CUDA device)"
    if gpu_bytes is None:
        gpu_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    folder = loc.local_dir or weights_mod.cached_folder(loc.source, loc.revision)
    direct, why = placement.straight_to_device(
        spec.serving.memory,
        placement.files_bytes(folder) if folder is not None else None,
        gpu_bytes,
        quantized=spec.serving.quantization is not Quantization.NONE,
    )
    if not direct:
        return kwargs, f"loaded on the CPU, then placed ({why})"
    kwargs["device_map"] = "cuda"
    return kwargs, f"loaded straight onto {device} ({why})"


class ImageEngine:
    """Loads one model's pipeline and runs `GenerationRequest`s on it.

    Thread-safe: render() calls are serialised (one job at a time per GPU); the PNG
    encoding of one job runs outside that lock, so it overlaps the next job's denoising.
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
        self.optimizations = optimize.for_model(
            self.spec, self.device, optimize.from_env() if optimizations is None else optimizations
        )
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
        kwargs, how = load_options(self.spec, self.device, loc, dtype)
        log.info("loading %s from %s (%s, %s): %s", self.spec.model, loc.source, self.device, dtype, how)
        pipe = diffusers.DiffusionPipeline.from_pretrained(loc.source, **kwargs)
        expected = _PIPELINES[self.spec.architecture]
        if type(pipe).__name__ != expected:
            raise TypeError(
                f"{self.spec.model}: {loc.source} holds a {type(pipe).__name__}, but architecture "
                f"{self.spec.architecture.value} needs {expected}"
            )
        pipe.set_progress_bar_config(disable=True)
        memory, notes = self.prepare(pipe)
        notes.insert(0, f"weights: {how}")
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
        log.info("loaded %s in %.2fs (%s)", self.spec.model, self.info.load_seconds, "; ".join(notes))
        return self.info

    def prepare(self, pipe: Any) -> tuple[MemoryPlacement, list[str]]:
        """Places a pipeline loaded on the CPU and applies the model's speed-ups, in the
        order that composes: kernel and layout changes, quantization (on the device, before
        the rest arrives: only the transformer is ever there unquantized), placement, the
        step cache, then compilation (which must see the final modules)."""
        import torch

        serving = self.spec.serving
        before, compile_ = optimize.split(self.optimizations)
        notes = [f"optimisation: {o}" for o in optimize.apply(pipe, before)]
        memory = self._placement(pipe, notes)
        if serving.quantization is not Quantization.NONE:
            if memory in (MemoryPlacement.GPU, MemoryPlacement.TEXT_ENCODER_OFFLOAD):
                pipe.transformer.to(self.device)
            notes += lossy.quantize(pipe, serving.quantization, self.device)
        placement.apply(pipe, memory, self.device)
        notes += lossy.enable_step_cache(pipe, serving.step_cache)
        if compile_:
            cache = optimize.use_compile_cache(self.device)
            if cache is not None:
                notes.append(f"compile cache: {cache}")
        # A step cache's hooks decide per step in Python (torch.compiler.disable'd): the
        # blocks then compile with graph breaks around them, not as one full graph.
        fullgraph = serving.step_cache is None
        notes += [f"optimisation: {o}" for o in optimize.apply(pipe, compile_, fullgraph=fullgraph)]
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return memory, notes

    def _placement(self, pipe: Any, notes: list[str]) -> MemoryPlacement:
        requested = self.spec.serving.memory
        if not self.device.startswith("cuda"):
            if requested not in (MemoryPlacement.GPU, MemoryPlacement.AUTO):
                notes.append(f"serving.memory={requested.value} has no effect without a GPU")
            return MemoryPlacement.GPU  # everything where the device is
        import torch

        gpu_bytes = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        fp8 = self.spec.serving.quantization is Quantization.FP8
        chosen = placement.choose(
            requested, placement.component_bytes(pipe), gpu_bytes, transformer_scale=0.5 if fp8 else 1.0
        )
        if requested is MemoryPlacement.AUTO:
            notes.append(f"memory: auto -> {chosen.value} ({gpu_bytes / placement.GIB:.0f} GiB GPU)")
        return chosen

    def attach(self, pipe: Any, load_seconds: float = 0.0, *, prepare: bool = False) -> LoadInfo:
        """Uses an already-built pipeline (benchmarks build full-size random weights in
        memory); `prepare` places it and applies the model's speed-ups as load() does."""
        for component in pipe.components.values():
            if hasattr(component, "eval"):
                component.eval()  # what from_pretrained does: no dropout
        pipe.set_progress_bar_config(disable=True)
        memory, notes = self.prepare(pipe) if prepare else (self.spec.serving.memory, [])
        self.pipe = pipe
        self.info = LoadInfo(
            source="(in memory)",
            device=self.device,
            dtype=str(pipe.transformer.dtype).removeprefix("torch."),
            memory=memory.value,
            load_seconds=load_seconds,
            pipeline=type(pipe).__name__,
            notes=notes,
        )
        return self.info

    def warm_up(self) -> float:
        """Runs serving.warmupSteps denoising steps for each shape a request can bring;
        then the engine is ready, and no request pays for a compilation."""
        if self.pipe is None:
            raise EngineNotReady("load() first")
        started = time.monotonic()
        for req in self.warmup_requests():
            self.render(req, _warmup=True)  # no PNG: nobody reads it
        seconds = time.monotonic() - started
        if self.info is not None:
            self.info.warmup_seconds = seconds
        self.ready = True
        log.info("warmed up %s in %.2fs", self.spec.model, seconds)
        return seconds

    def warmup_requests(self) -> list[GenerationRequest]:
        """The default size; when compiling, also a second size (Dynamo then recompiles
        once with dynamic shapes, which serve every other size) and, where negative
        prompts run as a batch-2 forward, a request with one."""
        n = self.spec.serving.warmup_steps
        if n <= 0:
            return []
        p = self.spec.parameters
        sizes = [(p.size.default.width, p.size.default.height)]
        compiling = any(o in optimize.COMPILE for o in self.optimizations)
        if compiling:
            others = [parse_size(a) for a in p.size.allowed if parse_size(a) != sizes[0]]
            if others:
                sizes.append(min(others, key=lambda wh: wh[0] * wh[1]))
        requests = [self._warmup_request(w, h, n) for w, h in sizes]
        if compiling and p.negative_prompt.supported and self._batches_true_cfg():
            requests.append(self._warmup_request(*sizes[0], n, negative_prompt="warm-up"))
        return requests

    def _warmup_request(self, width: int, height: int, steps: int, negative_prompt: str | None = None) -> Any:
        import base64

        from PIL import Image

        p = self.spec.parameters
        count = min(max(p.input_images.min, 1), p.input_images.max)
        image = base64.b64encode(png_bytes(Image.new("RGB", (width, height), (128,) * 3))).decode()
        return GenerationRequest(
            prompt="warm-up",
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance=p.guidance.default,
            seed=0,
            input_images_base64=[image] * count,
        )

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
        """Runs one request to the encoded image (its output_format). Raises JobCancelled (at a step boundary),
        BadInput or OutOfMemory."""
        return self.render(request, cancel, on_step, _warmup=_warmup).encode()

    def render(
        self,
        request: GenerationRequest,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
        *,
        _warmup: bool = False,
    ) -> Rendered:
        """Runs one request's pipeline under the engine lock; encode() the result outside it."""
        if self.pipe is None or (not self.ready and not _warmup):
            raise EngineNotReady(f"{self.spec.model} is not loaded")
        images = [decode_image(b, i) for i, b in enumerate(request.input_images())]
        with self._lock:  # the tokenizers and the negative prompt's encoding use the models too
            kwargs = self.call_kwargs(request, images)
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
        max_tokens = spec.max_prompt_tokens
        kwargs["max_sequence_length"] = max_tokens
        self._check_length("prompt", request.prompt, max_tokens)
        if request.negative_prompt:
            if not p.negative_prompt.supported:
                raise BadInput(f"{spec.model} does not support negative_prompt")
            self._check_length("negative_prompt", request.negative_prompt, max_tokens)
            if arch in (Architecture.FLUX1, Architecture.FLUX1_KONTEXT):
                # True classifier-free guidance, mixed at serving.trueCfgScale (> 1);
                # `guidance` keeps its meaning (the distilled guidance embedding). The
                # negative embeddings are made here so _run can batch both passes.
                with torch.inference_mode():
                    neg, neg_pooled, _ids = self.pipe.encode_prompt(
                        prompt=request.negative_prompt,
                        prompt_2=None,
                        device=self.pipe._execution_device,
                        max_sequence_length=max_tokens,
                    )
                kwargs["negative_prompt_embeds"] = neg
                kwargs["negative_pooled_prompt_embeds"] = neg_pooled
                kwargs["true_cfg_scale"] = spec.serving.true_cfg_scale
            elif arch is Architecture.FLUX2_KLEIN and not self.pipe.config.is_distilled:
                with torch.inference_mode():
                    neg, _ids = self.pipe.encode_prompt(
                        prompt=request.negative_prompt,
                        device=self.pipe._execution_device,
                        max_sequence_length=max_tokens,
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

    def _check_length(self, field: str, text: str, max_tokens: int) -> None:
        n = prompts.count_tokens(self.pipe, self.spec.architecture, text)
        if n > max_tokens:
            raise BadInput(
                f"{field} is {n} text-encoder tokens; {self.spec.model} reads at most {max_tokens}, "
                "and the rest would be ignored: shorten it"
            )

    def _batches_true_cfg(self) -> bool:
        return self.spec.architecture in (Architecture.FLUX1, Architecture.FLUX1_KONTEXT)

    def _run(
        self,
        request: GenerationRequest,
        kwargs: dict[str, Any],
        cancel: threading.Event | None,
        on_step: StepCallback | None,
    ) -> Rendered:
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
            with torch.inference_mode(), self._call_context(kwargs):
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
        denoise = marks.get("denoise_end", time.monotonic()) - marks.get("denoise_start", started)
        return Rendered(
            image=image,
            width=request.width,
            height=request.height,
            steps=total,
            seconds=seconds,
            denoise_seconds=max(denoise, 1e-9),
            output_format=request.output_format,
            output_quality=request.output_quality,
        )

    def _call_context(self, kwargs: dict[str, Any]) -> Any:
        """What wraps one pipeline call: the batched true-CFG forward when a negative
        prompt runs on FLUX.1, and a cache context for step caches (the Kontext and
        FLUX.2 pipelines set none themselves; FluxPipeline's own nest inside)."""
        import contextlib

        stack = contextlib.ExitStack()
        transformer = self.pipe.transformer
        if self.spec.serving.step_cache is not None:
            transformer._reset_stateful_cache()  # nothing carried over from the last request
            stack.enter_context(transformer.cache_context("cond"))
        if "negative_pooled_prompt_embeds" in kwargs and self._batches_true_cfg():
            # One forward per step, so a step cache sees one call per step too.
            stack.enter_context(
                BatchedTrueCFG(
                    transformer, kwargs["negative_prompt_embeds"], kwargs["negative_pooled_prompt_embeds"]
                )
            )
        return stack

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
