"""The engine's speed settings on the tiny random-weight models (the CPU side of the GPU work):
memory placement, per-model optimisation defaults, fp8, step caches, batched true CFG,
prompt token limits, and PNG encoding outside the engine lock."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from remotegpu_base.catalog import (
    Architecture,
    ImageModel,
    ImageModelSpec,
    MemoryPlacement,
    Quantization,
    StepCache,
    StepCacheType,
    load_models_file,
)
from remotegpu_base.protocol import GenerationRequest
from remotegpu_worker.engine import BadInput, ImageEngine, optimize, placement
from remotegpu_worker.engine import pipelines as pipelines_mod

GIB = 2**30


def req(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = dict(
        prompt="a lighthouse at dusk", width=512, height=512, steps=3, guidance=3.5, seed=7
    )
    base.update(kw)
    return GenerationRequest(**base)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def loaded(model: ImageModel, data_dir: Path, **kw: Any) -> ImageEngine:
    engine = ImageEngine(model, data_dir, device="cpu", **kw)
    engine.load()
    engine.ready = True
    return engine


def variant(tiny_catalog: dict[str, ImageModel], arch: str, **serving: Any) -> ImageModel:
    model = tiny_catalog[arch].model_copy(deep=True)
    for k, v in serving.items():
        setattr(model.spec.serving, k, v)
    return model


def block_runs(engine: ImageEngine) -> list[int]:
    """Counts executions of the transformer's first block (one per forward of the whole model)."""
    count = [0]
    first = engine.pipe.transformer.transformer_blocks[0]
    first.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


# ---- placement --------------------------------------------------------------------------

