"""The engine side of the worker: diffusers pipelines, no networking."""

from remotegpu_worker.engine.errors import BadInput, EngineNotReady, JobCancelled, OutOfMemory
from remotegpu_worker.engine.pipelines import CancelFlag, GenerationResult, ImageEngine, LoadInfo

__all__ = [
    "BadInput",
    "CancelFlag",
    "EngineNotReady",
    "GenerationResult",
    "ImageEngine",
    "JobCancelled",
    "LoadInfo",
    "OutOfMemory",
]
