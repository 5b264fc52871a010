"""The engine on the tiny random-weight pipelines, loaded through from_pretrained."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from remotegpu_base.catalog import Architecture, ImageModel
from remotegpu_base.protocol import GenerationRequest
from remotegpu_worker.engine import BadInput, CancelFlag, ImageEngine, JobCancelled, weights
from remotegpu_worker.tiny import MARKER, is_built

from tests.worker.conftest import png_b64, png_size


def req(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = dict(
        prompt="a lighthouse at dusk", width=512, height=512, steps=2, guidance=3.5, seed=7
    )
    base.update(kw)
    return GenerationRequest(**base)


INPUTS = {
    "flux1": [],
    "flux1-kontext": [png_b64(512, 512)],
    "flux2": [png_b64(512, 512), png_b64(1024, 768, (20, 90, 200))],
    "flux2-klein": [png_b64(768, 1024)],
}


def test_tiny_models_built_for_every_architecture(tiny_models_dir: Path) -> None:
    for arch in Architecture:
        folder = tiny_models_dir / arch.value
        assert is_built(folder), folder
        marker = json.loads((folder / MARKER).read_text())
        assert marker["random_weights"] is True and marker["architecture"] == arch.value
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert size < 5_000_000, f"{arch.value} is {size} bytes: not tiny"


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_models_dir: Path) -> None:
    from remotegpu_worker.tiny import build_tiny

    out = build_tiny(tmp_path, "flux2-klein", progress=None)
    ref = tiny_models_dir / "flux2-klein"
    for f in ref.rglob("*.safetensors"):
        assert f.read_bytes() == (out / f.relative_to(ref)).read_bytes(), f"{f.name} differs between builds"


@pytest.mark.parametrize("arch", [a.value for a in Architecture])
def test_each_architecture_end_to_end(engines: Any, arch: str) -> None:
    engine = engines(arch)
    assert (
        engine.ready
        and engine.info.pipeline
        == {
            "flux1": "FluxPipeline",
            "flux1-kontext": "FluxKontextPipeline",
            "flux2": "Flux2Pipeline",
            "flux2-klein": "Flux2KleinPipeline",
        }[arch]
    )
    assert engine.info.dtype == "float32" and engine.info.device == "cpu"
    for w, h in [(512, 512), (1024, 768)]:
        result = engine.generate(req(width=w, height=h, input_images_base64=INPUTS[arch]))
        assert png_size(result.data) == (w, h)
        assert result.steps == 2 and result.steps_per_second > 0


def test_landscape_and_portrait_sizes(engines: Any) -> None:
    engine = engines("flux1")
    for w, h in [(768, 1024), (1280, 720), (720, 1280)]:
        assert png_size(engine.generate(req(width=w, height=h)).data) == (w, h)


@pytest.mark.parametrize("arch", ["flux1", "flux2-klein"])
def test_same_seed_same_bytes_other_seed_differs(engines: Any, arch: str) -> None:
    engine = engines(arch)
    images = INPUTS[arch]
    a = engine.generate(req(seed=1234, input_images_base64=images)).data
    b = engine.generate(req(seed=1234, input_images_base64=images)).data
    c = engine.generate(req(seed=1235, input_images_base64=images)).data
    assert a == b
    assert a != c


def test_same_seed_identical_in_a_fresh_engine(
    engines: Any, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    a = engines("flux1").generate(req(seed=99)).data
    fresh = ImageEngine(tiny_catalog["flux1"], tiny_data_dir, device="cpu")
    fresh.load()
    fresh.warm_up()
    assert fresh.generate(req(seed=99)).data == a


def test_prompt_negative_prompt_steps_and_guidance_change_the_image(engines: Any) -> None:
    engine = engines("flux1")
    base = engine.generate(req()).data
    assert engine.generate(req(prompt="a completely different prompt")).data != base
    assert engine.generate(req(negative_prompt="blurry")).data != base
    assert engine.generate(req(steps=3)).data != base
    assert engine.generate(req(guidance=7.0)).data != base


def test_the_whole_prompt_counts_and_true_cfg_scale_reaches_the_pipeline(engines: Any) -> None:
    """Past CLIP's 77 tokens the T5 sequence still carries the prompt; serving.trueCfgScale
    sets the negative prompt's strength. (Over serving.maxSequenceLength: test_speedups.)"""
    engine = engines("flux1")
    serving = engine.spec.serving
    head = "a lighthouse on a cliff at dusk, " * 8  # past CLIP's 77 tokens
    a, b = req(prompt=head + "painted in oils"), req(prompt=head + "as a pencil sketch")
    assert engine.generate(a).data != engine.generate(b).data
    negative = engine.generate(req(negative_prompt="blurry")).data
    try:
        serving.true_cfg_scale = 9.0
        assert engine.generate(req(negative_prompt="blurry")).data != negative
    finally:
        serving.true_cfg_scale = 4.0