FLUX2_DEV = {"transformer": 64 * GIB, "text_encoder": 48 * GIB, "vae": GIB // 6}


@pytest.mark.parametrize(
    ("gpu_gib", "quantization_scale", "expected"),
    [
        (141, 1.0, MemoryPlacement.GPU),  # H200: all 112 GB resident
        (80, 1.0, MemoryPlacement.TEXT_ENCODER_OFFLOAD),  # H100: the transformer stays, the encoder streams
        (
            80,
            0.5,
            MemoryPlacement.TEXT_ENCODER_OFFLOAD,
        ),  # fp8 transformer 32 GB + 48 GB encoder: still too much
        (48, 1.0, MemoryPlacement.MODEL_CPU_OFFLOAD),  # not even the transformer fits
        (48, 0.5, MemoryPlacement.TEXT_ENCODER_OFFLOAD),  # ...unless it is fp8
    ],
)
def test_auto_placement_of_flux2_dev_follows_the_gpu_memory(
    gpu_gib: int, quantization_scale: float, expected: MemoryPlacement
) -> None:
    got = placement.choose(
        MemoryPlacement.AUTO, FLUX2_DEV, gpu_gib * GIB, transformer_scale=quantization_scale
    )
    assert got is expected


def test_auto_placement_keeps_flux1_on_an_80_gb_gpu_and_obeys_an_explicit_choice() -> None:
    flux1 = {"transformer": 24 * GIB, "text_encoder_2": 9 * GIB, "text_encoder": GIB // 4, "vae": GIB // 6}
    assert placement.choose(MemoryPlacement.AUTO, flux1, 80 * GIB) is MemoryPlacement.GPU
    assert (
        placement.choose(MemoryPlacement.MODEL_CPU_OFFLOAD, flux1, 80 * GIB)
        is MemoryPlacement.MODEL_CPU_OFFLOAD
    )


def test_the_catalog_serves_flux2_dev_with_auto_placement_not_full_offload() -> None:
    flux2_dev = next(m for m in load_models_file() if m.spec.model == "black-forest-labs/FLUX.2-dev")
    assert flux2_dev.spec.serving.memory is MemoryPlacement.AUTO


def test_text_encoder_offload_gives_the_same_image(
    engines: Any, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    """The text encoder behind group-offload hooks (streamed per prompt) computes the same embeddings."""
    ref = engines("flux2").generate(req(guidance=4.0)).data
    engine = ImageEngine(tiny_catalog["flux2"], tiny_data_dir, device="cpu")
    engine.load()
    placement.apply(engine.pipe, MemoryPlacement.TEXT_ENCODER_OFFLOAD, "cpu")
    engine.ready = True
    text_encoder = engine.pipe.text_encoder
    assert any(hasattr(m, "_diffusers_hook") for m in text_encoder.modules()), (
        "no offload hooks on the encoder"
    )
    assert not any(hasattr(m, "_diffusers_hook") for m in engine.pipe.transformer.modules())
    assert engine.generate(req(guidance=4.0)).data == ref


# ---- lossless defaults ------------------------------------------------------------------


def test_gpu_workers_get_the_measured_defaults_and_the_catalog_or_env_override_them(
    tiny_catalog: dict[str, ImageModel],
) -> None:
    spec = tiny_catalog["flux1"].spec.model_copy(deep=True)
    assert optimize.for_model(spec, "cuda") == optimize.GPU_DEFAULTS[Architecture.FLUX1]
    assert "compile" in optimize.for_model(spec, "cuda")
    assert optimize.for_model(spec, "cpu") == []  # a CPU worker: nothing by default
    assert optimize.for_model(spec, "cuda", override=["fused-qkv"]) == ["fused-qkv"]
    spec.serving.optimizations = []
    assert optimize.for_model(spec, "cuda") == []  # the catalog can turn them off


def test_compile_cache_is_keyed_by_device_and_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv(optimize.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    path = optimize.use_compile_cache("cpu")
    assert path is not None and path.parent == tmp_path
    assert path.name == f"cpu-torch{torch.__version__}".replace("+", "-")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(path))


def test_compiling_models_warm_up_every_shape_a_request_can_bring(
    tiny_catalog: dict[str, ImageModel],
) -> None:
    model = tiny_catalog["flux1"]
    plain = ImageEngine(model, device="cpu", optimizations=[])
    assert [(r.width, r.height) for r in plain.warmup_requests()] == [(512, 512)]
    compiled = ImageEngine(model, device="cpu", optimizations=["compile"])
    shapes = [(r.width, r.height, bool(r.negative_prompt)) for r in compiled.warmup_requests()]
    # the default size, a second size (Dynamo goes dynamic after it), and the batch-2 CFG forward
    assert shapes[0] == (512, 512, False)
    assert len({(w, h) for w, h, _ in shapes}) == 2
    assert shapes[-1][2], "a negative-prompt warm-up for the batched true CFG"


# ---- lossy, opt-in ----------------------------------------------------------------------


def test_fp8_quantizes_the_transformer_and_still_makes_images(
    engines: Any, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    engine = loaded(variant(tiny_catalog, "flux1", quantization=Quantization.FP8), tiny_data_dir)
    assert any(n.startswith("fp8:") for n in engine.info.notes)
    weights = [type(m.weight).__name__ for m in engine.pipe.transformer.modules() if hasattr(m, "weight")]
    assert "Float8Tensor" in weights, weights
    fp8 = engine.generate(req()).data
    full = engines("flux1").generate(req()).data
    assert pixels(fp8).shape == (512, 512, 3)
    assert fp8 != full  # lossy, as documented


@pytest.mark.parametrize(
    ("arch", "cache"),
    [
        # a huge threshold: every step after the first reuses the cached blocks
        ("flux1", StepCache(type=StepCacheType.FIRST_BLOCK, threshold=10.0)),
        ("flux1", StepCache(type=StepCacheType.TAYLORSEER, interval=2)),
        ("flux1-kontext", StepCache(type=StepCacheType.FIRST_BLOCK, threshold=10.0)),
        ("flux2", StepCache(type=StepCacheType.TAYLORSEER, interval=2)),
        ("flux2-klein", StepCache(type=StepCacheType.TAYLORSEER, interval=2)),
    ],
)
def test_step_caches_skip_transformer_work(
    arch: str,
    cache: StepCache,
    engines: Any,
    tiny_data_dir: Path,
    tiny_catalog: dict[str, ImageModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    calls = [0]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return sdpa(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    from tests.worker.conftest import png_b64

    images = [png_b64()] if arch == "flux1-kontext" else []
    guidance = tiny_catalog[arch].spec.parameters.guidance.default
    request = req(steps=8, guidance=guidance, input_images_base64=images)
    full = engines(arch).generate(request).data
    full_calls, calls[0] = calls[0], 0
    engine = loaded(variant(tiny_catalog, arch, step_cache=cache), tiny_data_dir)
    assert any(n.startswith("step cache:") for n in engine.info.notes)
    cached = engine.generate(request).data
    assert 0 < calls[0] < full_calls, f"{calls[0]} attention calls with the cache, {full_calls} without"
    assert cached != full  # lossy, as documented
    assert engine.generate(request).data == cached  # no state leaks from one request into the next


def test_first_block_cache_is_refused_on_flux2(tiny_catalog: dict[str, ImageModel]) -> None:
    spec = tiny_catalog["flux2"].spec.model_dump(by_alias=True)
    spec["serving"]["stepCache"] = {"type": "first-block"}
    with pytest.raises(ValueError, match="use stepCache.type taylorseer"):
        ImageModelSpec.model_validate(spec)


# ---- true CFG -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["flux1", "flux1-kontext"])
def test_a_negative_prompt_runs_one_batched_forward_per_step(
    arch: str, engines: Any, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    """FLUX.1 true CFG: one batch-2 transformer forward per step, the same image as diffusers' two passes."""
    import torch

    from tests.worker.conftest import png_b64

    engine = engines(arch)
    images = [png_b64(512, 512)] if arch == "flux1-kontext" else []
    request = req(negative_prompt="blurry, low quality", steps=4, input_images_base64=images)
    runs = block_runs(engine)
    batched = engine.generate(request).data
    assert runs[0] == 4, f"{runs[0]} forwards for 4 steps"

    # diffusers' own true CFG: two transformer passes per step
    kwargs = engine.call_kwargs(request, [pipelines_mod.decode_image(b, 0) for b in request.input_images()])
    kwargs.pop("negative_prompt_embeds"), kwargs.pop("negative_pooled_prompt_embeds")
    kwargs["negative_prompt"] = request.negative_prompt
    runs[0] = 0
    with torch.inference_mode():
        image = engine.pipe(**kwargs).images[0]
    assert runs[0] == 8
    two_pass = pixels(pipelines_mod.png_bytes(image))
    assert np.abs(pixels(batched) - two_pass).max() <= 2
    assert (
        batched != engine.generate(req(steps=4, input_images_base64=images)).data
    )  # the negative prompt counts


# ---- prompt length -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [a.value for a in Architecture])
def test_a_prompt_over_the_token_limit_is_refused_not_cut(arch: str, engines: Any) -> None:
    engine = engines(arch)
    serving = engine.spec.serving
    from tests.worker.conftest import png_b64

    images = {"flux1-kontext": [png_b64()], "flux2-klein": [], "flux2": []}.get(arch, [])
    long = "a lighthouse on a cliff at dusk, " * 30  # hundreds of tokens in every tokenizer
    fitting = req(
        prompt="a red fox", input_images_base64=images, guidance=engine.spec.parameters.guidance.default
    )
    try:
        serving.max_sequence_length = 160
        with pytest.raises(BadInput, match=r"prompt is \d+ text-encoder tokens; .* reads at most 160"):
            engine.generate(fitting.model_copy(update={"prompt": long}))
        engine.generate(fitting)  # a prompt that fits runs
        if engine.spec.parameters.negative_prompt.supported:
            with pytest.raises(BadInput, match="negative_prompt is"):
                engine.generate(fitting.model_copy(update={"negative_prompt": long}))
    finally:
        serving.max_sequence_length = None


def test_the_catalog_states_each_models_token_limit() -> None:
    limits = {m.spec.model: m.spec.public_parameters()["prompt"]["max_tokens"] for m in load_models_file()}
    assert limits["black-forest-labs/FLUX.1-schnell"] == 256
    assert limits["black-forest-labs/FLUX.1-dev"] == 512


def test_distilled_models_follow_their_model_cards_steps() -> None:
    models = {m.spec.model: m.spec.parameters.steps for m in load_models_file()}
    schnell, klein = models["black-forest-labs/FLUX.1-schnell"], models["black-forest-labs/FLUX.2-klein-9B"]
    assert (schnell.min, schnell.default, schnell.max) == (1, 4, 4)
    assert (klein.default, klein.max) == (4, 4)


# ---- PNG encoding ---------------------------------------------------------------------------


def test_png_encoding_runs_outside_the_engine_lock(engines: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one job's image is encoded, the next job can take the engine (and the GPU)."""
    engine = engines("flux1")
    rendered = engine.render(req())
    encoding, release = threading.Event(), threading.Event()
    real = pipelines_mod.encode_image

    def slow_encode(image: Any, *args: Any) -> bytes:
        encoding.set()
        assert release.wait(60)
        return real(image, *args)

    monkeypatch.setattr(pipelines_mod, "encode_image", slow_encode)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(rendered.encode()))
    t.start()
    assert encoding.wait(60)
    assert engine._lock.acquire(timeout=30), "the engine lock is held while encoding"
    engine._lock.release()
    release.set()
    t.join(60)
    assert result and result[0].encode_seconds > 0
    assert Image.open(io.BytesIO(result[0].data)).size == (512, 512)


def test_a_step_cache_compiles_with_the_default_compile(
    tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    """The step cache's hooks are compiler-disabled Python: compiling the blocks as full
    graphs would refuse them, and GPU workers compile by default."""
    cache = StepCache(type=StepCacheType.FIRST_BLOCK, threshold=0.2)
    model = variant(tiny_catalog, "flux1", step_cache=cache)
    engine = ImageEngine(model, tiny_data_dir, device="cpu", optimizations=["compile"])
    engine.load()
    engine.warm_up()
    png = engine.generate(req(steps=4)).data
    assert pixels(png).shape == (512, 512, 3)
