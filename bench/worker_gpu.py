"""Seconds per image for every FLUX model, against plain diffusers measured in the same run.

    python bench/worker_gpu.py [--cpu] [--cases flux1-dev-1024,...] [--repeats 10]
                               [--row-seconds 30] [--deadline-seconds S] [--json PATH]

Each architecture is built at full size with random bf16 weights directly on the GPU
(FLUX.1: 11.9 B transformer, T5-XXL, CLIP-L; FLUX.2-dev: 32 B transformer, the 24 B
Mistral-Small-3.1 encoder; FLUX.2-klein-9B: 9.1 B transformer, Qwen3-8B), and each
case (model, size, steps) is measured three ways with the same seed and request:

1. `plain`: the plain diffusers call in eager bf16, PNG by Pillow's defaults (the baseline),
2. `lossless`: the worker's engine with the model's default optimisations
   (`remotegpu_worker.engine.optimize.GPU_DEFAULTS`), its placement and PNG settings,
3. `fp8`: the same plus `serving.quantization: fp8` (torchao float8, lossy).

A time is from the start of the request to the PNG bytes, the median over the row's
requests (`--repeats`, fewer where one request is slow: `--row-seconds` bounds a row;
at least 3), after one warm-up request (which pays compilation and is reported as
such). Pipeline and encoding time are reported apart, and every image is compared
with plain's (PSNR; >= 30 dB counts as lossless). Results go to a JSON file after
every row, so a run cut short keeps what it measured; `--deadline-seconds` skips the
rows that would not fit.

Without CUDA (or with --cpu) every case runs on small configurations of the same
architectures on the CPU, in float32, so the harness and the engine path are
exercised; the GPU figures are then pending.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "inference-worker"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from remotegpu_worker.tiny import vae_blocks  # noqa: E402

# Each component's constructor arguments, in remotegpu_worker.tiny's format: the published
# configurations (config.json of each repository's transformer, text encoders and VAE).
_FLUX1_VAE = dict(
    **vae_blocks(),
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
    norm_num_groups=32,
    latent_channels=16,
)
FULL: dict[str, dict[str, Any]] = {
    "flux1": dict(
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        vae=dict(**_FLUX1_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        clip=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        ),
        t5=dict(
            vocab_size=32128,
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_heads=64,
            num_layers=24,
            feed_forward_proj="gated-gelu",
        ),
    ),
    "flux2": dict(  # FLUX.2-dev: 8 double + 48 single blocks, 48 heads; Mistral-Small-3.1-24B
        transformer=dict(
            num_layers=8,
            num_single_layers=48,
            num_attention_heads=48,
            joint_attention_dim=15360,
            guidance_embeds=True,
        ),
        vae={},  # AutoencoderKLFlux2's defaults are the published VAE
        text=dict(
            vocab_size=131072,
            hidden_size=5120,
            intermediate_size=32768,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
        ),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    ),
    "flux2-klein": dict(  # klein 9B: 8 double + 24 single blocks, 32 heads; Qwen3-8B
        transformer=dict(
            num_layers=8,
            num_single_layers=24,
            num_attention_heads=32,
            joint_attention_dim=12288,
            guidance_embeds=False,
        ),
        vae={},
        text=dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
        ),
    ),
}
_SMALL_FLUX2 = dict(
    transformer=dict(
        num_layers=1,
        num_single_layers=2,
        num_attention_heads=4,
        attention_head_dim=16,
        axes_dims_rope=(4, 4, 4, 4),
        joint_attention_dim=3 * 64,
    ),
    vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32),
    text=dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
)
SMALL: dict[str, dict[str, Any]] = {  # the same structures, narrow and shallow: the CPU run
    "flux1": dict(
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=256,
            pooled_projection_dim=128,
            guidance_embeds=True,
            axes_dims_rope=(16, 24, 24),
        ),
        vae=dict(**_FLUX1_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1),
        clip=dict(
            vocab_size=49408,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=128,
        ),
        t5=dict(
            vocab_size=32128,
            d_model=256,
            d_ff=512,
            d_kv=64,
            num_heads=4,
            num_layers=2,
            feed_forward_proj="gated-gelu",
        ),
    ),
    # the encoders keep the layers the pipelines read hidden states from (30; 27)
    "flux2": {
        **_SMALL_FLUX2,
        "transformer": {**_SMALL_FLUX2["transformer"], "guidance_embeds": True},
        "text": {**_SMALL_FLUX2["text"], "num_hidden_layers": 31},
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    },
    "flux2-klein": {
        **_SMALL_FLUX2,
        "transformer": {**_SMALL_FLUX2["transformer"], "guidance_embeds": False},
        "text": {**_SMALL_FLUX2["text"], "num_hidden_layers": 28},
    },
}


@dataclass
class Case:
    name: str
    family: str  # which built modules it runs on: flux1, flux1-schnell, flux2-klein, flux2
    model: str  # the catalog entry (limits, guidance, placement)
    size: int
    steps: int
    references: int = 0
    negative_prompt: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    plain_png: bytes | None = None  # what the other rows are compared with


# In the order they run (a family's modules are built once for its cases): the slowest
# and most asked-about first, so a run cut short by --deadline-seconds keeps them.
CASES = [
    Case("flux1-dev-1024", "flux1", "black-forest-labs/FLUX.1-dev", 1024, 28),
    Case("flux1-dev-512", "flux1", "black-forest-labs/FLUX.1-dev", 512, 30),
    Case("flux2-dev-1024", "flux2", "black-forest-labs/FLUX.2-dev", 1024, 28),
    Case("flux1-schnell-1024", "flux1-schnell", "black-forest-labs/FLUX.1-schnell", 1024, 4),
    Case("flux2-klein-9b-1024", "flux2-klein", "black-forest-labs/FLUX.2-klein-9B", 1024, 4),
    # Kontext-dev has FLUX.1-dev's architecture; a family of its own only to run later
    Case(
        "flux1-kontext-1024", "flux1-kontext", "black-forest-labs/FLUX.1-Kontext-dev", 1024, 28, references=1
    ),
    # true CFG: plain diffusers runs two passes per step, the engine one batch-2 forward
    Case(
        "flux1-dev-512-negative",
        "flux1-kontext",
        "black-forest-labs/FLUX.1-dev",
        512,
        30,
        negative_prompt="blurry",
    ),
]
FAMILIES = ["flux1", "flux2", "flux1-schnell", "flux2-klein", "flux1-kontext"]
PROMPT = "a photograph of a lighthouse on a cliff at dusk, dramatic sky"


# ---------------------------------------------------------------------------- building


def _on(device: str, dtype: Any) -> Any:
    """Creates modules directly on `device` in `dtype` (no CPU copy of full-size weights)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx() -> Any:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                yield
        finally:
            torch.set_default_dtype(previous)

    return ctx()


