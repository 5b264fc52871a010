"""The engine on an NVIDIA GPU (skipped without CUDA): bf16, each memory placement, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from remotegpu_base.catalog import ImageModel, MemoryPlacement
from remotegpu_base.protocol import GenerationRequest
from remotegpu_worker.engine import ImageEngine

from tests.worker.conftest import png_b64, png_size

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _req(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = dict(prompt="a lighthouse", width=1024, height=768, steps=3, guidance=3.5, seed=3)
    base.update(kw)
    return GenerationRequest(**base)


@pytest.mark.parametrize("memory", [m.value for m in MemoryPlacement])
@pytest.mark.parametrize("arch", ["flux1", "flux1-kontext", "flux2", "flux2-klein"])
def test_gpu_placements(
    arch: str, memory: str, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    model = tiny_catalog[arch].model_copy(deep=True)
    model.spec.serving.memory = MemoryPlacement(memory)
    engine = ImageEngine(model, tiny_data_dir, device="cuda")
    info = engine.load()
    assert info.dtype == "bfloat16" and info.device == "cuda"
    engine.warm_up()
    images = [png_b64(512, 512)] if model.spec.parameters.input_images.max else []
    a = engine.generate(_req(input_images_base64=images))
    b = engine.generate(_req(input_images_base64=images))
    assert png_size(a.data) == (1024, 768)
    assert a.data == b.data
    engine.unload()


def test_gpu_memory_metrics() -> None:
    from prometheus_client import generate_latest
    from remotegpu_worker.metrics import WorkerMetrics

    text = generate_latest(WorkerMetrics().registry).decode()
    assert 'remotegpu_worker_gpu_memory_total_bytes{device="0"}' in text


@pytest.mark.parametrize(("memory", "direct"), [("auto", True), ("model-cpu-offload", False)])
def test_weights_load_straight_onto_the_gpu_when_they_stay_there(
    memory: str, direct: bool, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    model = tiny_catalog["flux1"].model_copy(deep=True)
    model.spec.serving.memory = MemoryPlacement(memory)
    engine = ImageEngine(model, tiny_data_dir, device="cuda")
    info = engine.load()
    assert info.notes[0].startswith(
        "weights: loaded straight onto cuda" if direct else "weights: loaded on the CPU"
    )
    assert (engine.pipe.hf_device_map == "cuda") is direct
    if direct:
        params = [
            p
            for m in engine.pipe.components.values()
            if isinstance(m, torch.nn.Module)
            for p in m.parameters()
        ]
        assert all(p.device.type == "cuda" for p in params)
    engine.warm_up()
    assert png_size(engine.generate(_req()).data) == (1024, 768)
    engine.unload()
