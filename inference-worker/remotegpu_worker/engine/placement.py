"""Where a pipeline's weights live while serving (`serving.memory`).

`auto` is decided at load time from the pipeline's own size and the GPU's memory, so
the same catalog entry runs well on an H200 (141 GB) and an H100 (80 GB):

- `gpu`: everything fits with room for activations: all resident.
- `text-encoder-offload`: the transformer and VAE fit but the text encoder does not:
  it stays in pinned host memory and streams in block by block (overlapped with its
  compute) for each prompt. FLUX.2-dev in bf16 on 80 GB: 64 GB transformer resident,
  48 GB Mistral encoder streamed: one encoder pass per request instead of moving all
  112 GB across PCIe as model CPU offload does.
- `model-cpu-offload`: not even the transformer fits: each model moves in whole.

With `gpu` (chosen, or `auto` deciding it from the weight files' sizes before loading),
from_pretrained loads straight onto the GPU (`device_map`): the safetensors files are
memory-mapped and each tensor is copied to the GPU as it is read, with no whole model in
host memory first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remotegpu_base.catalog import MemoryPlacement

GIB = 2**30
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def headroom_bytes(gpu_bytes: int) -> int:
    """Room kept free for activations: the VAE decode of a 2048x2048 image and the
    attention at 16k image tokens peak at several GiB; the CUDA context takes ~1 GiB."""
    return 10 * GIB + gpu_bytes // 20


def choose(
    requested: MemoryPlacement,
    component_bytes: Mapping[str, int],
    gpu_bytes: int,
    *,
    transformer_scale: float = 1.0,
) -> MemoryPlacement:
    """The placement for `requested`; `auto` picks the fastest that fits.

    component_bytes: parameter and buffer bytes of each pipeline component as loaded;
    transformer_scale: what quantization leaves of the transformer (0.5 for fp8 from bf16).
    """
    if requested is not MemoryPlacement.AUTO:
        return requested
    sizes = dict(component_bytes)
    if "transformer" in sizes:
        sizes["transformer"] = int(sizes["transformer"] * transformer_scale)
    budget = gpu_bytes - headroom_bytes(gpu_bytes)
    total = sum(sizes.values())
    if total <= budget:
        return MemoryPlacement.GPU
    encoders = sum(b for name, b in sizes.items() if name in TEXT_ENCODERS)
    if encoders and total - encoders <= budget:
        return MemoryPlacement.TEXT_ENCODER_OFFLOAD
    return MemoryPlacement.MODEL_CPU_OFFLOAD


def component_bytes(pipe: Any) -> dict[str, int]:
    import torch

    sizes = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes


def apply(pipe: Any, placement: MemoryPlacement, device: str) -> None:
    """Places a pipeline loaded on the CPU; `placement` is already decided (not auto)."""
    import torch

    if placement is MemoryPlacement.GPU:
        pipe.to(device)
    elif placement is MemoryPlacement.TEXT_ENCODER_OFFLOAD:
        from diffusers.hooks import apply_group_offloading

        streamed = device.startswith("cuda")
        for name, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            if name in TEXT_ENCODERS:
                # One decoder layer per group; with a GPU the next group's copy runs on
                # a side stream while this one computes (pinned host memory).
                apply_group_offloading(
                    module,
                    onload_device=torch.device(device),
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=streamed,
                )
            else:
                module.to(device)
    elif placement is MemoryPlacement.MODEL_CPU_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif placement is MemoryPlacement.SEQUENTIAL_CPU_OFFLOAD:
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"placement {placement.value} must be decided before it is applied")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def files_bytes(folder: Path) -> dict[str, int]:
    """Each component's weight files on disk (a folder written by save_pretrained): what
    placement can be decided from before loading (an upper bound when a file holds fp32
    that loads as bf16)."""
    sizes: dict[str, int] = {}
    for path in folder.glob("*/*"):
        if path.suffix in WEIGHT_SUFFIXES and path.is_file():
            sizes[path.parent.name] = sizes.get(path.parent.name, 0) + path.stat().st_size
    return sizes


def straight_to_device(
    requested: MemoryPlacement, on_disk: Mapping[str, int] | None, gpu_bytes: int, *, quantized: bool
) -> tuple[bool, str]:
    """Whether from_pretrained should put every weight straight onto the GPU (diffusers'
    `device_map`: each tensor goes from the file to the GPU, no whole CPU copy first),
    and why. Only when the whole pipeline will be resident (placement `gpu`), and, with
    quantization, only when it fits unquantized too (it is quantized once on the GPU)."""
    if requested not in (MemoryPlacement.GPU, MemoryPlacement.AUTO):
        return False, f"serving.memory={requested.value} keeps weights on the CPU"
    if on_disk is None:
        if requested is MemoryPlacement.AUTO or quantized:
            return False, "weight sizes unknown before loading (not a local folder)"
        return True, "serving.memory=gpu"
    if choose(MemoryPlacement.AUTO, on_disk, gpu_bytes) is not MemoryPlacement.GPU:
        if requested is MemoryPlacement.AUTO or quantized:
            total = sum(on_disk.values()) / GIB
            return False, f"{total:.0f} GiB of weights need more than the GPU's {gpu_bytes / GIB:.0f} GiB"
    return True, f"{sum(on_disk.values()) / GIB:.1f} GiB fit the GPU's {gpu_bytes / GIB:.0f} GiB"
