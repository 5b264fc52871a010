"""Lossless speed-ups: the same maths on faster kernels (the image stays within noise).

Each model's list comes from `serving.optimizations`; unset, a GPU worker applies the
defaults below, which bench/worker_gpu.py measured faster than plain diffusers on an
H200 with the image unchanged (PSNR >= 30 dB against eager bf16; bench/gpu/). A CPU
worker applies none by default. `$REMOTEGPU_OPTIMIZATIONS` (comma-separated)
overrides both, for trying one out.

    attention=<backend>   diffusers attention dispatcher backend (e.g. _native_cudnn,
                          _native_flash, flash, _flash_3, native); same maths, other kernels
    fused-qkv             fuse the Q/K/V projections of every attention block into one matmul
    channels-last-vae     run the VAE with channels-last memory format (conv kernels)
    compile               torch.compile the transformer's repeated blocks (regional
                          compilation, quick to build; the warm-up pays the compile)
    compile-full          torch.compile the whole transformer (fullgraph)
    compile-max-autotune  regional compilation with mode=max-autotune (Triton autotuning and
                          CUDA graphs; long first compile)

Compiled kernels are cached on disk under `$REMOTEGPU_COMPILE_CACHE_DIR`, keyed by GPU
product and torch version (Inductor adds the graph and shapes), so a new pod on the
same kind of GPU loads them instead of compiling again.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from remotegpu_base.catalog import Architecture, ImageModelSpec

log = logging.getLogger("remotegpu_worker.engine")

ENV = "REMOTEGPU_OPTIMIZATIONS"
CACHE_ENV = "REMOTEGPU_COMPILE_CACHE_DIR"
KNOWN = ("attention", "fused-qkv", "channels-last-vae", "compile", "compile-full", "compile-max-autotune")
COMPILE = ("compile", "compile-full", "compile-max-autotune")

# What a GPU worker applies when the catalog entry names none (see the module doc).
_FLUX1 = ["attention=_native_cudnn", "fused-qkv", "channels-last-vae", "compile"]
_FLUX2 = ["attention=_native_cudnn", "channels-last-vae", "compile"]
GPU_DEFAULTS: dict[Architecture, list[str]] = {
    Architecture.FLUX1: _FLUX1,
    Architecture.FLUX1_KONTEXT: _FLUX1,
    Architecture.FLUX2: _FLUX2,
    Architecture.FLUX2_KLEIN: _FLUX2,
}


def from_env() -> list[str] | None:
    raw = os.environ.get(ENV)
    if raw is None:
        return None
    return [s.strip() for s in raw.split(",") if s.strip()]


def for_model(spec: ImageModelSpec, device: str, override: list[str] | None = None) -> list[str]:
    """The list a worker applies: an explicit override, else the catalog's, else the GPU defaults."""
    if override is not None:
        return list(override)
    if spec.serving.optimizations is not None:
        return list(spec.serving.optimizations)
    if device.startswith("cuda"):
        return list(GPU_DEFAULTS[spec.architecture])
    return []


def validate(names: list[str]) -> None:
    for n in names:
        if n.partition("=")[0] not in KNOWN:
            raise ValueError(f"unknown optimisation {n!r}; known: {', '.join(KNOWN)}")


def split(names: list[str]) -> tuple[list[str], list[str]]:
    """(kernel and layout changes, compilation): quantization goes between the two."""
    return [n for n in names if n not in COMPILE], [n for n in names if n in COMPILE]


def apply(pipe: Any, names: list[str], *, fullgraph: bool = True) -> list[str]:
    """Applies the named optimisations to a loaded pipeline; returns what was applied.
    fullgraph=False lets compilation break the graph (around a step cache's hooks)."""
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
            pipe.transformer.compile_repeated_blocks(fullgraph=fullgraph)
        elif key == "compile-max-autotune":
            pipe.transformer.compile_repeated_blocks(fullgraph=fullgraph, mode="max-autotune")
        elif key == "compile-full":
            pipe.transformer = torch.compile(pipe.transformer, fullgraph=fullgraph)
        applied.append(name)
        log.info("optimisation applied: %s", name)
    return applied


def compile_cache_dir(root: Path, device: str) -> Path:
    """root/<device product>-torch<version>: compiled kernels only fit that GPU and torch."""
    import torch

    if device.startswith("cuda"):
        product = torch.cuda.get_device_name(torch.device(device))
    else:
        product = "cpu"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{product}-torch{torch.__version__}").strip("-")
    return root / slug


def use_compile_cache(device: str) -> Path | None:
    """Points Inductor's and Triton's on-disk caches at $REMOTEGPU_COMPILE_CACHE_DIR (keyed)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        return None
    path = compile_cache_dir(Path(root), device)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or missing volume costs a compile, not the model
        log.warning("compile cache %s unusable (%s); compiling without it", path, e)
        return None
    # Inductor and Triton read these when they first compile (after this).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    return path
