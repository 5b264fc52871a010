"""Optional speed-ups that keep the output numerically equivalent to the plain pipeline.

Chosen per worker with `$REMOTEGPU_OPTIMIZATIONS` (comma-separated, applied in order):

    attention=<backend>   diffusers attention dispatcher backend (e.g. _native_cudnn,
                          _native_flash, flash, _flash_3, native); same maths, other kernels
    fused-qkv             fuse the Q/K/V projections of every attention block into one matmul
    channels-last-vae     run the VAE with channels-last memory format (conv kernels)
    compile               torch.compile the transformer's repeated blocks (regional
                          compilation, quick to build; the warm-up pays the compile)
    compile-full          torch.compile the whole transformer (fullgraph)
    compile-max-autotune  regional compilation with mode=max-autotune (Triton autotuning and
                          CUDA graphs; long first compile)

Nothing is on by default: bench/worker_gpu.py measures each on the GPU against the
plain diffusers pipeline, with the output difference, before one is made a default.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("remotegpu_worker.engine")

ENV = "REMOTEGPU_OPTIMIZATIONS"
KNOWN = ("attention", "fused-qkv", "channels-last-vae", "compile", "compile-full", "compile-max-autotune")


def from_env() -> list[str]:
    raw = os.environ.get(ENV, "")
    return [s.strip() for s in raw.split(",") if s.strip()]


def validate(names: list[str]) -> None:
    for n in names:
        if n.partition("=")[0] not in KNOWN:
            raise ValueError(f"unknown optimisation {n!r}; known: {', '.join(KNOWN)}")


def apply(pipe: Any, names: list[str]) -> list[str]:
    """Applies the named optimisations to a loaded pipeline; returns what was applied."""
    import torch

    validate(names)
    applied = []
    for name in names:
        key, _, value = name.partition("=")
        if key == "attention":
            if not value:
                raise ValueError("attention=<backend> needs a backend name")
            pipe.transformer.set_attention_backend(value)
        elif key == "fused-qkv":
            pipe.transformer.fuse_qkv_projections()
        elif key == "channels-last-vae":
            pipe.vae.to(memory_format=torch.channels_last)
        elif key == "compile":
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        elif key == "compile-max-autotune":
            pipe.transformer.compile_repeated_blocks(fullgraph=True, mode="max-autotune")
        elif key == "compile-full":
            pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
        applied.append(name)
        log.info("optimisation applied: %s", name)
    return applied