def build_family(family: str, configs: dict[str, Any], device: str, dtype: Any) -> dict[str, Any]:
    """Pipelines by catalog model id, sharing modules where the models share an architecture;
    the components are remotegpu_worker.tiny's, built at the sizes in `configs`."""
    import diffusers
    from remotegpu_worker import tiny

    with _on(device, dtype):
        if family.startswith("flux1"):
            sizes = configs["flux1"]
            if family == "flux1-schnell":  # schnell is timestep-distilled: no guidance embedding
                sizes = {**sizes, "transformer": {**sizes["transformer"], "guidance_embeds": False}}
            parts = tiny.flux1_components(sizes)
        elif family == "flux2-klein":
            klein = diffusers.Flux2KleinPipeline(**tiny.flux2_klein_components(configs[family]))
            return {"black-forest-labs/FLUX.2-klein-9B": klein}
        else:
            return {
                "black-forest-labs/FLUX.2-dev": diffusers.Flux2Pipeline(
                    **tiny.flux2_components(configs[family])
                )
            }
    if family == "flux1-schnell":
        return {"black-forest-labs/FLUX.1-schnell": diffusers.FluxPipeline(**parts)}
    pipes = {"black-forest-labs/FLUX.1-dev": diffusers.FluxPipeline(**parts)}
    if family == "flux1-kontext":  # Kontext-dev has FLUX.1-dev's architecture: the same modules
        pipes["black-forest-labs/FLUX.1-Kontext-dev"] = diffusers.FluxKontextPipeline(**parts)
    return pipes


