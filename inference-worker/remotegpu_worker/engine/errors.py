"""Why a generation did not produce an image."""

from __future__ import annotations


class JobCancelled(Exception):
    """Raised at a denoising step boundary when the job's cancel flag was set."""

    def __init__(self, reason: str = "cancelled", step: int = 0):
        super().__init__(f"stopped at step {step}: {reason}")
        self.reason = reason
        self.step = step


class BadInput(ValueError):
    """The request cannot be run as given (undecodable image, wrong image count, ...)."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory for this request."""


class EngineNotReady(RuntimeError):
    """generate() before load()."""
