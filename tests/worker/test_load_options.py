"""Loading straight onto the GPU: which from_pretrained options a CUDA device gets (decided
on the CPU from the weight files' sizes), and that the pinned diffusers loads every tiny
pipeline with them (device_map "cpu" here; tests/worker/test_gpu.py loads onto a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from remotegpu_base.catalog import ImageModel, MemoryPlacement, Quantization
from remotegpu_worker.engine import placement
from remotegpu_worker.engine import weights as weights_mod
from remotegpu_worker.engine.pipelines import load_options, preload_libraries

GIB = 2**30
FLUX1_DEV = {
    "transformer": 23.8 * GIB,
    "text_encoder_2": 9.5 * GIB,
    "text_encoder": 0.25 * GIB,
    "vae": 0.17 * GIB,
}


def sizes(d: dict[str, float]) -> dict[str, int]:
    return {k: int(v) for k, v in d.items()}


@pytest.mark.parametrize(
    ("requested", "gpu_gib", "quantized", "direct"),
    [
        (MemoryPlacement.AUTO, 141, False, True),  # H200: all resident, straight there
        (MemoryPlacement.GPU, 141, False, True),
        (MemoryPlacement.AUTO, 40, False, False),  # would be offloaded: the CPU load as before
        (MemoryPlacement.GPU, 40, False, True),  # asked for: the user's choice
        (MemoryPlacement.GPU, 40, True, False),  # fp8 that fits only once quantized: quantize first
        (MemoryPlacement.MODEL_CPU_OFFLOAD, 141, False, False),
        (MemoryPlacement.TEXT_ENCODER_OFFLOAD, 141, False, False),
    ],
)
def test_straight_to_the_gpu_only_where_everything_stays_there(requested, gpu_gib, quantized, direct):
    got, why = placement.straight_to_device(requested, sizes(FLUX1_DEV), gpu_gib * GIB, quantized=quantized)
    assert got is direct, why


def test_unknown_sizes_load_straight_only_when_gpu_is_asked_for():
    assert placement.straight_to_device(MemoryPlacement.GPU, None, 80 * GIB, quantized=False)[0]
    assert not placement.straight_to_device(MemoryPlacement.AUTO, None, 80 * GIB, quantized=False)[0]


@pytest.mark.parametrize("arch", ["flux1", "flux1-kontext", "flux2", "flux2-klein"])
def test_a_cuda_device_gets_device_map_and_the_pinned_diffusers_loads_with_it(
    arch: str, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
):
    import torch

    spec = tiny_catalog[arch].spec
    loc = weights_mod.resolve(spec, tiny_data_dir)
    on_disk = placement.files_bytes(loc.local_dir)  # type: ignore[arg-type]
    assert {"transformer", "vae"} <= set(on_disk) and all(v > 0 for v in on_disk.values())
    kwargs, how = load_options(spec, "cuda", loc, torch.bfloat16, gpu_bytes=80 * GIB)
    assert kwargs == {"dtype": torch.bfloat16, "device_map": "cuda"} and how.startswith(
        "loaded straight onto cuda"
    )
    offload = spec.model_copy(deep=True)
    offload.serving.memory = MemoryPlacement.MODEL_CPU_OFFLOAD
    kwargs_cpu, how = load_options(offload, "cuda", loc, torch.bfloat16, gpu_bytes=80 * GIB)
    assert "device_map" not in kwargs_cpu and how.startswith("loaded on the CPU, then placed")
    fp8_too_big = spec.model_copy(deep=True)
    fp8_too_big.serving.quantization = Quantization.FP8
    assert "device_map" not in load_options(fp8_too_big, "cuda", loc, torch.bfloat16, gpu_bytes=1)[0]
    assert load_options(spec, "cpu", loc, torch.float32) == ({"dtype": torch.float32}, "loaded on cpu")

    # The same options, with the device this machine has: diffusers and transformers
    # dispatch every component through accelerate, and placement still moves the pipeline.
    diffusers = preload_libraries()
    pipe = diffusers.DiffusionPipeline.from_pretrained(loc.source, **{**kwargs, "device_map": "cpu"})
    assert pipe.hf_device_map == "cpu"
    placement.apply(pipe, MemoryPlacement.GPU, "cpu")
    params = [p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
    assert params and all(p.device.type == "cpu" and not p.is_meta for p in params)
    assert pipe.transformer.dtype == torch.bfloat16