def test_schnell_reads_its_prompt_up_to_256_tokens(engines: Any) -> None:
    from remotegpu_base.catalog import load_models_file

    schnell = next(m for m in load_models_file() if m.spec.model.endswith("FLUX.1-schnell"))
    assert schnell.spec.max_prompt_tokens == 256
    engine = engines("flux1")  # the same architecture, with schnell's serving setting
    serving = engine.spec.serving
    try:
        serving.max_sequence_length = schnell.spec.serving.max_sequence_length
        assert engine.call_kwargs(req(), [])["max_sequence_length"] == 256
    finally:
        serving.max_sequence_length = None


def test_fixed_guidance_is_the_catalog_value(engines: Any) -> None:
    engine = engines("flux2-klein")  # guidance fixed at 1.0 in the catalog
    kwargs = engine.call_kwargs(req(guidance=9.0), [])
    assert kwargs["guidance_scale"] == 1.0


def test_input_images_change_the_result(engines: Any) -> None:
    kontext = engines("flux1-kontext")
    red = kontext.generate(req(input_images_base64=[png_b64(512, 512, (255, 0, 0))])).data
    blue = kontext.generate(req(input_images_base64=[png_b64(512, 512, (0, 0, 255))])).data
    assert red != blue
    flux2 = engines("flux2")
    none = flux2.generate(req()).data
    one = flux2.generate(req(input_images_base64=[png_b64(512, 512)])).data
    two = flux2.generate(req(input_images_base64=[png_b64(512, 512), png_b64(1024, 1024, (0, 255, 0))])).data
    assert len({none, one, two}) == 3


def test_input_image_limits_and_bad_images(engines: Any) -> None:
    kontext = engines("flux1-kontext")
    with pytest.raises(BadInput, match="input images"):
        kontext.generate(req())  # Kontext needs exactly one
    with pytest.raises(BadInput, match="input images"):
        kontext.generate(req(input_images_base64=[png_b64(), png_b64()]))
    with pytest.raises(BadInput, match="could not be decoded"):
        kontext.generate(req(input_images_base64=["bm90IGFuIGltYWdl"]))
    with pytest.raises(BadInput, match="input images"):
        engines("flux1").generate(req(input_images_base64=[png_b64()]))
    with pytest.raises(BadInput, match="negative_prompt"):
        engines("flux2").generate(req(negative_prompt="no"))


def test_cancellation_stops_at_the_next_step(engines: Any) -> None:
    engine = engines("flux1")
    flag = CancelFlag()
    seen: list[int] = []

    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            flag.trigger("cancelled")

    with pytest.raises(JobCancelled) as info:
        engine.generate(req(steps=20), flag, on_step)
    assert info.value.step == 2 and seen == [1, 2]
    assert info.value.reason == "cancelled"
    # The engine is still usable afterwards.
    assert png_size(engine.generate(req()).data) == (512, 512)


def test_cancel_from_another_thread(engines: Any) -> None:
    engine = engines("flux1")
    flag = CancelFlag()
    started = threading.Event()

    def on_step(step: int, total: int) -> None:
        started.set()

    t = threading.Thread(target=lambda: (started.wait(30), flag.trigger("cancelled")))
    t.start()
    with pytest.raises(JobCancelled) as info:
        engine.generate(req(steps=50), flag, on_step)
    t.join()
    assert 1 <= info.value.step < 50


