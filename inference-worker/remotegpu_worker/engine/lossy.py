"""Opt-in speed-ups that change the image: fp8 and diffusers' step caches.

Both are set per model in the catalog (`serving.quantization`, `serving.stepCache`),
never by default. bench/worker_gpu.py reports fp8's PSNR against bf16 on the same
seed; a step cache's effect on quality cannot be judged on random weights, so it is
documented as lossy and not measured here.
"""

from __future__ import annotations

import logging
from typing import Any

from remotegpu_base.catalog import Quantization, StepCache, StepCacheType

log = logging.getLogger("remotegpu_worker.engine")


def float8_matmul_supported(device: str) -> bool:
    """torch._scaled_mm's float8 kernels need compute capability 8.9 (Ada, Hopper) or newer."""
    import torch

    if not device.startswith("cuda"):
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def quantize(pipe: Any, quantization: Quantization, device: str) -> list[str]:
    """Quantizes the transformer in place (after placement, before compilation)."""
    if quantization is Quantization.NONE:
        return []
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    if float8_matmul_supported(device):
        # flux-fast's recipe: float8 weights and activations, one scale per row.
        quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return ["fp8: float8 weights and activations (per-row scales) in the transformer"]
    # No float8 matmul here (a CPU, or a GPU older than Ada): keep the weights in float8
    # (half the memory) and compute in the model's dtype.
    quantize_(pipe.transformer, Float8WeightOnlyConfig())
    return [f"fp8: weight-only on {device} (no float8 matmul kernels here; compute in the model dtype)"]


def step_cache_config(cache: StepCache) -> Any:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.type is StepCacheType.FIRST_BLOCK:
        return FirstBlockCacheConfig(threshold=cache.threshold)
    return TaylorSeerCacheConfig(cache_interval=cache.interval)


def enable_step_cache(pipe: Any, cache: StepCache | None) -> list[str]:
    if cache is None:
        return []
    pipe.transformer.enable_cache(step_cache_config(cache))
    detail = (
        f"threshold {cache.threshold}"
        if cache.type is StepCacheType.FIRST_BLOCK
        else f"interval {cache.interval}"
    )
    return [f"step cache: {cache.type.value} ({detail}); lossy"]