# ---------------------------------------------------------------------------- measuring


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(ref_png: bytes, png: bytes) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    if ref_png == png:
        return {"identical": True, "max_abs_diff": 0, "psnr_db": math.inf}
    a = np.asarray(Image.open(io.BytesIO(ref_png)).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    d = np.abs(a - b)
    mse = float((d**2).mean())
    return {
        "identical": False,
        "max_abs_diff": int(d.max()),
        "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else math.inf,
    }


@functools.cache
def reference_png(size: int) -> str:
    """A gradient source image (base64 PNG), made once per size."""
    import base64

    from PIL import Image

    img = Image.new("RGB", (size, size))
    img.putdata([((x * 255) // size, (y * 255) // size, 128) for y in range(size) for x in range(size)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Bench:
    def __init__(self, args: argparse.Namespace, gpu: bool):
        self.args = args
        self.gpu = gpu
        self.started = time.monotonic()
        self.out: dict[str, Any] = {}

    def time_left(self) -> float:
        return self.args.deadline_seconds - (time.monotonic() - self.started)

    def save(self) -> None:
        Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.json).write_text(json.dumps(self.out, indent=2, default=str))

    def request(self, case: Case, engine: Any, steps: int | None = None) -> Any:
        from remotegpu_base.protocol import GenerationRequest

        p = engine.spec.parameters
        return GenerationRequest(
            prompt=PROMPT,
            negative_prompt=case.negative_prompt,
            width=case.size,
            height=case.size,
            steps=steps or case.steps,
            guidance=p.guidance.default,
            seed=self.args.seed,
            input_images_base64=[reference_png(case.size)] * case.references,
        )

    def plain_once(self, case: Case, engine: Any, steps: int | None = None) -> tuple[float, float, bytes]:
        """The plain diffusers call, as its documentation shows it, and Pillow's PNG defaults."""
        import torch
        from remotegpu_worker.engine.pipelines import decode_image

        req = self.request(case, engine, steps)
        kwargs = engine.call_kwargs(req, [decode_image(b, i) for i, b in enumerate(req.input_images())])
        for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            kwargs.pop(key, None)
        if case.negative_prompt:
            kwargs["negative_prompt"] = case.negative_prompt  # diffusers' own two passes per step
        kwargs["generator"] = torch.Generator("cpu").manual_seed(self.args.seed)
        sync()
        t = time.monotonic()
        with torch.inference_mode():
            image = engine.pipe(**kwargs).images[0]
        sync()
        pipeline = time.monotonic() - t
        t = time.monotonic()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return pipeline, time.monotonic() - t, buf.getvalue()

    def engine_once(self, case: Case, engine: Any, steps: int | None = None) -> tuple[float, float, bytes]:
        """The worker's path: render under the engine lock, then encode outside it."""
        req = self.request(case, engine, steps)
        sync()
        t = time.monotonic()
        rendered = engine.render(req)
        sync()
        pipeline = time.monotonic() - t
        result = rendered.encode()
        return pipeline, result.encode_seconds, result.data

    def measure(self, case: Case, variant: str, once: Any, engine: Any) -> None:
        import torch

        if variant not in self.args.variants.split(","):
            return

        row: dict[str, Any] = {"variant": variant}
        case.rows.append(row)
        estimate = self.estimate(case)
        if self.time_left() < estimate:
            row["skipped"] = f"time budget: {self.time_left():.0f}s left, the row needs about {estimate:.0f}s"
            print(f"  {case.name:<24} {variant:<10} skipped ({row['skipped']})", flush=True)
            self.save()
            return
        try:
            if self.gpu:
                torch.cuda.reset_peak_memory_stats()
            w = time.monotonic()
            once(case, engine, steps=min(2, case.steps))  # warm-up: compiles for this shape
            row["warmup_seconds"] = round(time.monotonic() - w, 2)
            times: list[tuple[float, float]] = []
            png = b""
            budget_end = time.monotonic() + self.args.row_seconds
            while len(times) < self.args.repeats and (len(times) < 3 or time.monotonic() < budget_end):
                pipeline, encode, png = once(case, engine)
                times.append((pipeline, encode))
            totals = [p + e for p, e in times]
            row.update(
                requests=len(times),
                seconds_per_image=round(statistics.median(totals), 3),
                pipeline_seconds=round(statistics.median(p for p, _ in times), 3),
                encode_seconds=round(statistics.median(e for _, e in times), 4),
                png_kib=len(png) // 1024,
                all_seconds=[round(t, 3) for t in totals],
            )
            if self.gpu:
                row["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if variant == "plain":
                case.plain_png = png
            else:
                row.update(compare(case.plain_png or png, png))
                base = next(
                    (r for r in case.rows if r["variant"] == "plain" and "seconds_per_image" in r), None
                )
                if base:
                    row["speedup_vs_plain"] = round(base["seconds_per_image"] / row["seconds_per_image"], 3)
            print(_line(case, row), flush=True)
        except Exception as e:  # noqa: BLE001 - record and carry on with the next row
            row["failed"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"  {case.name:<24} {variant:<10} failed: {row['failed']}", flush=True)
            if self.gpu:
                torch.cuda.empty_cache()
        self.save()

    def estimate(self, case: Case) -> float:
        """Seconds a row will take, from the case's measured rows (a guess before any)."""
        done = [r for r in case.rows if "seconds_per_image" in r]
        if not done:
            return 10.0
        one = min(r["seconds_per_image"] for r in done)
        return max(3 * one, min(self.args.row_seconds, self.args.repeats * one)) + 30.0


def _line(case: Case, row: dict[str, Any]) -> str:
    extra = ""
    if "psnr_db" in row:
        extra = "identical" if row.get("identical") else f"PSNR {row['psnr_db']} dB"
    speed = f"x{row['speedup_vs_plain']}" if "speedup_vs_plain" in row else ""
    return (
        f"  {case.name:<24} {row['variant']:<10} {row['seconds_per_image']:>8.3f} s/image "
        f"(pipeline {row['pipeline_seconds']:.3f} + PNG {row['encode_seconds']:.3f}; n={row['requests']}, "
        f"warm-up {row['warmup_seconds']}s) {speed} {extra}"
    )


# ---------------------------------------------------------------------------- main


def run_family(bench: Bench, family: str, cases: list[Case], configs: dict[str, Any], device: str) -> None:
    import torch
    from remotegpu_base.catalog import Quantization, load_models_file
    from remotegpu_worker.engine import ImageEngine, lossy, optimize

    catalog = {m.spec.model: m for m in load_models_file()}
    dtype = torch.bfloat16 if bench.gpu else torch.float32
    t = time.monotonic()
    pipes = build_family(family, configs, device, dtype)
    sync()
    first = next(iter(pipes.values()))
    params = sum(p.numel() for p in first.transformer.parameters())
    text = sum(p.numel() for p in first.text_encoder.parameters())
    built = round(time.monotonic() - t, 1)
    print(
        f"built {family}: transformer {params / 1e9:.2f} B, text encoder {text / 1e9:.2f} B params in {built}s",
        flush=True,
    )
    bench.out.setdefault("families", {})[family] = {
        "transformer_params": params,
        "text_encoder_params": text,
        "build_seconds": built,
    }

    def lossless(model: str) -> list[str] | None:
        """The GPU defaults; on the CPU the same less the GPU attention kernels."""
        if bench.gpu:
            return None
        arch = catalog[model].spec.architecture
        return [o for o in optimize.GPU_DEFAULTS[arch] if not o.startswith("attention=")]

    def engine_for(model: str, optimizations: list[str] | None, prepare: bool) -> Any:
        spec = catalog[model].spec
        e = ImageEngine(spec, device=device, optimizations=optimizations)
        e.attach(pipes[model], prepare=prepare)
        e.ready = True
        return e

    plain = {m: engine_for(m, [], prepare=False) for m in pipes}  # plain: the modules as built
    for case in cases:
        bench.measure(case, "plain", bench.plain_once, plain[case.model])
    # lossless: the engine's defaults for the model (placement, kernels, compilation),
    # applied once to the shared modules through the first model's engine
    engines: dict[str, Any] = {}
    for i, model in enumerate(pipes):
        engines[model] = engine_for(model, lossless(model), prepare=i == 0)
    bench.out["families"][family]["lossless_notes"] = next(iter(engines.values())).info.notes
    for case in cases:
        bench.measure(case, "lossless", bench.engine_once, engines[case.model])
    # fp8: quantize the optimised transformer, then compile again
    if "fp8" not in bench.args.variants.split(","):
        return
    try:
        torch._dynamo.reset()
        notes = lossy.quantize(first, Quantization.FP8, device)
        _, compiled = optimize.split(next(iter(engines.values())).optimizations)
        optimize.apply(first, compiled)
        bench.out["families"][family]["fp8_notes"] = notes
    except Exception as e:  # noqa: BLE001
        bench.out["families"][family]["fp8_failed"] = f"{type(e).__name__}: {e}"
        print(f"  fp8 unavailable: {type(e).__name__}: {e}", flush=True)
        return
    for case in cases:
        bench.measure(case, "fp8", bench.engine_once, engines[case.model])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases", help="comma-separated case names (default: all): " + ", ".join(c.name for c in CASES)
    )
    ap.add_argument("--repeats", type=int, help="timed requests per row (default 10 on GPU, 2 on CPU)")
    ap.add_argument(
        "--row-seconds", type=float, default=30.0, help="stop adding requests to a row after this"
    )
    ap.add_argument("--deadline-seconds", type=float, default=math.inf, help="skip rows that would end later")
    ap.add_argument(
        "--variants", default="plain,lossless,fp8", help="which rows to measure (default all three)"
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cpu", action="store_true", help="small configurations on the CPU")
    ap.add_argument(
        "--json", help="results file (default bench/gpu/worker_gpu.json on GPU, bench/results/ on CPU)"
    )
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    args.repeats = args.repeats or (10 if gpu else 2)
    if args.json is None:
        args.json = str(REPO / "bench" / ("gpu" if gpu else "results") / "worker_gpu.json")
    wanted = set(args.cases.split(",")) if args.cases else {c.name for c in CASES}
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; known: {', '.join(c.name for c in CASES)}")
    cases = [c for c in CASES if c.name in wanted]
    if not gpu:
        for c in cases:
            c.size, c.steps = 512, min(c.steps, 4)
    configs = FULL if gpu else SMALL
    where = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    import diffusers

    print(f"device: {where}; torch {torch.__version__}; diffusers {diffusers.__version__}", flush=True)
    if not gpu:
        print("no CUDA device: small configurations on the CPU; the GPU figures are pending.", flush=True)
    bench = Bench(args, gpu)
    bench.out = {
        "device": where,
        "gpu": gpu,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "configs": "full size, random bf16 weights" if gpu else "small, float32 (CPU)",
        "cases": {},
    }
    for family in FAMILIES:
        mine = [c for c in cases if c.family == family]
        if not mine:
            continue
        for c in mine:  # registered first: the file shows each row as soon as it is measured
            bench.out["cases"][c.name] = {
                "model": c.model,
                "size": f"{c.size}x{c.size}",
                "steps": c.steps,
                "references": c.references,
                "negative_prompt": c.negative_prompt,
                "rows": c.rows,
            }
        try:
            run_family(bench, family, mine, configs, device)
        except Exception as e:  # noqa: BLE001 - a family that cannot be built does not stop the rest
            print(f"{family} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            bench.out.setdefault("families", {})[family] = {"failed": f"{type(e).__name__}: {e}"}
        bench.save()
        gc.collect()
        if gpu:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    bench.out["total_seconds"] = round(time.monotonic() - bench.started, 1)
    bench.save()
    print(f"results: {args.json} ({bench.out['total_seconds']}s)")
    if not gpu:
        print("GPU figures pending: run this on an H100/H200 for the full-size numbers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
