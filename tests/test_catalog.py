"""The catalog schema is defined once: catalog.py mirrors the CRD, and the catalog file obeys the spec's table."""

from __future__ import annotations

import typing

import pytest
import yaml
from pydantic import BaseModel
from remotegpu_base import catalog

from tests.fixtures.cluster import REPO

CRD = yaml.safe_load((REPO / "crds/imagemodels.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _model_of(annotation) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _compare(model: type[BaseModel], schema: dict, path: str) -> list[str]:
    problems = []
    props = schema.get("properties", {})
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    for missing in sorted(set(fields) - set(props)):
        problems.append(f"{path}.{missing} is in catalog.py but not in the CRD")
    for missing in sorted(set(props) - set(fields)):
        problems.append(f"{path}.{missing} is in the CRD but not in catalog.py")
    for name in set(fields) & set(props):
        sub = _model_of(fields[name].annotation)
        if sub is not None:
            problems += _compare(sub, props[name], f"{path}.{name}")
    return problems


def test_catalog_schema_mirrors_the_crd():
    assert _compare(catalog.ImageModelSpec, SPEC_SCHEMA, "spec") == []


def test_crd_size_presets_are_the_spec_presets():
    size = SPEC_SCHEMA["properties"]["parameters"]["properties"]["size"]["properties"]["allowed"]
    assert size["items"]["enum"] == catalog.ALL_SIZES
    assert size["default"] == catalog.ALL_SIZES


# The spec's model table: (min images, max images, max prompt, default size, steps, guidance).
SPEC_TABLE = {
    "black-forest-labs/FLUX.1-schnell": (0, 0, 1024, (512, 512), 4, 0.0),
    "black-forest-labs/FLUX.1-Kontext-dev": (1, 1, 2048, (512, 512), 30, 3.5),
    "black-forest-labs/FLUX.1-dev": (0, 0, 2048, (512, 512), 30, 3.5),
    "black-forest-labs/FLUX.2-klein-9B": (0, 4, 2048, (1024, 1024), 4, 1.0),
    "black-forest-labs/FLUX.2-dev": (0, 6, 4096, (512, 512), 30, 4.0),
}


@pytest.mark.parametrize("model_id", SPEC_TABLE)
def test_bundled_catalog_matches_the_spec_table(model_id):
    models = {m.spec.model: m.spec for m in catalog.load_models_file()}
    p = models[model_id].parameters
    imin, imax, prompt, size, steps, guidance = SPEC_TABLE[model_id]
    assert (p.input_images.min, p.input_images.max) == (imin, imax)
    assert p.prompt.max_length == prompt
    assert (p.size.default.width, p.size.default.height) == size
    assert p.steps.default == steps
    assert p.guidance.default == guidance


def test_tiny_models_are_honestly_named_and_random():
    tiny = [m for m in catalog.load_models_file() if m.spec.weights.random]
    assert {m.spec.architecture for m in tiny} == set(catalog.Architecture)
    for m in tiny:
        assert "FLUX" not in m.spec.model and "random" in m.spec.model


def test_invalid_catalog_entries_are_refused(tmp_path):
    doc = next(yaml.safe_load_all((REPO / "base/remotegpu_base/models.yaml").read_text()))
    doc["spec"]["parameters"]["size"]["default"] = {"width": 640, "height": 480}
    bad = tmp_path / "models.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="640x480"):
        catalog.load_models_file(bad)
