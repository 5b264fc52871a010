"""Where a model's weights come from: a local folder or the Hugging Face cache.

`weights.source` in the catalog is either
- a local folder written by `save_pretrained` (absolute, or relative to the data
  directory, e.g. `tiny-models/flux1` for the built-here random-weight models), or
- a Hugging Face repo id, loaded through the ordinary `from_pretrained` path; with
  `HF_HUB_OFFLINE=1` only the local cache is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from remotegpu_base.catalog import ImageModelSpec


@dataclass(frozen=True)
class WeightsLocation:
    source: str  # what from_pretrained gets: a folder path or a repo id
    local_dir: Path | None  # the folder when local
    revision: str | None

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None


def resolve(spec: ImageModelSpec, data_dir: Path | None) -> WeightsLocation:
    src = spec.weights.source
    path = Path(src).expanduser()
    if path.is_absolute():
        return WeightsLocation(str(path), path, None)
    if data_dir is not None:
        candidate = (data_dir / path).resolve()
        # Random-weight models are always local (built into the data directory).
        if spec.weights.random or candidate.is_dir():
            return WeightsLocation(str(candidate), candidate, None)
    if spec.weights.random or src.startswith("."):
        return WeightsLocation(str(path.resolve()), path.resolve(), None)
    return WeightsLocation(src, None, spec.weights.revision)


def cached_folder(repo: str, revision: str | None) -> Path | None:
    """The snapshot folder of a Hub repo in the local Hugging Face cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return None
    found = try_to_load_from_cache(repo, "model_index.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def available_locally(spec: ImageModelSpec, data_dir: Path | None) -> tuple[bool, str | None]:
    """Whether the weights can be loaded without a download; (False, what to do) if not."""
    loc = resolve(spec, data_dir)
    if loc.local_dir is not None:
        if (loc.local_dir / "model_index.json").is_file():
            return True, None
        # Reasons are shown to clients (the catalog, 503s): no local paths in them.
        if spec.weights.random:
            return False, (
                "weights for this model are not present on this server: the random-weight model is not built "
                "yet (`remotegpu models build-tiny`, or restart `remotegpu serve`, which builds it)"
            )
        return False, (
            "weights for this model are not present on this server: its weights folder has no diffusers "
            "pipeline (model_index.json)"
        )
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False, "huggingface_hub is not installed"
    found = try_to_load_from_cache(loc.source, "model_index.json", revision=loc.revision)
    if isinstance(found, str):
        return True, None
    return False, (
        f"weights for this model are not present on this server: {loc.source} is not in its Hugging Face "
        "cache; download them first "
        f"(`hf download {loc.source}`, with access to the gated repo and HF_TOKEN set) or point "
        "weights.source at a local folder"
    )
