"""Worker throughput: FLUX.1-dev architecture, random weights, vs the plain diffusers pipeline.

    python bench/worker_gpu.py [--size 1024] [--steps 28] [--repeats 3]
                               [--variants attention=_native_cudnn,fused-qkv,channels-last-vae,compile]

On an NVIDIA GPU it builds the FLUX.1-dev pipeline at full size (12 B transformer:
19 double + 38 single blocks, hidden 3072; T5-XXL and CLIP-L text encoders; the
16-channel VAE) with random bf16 weights directly on the GPU, and measures in the
same process, with the same seed and request:

1. `plain`: the plain diffusers call `FluxPipeline(...)(prompt, ...)` (the reference),
2. `worker`: the worker's engine (`ImageEngine.generate`: step callback with
   cancellation checks, PNG encoding) on the same modules,
3. then each optimisation of `remotegpu_worker.engine.optimize`, cumulatively, with
   its own warm-up (compilation) excluded from the timings.

For every row: seconds per image (median of --repeats), the speed-up over `plain`,
and how far the image is from `plain`'s (max and mean absolute pixel difference,
PSNR; `identical` when the PNG bytes match).

Without CUDA it runs a small FLUX.1 architecture at 512x512 on the CPU so the
harness itself is exercised (and `make bench` stays quick) and says that the GPU
figures are pending. Results also go to bench/results/worker_gpu.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "inference-worker"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FULL = {  # FLUX.1-dev as published (transformer/config.json, text encoders, VAE)
    "transformer": dict(
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
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
    ),
    "t5": dict(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu"
    ),
    "vae": dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32
    ),
}
SMALL = {  # the same structure, narrow and shallow: for the CPU run
    "transformer": dict(
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
    "clip": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, projection_dim=128
    ),
    "t5": dict(d_model=256, d_ff=512, d_kv=64, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu"),
    "vae": dict(
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32
    ),
}


def build_pipeline(cfg: dict[str, Any], device: str, dtype: Any) -> Any:
    """A FluxPipeline with random weights, created directly on `device` in `dtype`."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from remotegpu_worker.tiny import _clip_tokenizer, _t5_tokenizer, flux1_scheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**cfg["transformer"])
            clip = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408, bos_token_id=0, eos_token_id=1, pad_token_id=1, **cfg["clip"]
                )
            )
            t5 = T5EncoderModel(
                T5Config(vocab_size=32128, is_encoder_decoder=False, use_cache=False, **cfg["t5"])
            )
            v = cfg["vae"]
            n = len(v["block_out_channels"])
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.1159,
                scaling_factor=0.3611,
                **v,
            )
    finally:
        torch.set_default_dtype(previous)
    pipe: Any = FluxPipeline(
        scheduler=flux1_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()  # as from_pretrained leaves them: no dropout
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def compare(ref_png: bytes, png: bytes) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    if ref_png == png:
        return {"identical": True, "max_abs_diff": 0, "mean_abs_diff": 0.0, "psnr_db": math.inf}
    a = np.asarray(Image.open(io.BytesIO(ref_png)).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    d = np.abs(a - b)
    mse = float((d**2).mean())
    return {
        "identical": False,
        "max_abs_diff": int(d.max()),
        "mean_abs_diff": round(float(d.mean()), 3),
        "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else math.inf,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, help="square image side (default 1024 on GPU, 512 on CPU)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 28 on GPU, 4 on CPU)")
    ap.add_argument("--repeats", type=int, help="timed images per row (default 3 on GPU, 2 on CPU)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--variants", help="comma-separated optimisations, applied cumulatively")
    ap.add_argument("--cpu", action="store_true", help="force the CPU run")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "worker_gpu.json"))
    args = ap.parse_args()

    import torch
    from remotegpu_worker.engine import ImageEngine, optimize

    from remotegpu.catalog import load_models_file
    from remotegpu.protocol import GenerationRequest

    gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    size = args.size or (1024 if gpu else 512)
    steps = args.steps or (28 if gpu else 4)
    repeats = args.repeats or (3 if gpu else 2)
    if args.variants is not None:
        variants = [v for v in args.variants.split(",") if v]
    elif gpu:
        variants = ["attention=_native_cudnn", "fused-qkv", "channels-last-vae", "compile"]
    else:
        variants = ["fused-qkv", "channels-last-vae"]
    cfg = FULL if gpu else SMALL
    where = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {where}; torch {torch.__version__}; {size}x{size}, {steps} steps, {repeats} image(s) per row"
    )
    if not gpu:
        print("no CUDA device: running the small FLUX.1 architecture on the CPU. GPU figures are pending.")

    t0 = time.monotonic()
    pipe = build_pipeline(cfg, device, dtype)
    sync(device)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    build_s = time.monotonic() - t0
    print(
        f"built FLUX.1-dev architecture ({'full size' if gpu else 'small'}): transformer {n_params / 1e9:.2f} B params, {build_s:.1f}s"
    )

    dev = next(m for m in load_models_file() if m.spec.model == "black-forest-labs/FLUX.1-dev")
    prompt = "a photograph of a lighthouse on a cliff at dusk, dramatic sky"
    guidance = dev.spec.parameters.guidance.default
    request = GenerationRequest(
        prompt=prompt, width=size, height=size, steps=steps, guidance=guidance, seed=args.seed
    )
    rows: list[dict[str, Any]] = []

    def plain_once() -> tuple[float, bytes]:
        sync(device)
        t = time.monotonic()
        image = pipe(
            prompt=prompt,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(args.seed),
        ).images[0]
        sync(device)
        s = time.monotonic() - t
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return s, buf.getvalue()

    engine = ImageEngine(dev, device=device, optimizations=[])
    engine.attach(pipe, load_seconds=build_s)
    engine.ready = True

    def engine_once() -> tuple[float, bytes]:
        sync(device)
        t = time.monotonic()
        result = engine.generate(request)
        sync(device)
        return time.monotonic() - t, result.png

    def measure(name: str, once: Any, ref: bytes | None) -> bytes:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        w = time.monotonic()
        _, png = once()  # warm-up (and compilation)
        warm = time.monotonic() - w
        times = []
        for _ in range(repeats):
            s, png = once()
            times.append(s)
        row: dict[str, Any] = {
            "variant": name,
            "seconds_per_image": round(statistics.median(times), 3),
            "all_seconds": [round(t, 3) for t in times],
            "warmup_seconds": round(warm, 2),
        }
        if gpu:
            row["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row.update(compare(ref, png) if ref is not None else {"identical": True})
        rows.append(row)
        base = rows[0]["seconds_per_image"]
        row["speedup_vs_plain"] = round(base / row["seconds_per_image"], 3)
        if row["identical"]:
            output = "identical"
        else:
            output = f"max|d| {row['max_abs_diff']}, PSNR {row['psnr_db']} dB"
        print(
            f"  {name:<28} {row['seconds_per_image']:>8.3f} s/image   x{row['speedup_vs_plain']:<6} {output}",
            flush=True,
        )
        return png

    print(f"{'variant':<30} {'time':>8}            {'speed-up / output vs plain'}")
    ref = measure("plain diffusers", plain_once, None)
    measure("worker engine", engine_once, ref)
    applied: list[str] = []
    for v in variants:
        try:
            optimize.apply(pipe, [v])
        except Exception as e:  # noqa: BLE001 - report and carry on
            print(f"  {'+ ' + v:<28} skipped: {type(e).__name__}: {e}")
            rows.append({"variant": "+ " + v, "skipped": f"{type(e).__name__}: {e}"})
            continue
        applied.append(v)
        try:
            measure("+ " + v, engine_once, ref)
        except Exception as e:  # noqa: BLE001
            print(f"  {'+ ' + v:<28} failed: {type(e).__name__}: {str(e)[:200]}")
            rows.append({"variant": "+ " + v, "failed": f"{type(e).__name__}: {e}"})
            if v.startswith("attention="):
                pipe.transformer.set_attention_backend("native")
    out = {
        "device": where,
        "gpu": gpu,
        "torch": torch.__version__,
        "size": f"{size}x{size}",
        "steps": steps,
        "repeats": repeats,
        "architecture": "FLUX.1-dev full size" if gpu else "FLUX.1 small (CPU)",
        "transformer_params": n_params,
        "rows": rows,
        "note": None if gpu else "GPU figures pending: no CUDA device in this run",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    print(f"results: {args.json}")
    if not gpu:
        print("GPU figures pending: run this on an H100/H200 for the FLUX.1-dev full-size numbers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
