"""ImageModel resources for the operator tests and bench/scale_from_zero.py."""

from __future__ import annotations

from typing import Any


def imagemodel(name: str, model: str, **overrides: Any) -> dict[str, Any]:
    """A small valid ImageModel; `overrides` replace top-level spec keys (scaling: merged)."""
    spec: dict[str, Any] = {
        "model": model,
        "architecture": "flux1",
        "parameters": {
            "prompt": {"maxLength": 1024},
            "size": {"default": {"width": 512, "height": 512}},
            "steps": {"default": 4},
            "guidance": {"default": 0.0},
        },
        "weights": {"source": "tiny/flux1", "random": True},
        "worker": {"image": "example.invalid/worker:test", "gpu": {"count": 1}},
        # Each test job is priced at one drain window of GPU-seconds, so one job asks for
        # one worker (the work-based target then reads like a job count).
        "scaling": {
            "maxReplicas": 2,
            "idleSeconds": 3,
            "secondsPerStepMegapixel": 60,
            "targetDrainSeconds": 60,
        },
    }
    spec["scaling"].update(overrides.pop("scaling", {}))
    spec.update(overrides)
    return {
        "apiVersion": "remotegpu.ai/v1alpha1",
        "kind": "ImageModel",
        "metadata": {"name": name},
        "spec": spec,
    }
