"""FLUX.1's true classifier-free guidance in one forward per step.

With a negative prompt, diffusers' Flux pipelines call the transformer twice per step:
the prompt ("cond"), then the negative prompt ("uncond"), each with batch 1. This
runs both as one batch-2 forward when the cond call arrives and answers the uncond
call from it: the same maths, half the kernel launches and weight reads. The two
calls share the step's latents object and the text length (both padded to the same
max_sequence_length); a call that does not fit that pattern runs as it came.
"""

from __future__ import annotations

import types
from typing import Any


class BatchedTrueCFG:
    """Installed on a transformer for one pipeline call (a context manager)."""

    def __init__(self, transformer: Any, negative_embeds: Any, negative_pooled: Any):
        self.transformer = transformer
        self.negative_embeds = negative_embeds
        self.negative_pooled = negative_pooled
        self.batched_forwards = 0  # steps that ran as one batch-2 forward
        self._pending: tuple[Any, Any] | None = None  # (latents of the cond call, uncond output)

    def __enter__(self) -> BatchedTrueCFG:
        self._original = self.transformer.forward
        # A hook may already have replaced forward on the instance: put that one back after.
        self._replaced = self.transformer.__dict__.get("forward")
        self.transformer.forward = types.MethodType(_bound(self), self.transformer)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._replaced is None:
            del self.transformer.forward  # the class's forward again
        else:
            self.transformer.forward = self._replaced
        self._pending = None

    def forward(self, hidden_states: Any, encoder_hidden_states: Any = None, **kw: Any) -> Any:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is hidden_states and encoder_hidden_states is not None:
            return _output(pending[1], kw.get("return_dict", True))
        neg = self.negative_embeds
        if encoder_hidden_states is None or encoder_hidden_states.shape != neg.shape:
            return self._original(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **kw
            )
        import torch

        def twice(x: Any) -> Any:
            return None if x is None else torch.cat([x, x])

        return_dict = kw.pop("return_dict", True)
        kw["timestep"] = twice(kw.get("timestep"))
        kw["guidance"] = twice(kw.get("guidance"))
        kw["pooled_projections"] = torch.cat([kw["pooled_projections"], self.negative_pooled])
        out = self._original(
            hidden_states=twice(hidden_states),
            encoder_hidden_states=torch.cat([encoder_hidden_states, neg]),
            return_dict=False,
            **kw,
        )[0]
        cond, uncond = out.chunk(2)
        self._pending = (hidden_states, uncond)
        self.batched_forwards += 1
        return _output(cond, return_dict)


def _bound(cfg: BatchedTrueCFG) -> Any:
    def forward(_module: Any, *args: Any, **kw: Any) -> Any:
        if args:  # the pipelines pass everything by keyword; anything else runs as it came
            return cfg._original(*args, **kw)
        return cfg.forward(**kw)

    return forward


def _output(sample: Any, return_dict: bool) -> Any:
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)