def test_weights_resolution(tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel], tmp_path: Path) -> None:
    from remotegpu_base.catalog import load_models_file

    spec = tiny_catalog["flux1"].spec
    loc = weights.resolve(spec, tiny_data_dir)
    assert loc.local_dir == (tiny_data_dir / "tiny-models" / "flux1").resolve()
    assert weights.available_locally(spec, tiny_data_dir) == (True, None)
    ok, why = weights.available_locally(spec, tmp_path)
    assert not ok and "build-tiny" in str(why)
    dev = next(m for m in load_models_file() if m.spec.model == "black-forest-labs/FLUX.1-dev").spec
    loc = weights.resolve(dev, tmp_path)
    assert loc.source == "black-forest-labs/FLUX.1-dev" and not loc.is_local
    ok, why = weights.available_locally(dev, tmp_path)
    assert not ok and "Hugging Face cache" in str(why)


def test_unavailable_reasons_are_for_clients(tiny_catalog: dict[str, ImageModel], tmp_path: Path) -> None:
    """The reasons go to the public catalog: they say what is missing, never where."""
    tiny = tiny_catalog["flux1"].spec
    folder = tiny.model_copy(deep=True)
    folder.weights.source = str(tmp_path / "weights" / "flux1")
    folder.weights.random = False
    (tmp_path / "weights" / "flux1").mkdir(parents=True)
    for spec in (tiny, folder):
        ok, why = weights.available_locally(spec, tmp_path)
        assert not ok and str(why).startswith("weights for this model are not present on this server")
        assert str(tmp_path) not in str(why)


class _OomPipe:
    """Wraps a real pipeline; the call raises CUDA's out-of-memory error."""

    def __init__(self, pipe: Any):
        self._pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_reported_as_such(engines: Any) -> None:
    from remotegpu_worker.engine import OutOfMemory

    engine = engines("flux1")
    real = engine.pipe
    engine.pipe = _OomPipe(real)
    try:
        with pytest.raises(OutOfMemory, match="out of host memory generating 1024x768.*20.00 GiB"):
            engine.generate(req(width=1024, height=768))
    finally:
        engine.pipe = real
    assert png_size(engine.generate(req()).data) == (512, 512)


def test_optimisations_keep_the_output(
    engines: Any, tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    ref = engines("flux1").generate(req(seed=5)).data
    opt = ImageEngine(
        tiny_catalog["flux1"], tiny_data_dir, device="cpu", optimizations=["fused-qkv", "channels-last-vae"]
    )
    info = opt.load()
    assert "optimisation: fused-qkv" in info.notes
    opt.warm_up()
    a = np.asarray(Image.open(io.BytesIO(ref)), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(opt.generate(req(seed=5)).data)), dtype=np.int16)
    assert np.abs(a - b).max() <= 2
    with pytest.raises(ValueError, match="unknown optimisation"):
        ImageEngine(tiny_catalog["flux1"], tiny_data_dir, device="cpu", optimizations=["warp-drive"])


def test_klein_base_model_takes_a_negative_prompt(
    tmp_path: Path, tiny_models_dir: Path, tiny_catalog: dict[str, ImageModel]
) -> None:
    """A non-distilled klein (real CFG): the negative prompt's embeddings replace the empty one."""
    import shutil

    folder = tmp_path / "klein-base"
    shutil.copytree(tiny_models_dir / "flux2-klein", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["is_distilled"] = False
    (folder / "model_index.json").write_text(json.dumps(index))
    model = tiny_catalog["flux2-klein"].model_copy(deep=True)
    model.spec.weights.source = str(folder)
    model.spec.weights.random = False
    model.spec.parameters.negative_prompt.supported = True
    model.spec.parameters.guidance.fixed = False
    model.spec.parameters.guidance.max = 20.0
    engine = ImageEngine(model, None, device="cpu")
    engine.load()
    engine.warm_up()
    plain = engine.generate(req(guidance=4.0)).data
    negative = engine.generate(req(guidance=4.0, negative_prompt="blurry")).data
    assert png_size(negative) == (512, 512)
    assert plain != negative


def test_build_tiny_command_defaults_to_the_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from remotegpu_worker.tiny import build_command

    args = argparse.Namespace(out_dir=None, data_dir=str(tmp_path), force=False)
    assert build_command(args) == 0
    for arch in Architecture:
        assert is_built(tmp_path / "tiny-models" / arch.value)
    err = capsys.readouterr().err
    assert "[4/4] flux2-klein" in err and "ready in" in err
    assert build_command(args) == 0  # a second run finds them built
    assert "already built" in capsys.readouterr().err
