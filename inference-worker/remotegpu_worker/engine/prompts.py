"""Prompt length in text-encoder tokens, counted the way each pipeline tokenizes.

The pipelines cut a prompt at max_sequence_length tokens without telling anyone; the
engine counts first and refuses a longer prompt (`bad input`), so nothing a user
wrote is silently ignored. FLUX.1's CLIP encoder reads only the first 77 tokens for
the pooled embedding by design; the T5 sequence is what carries the whole prompt.
"""

from __future__ import annotations

from typing import Any

from remotegpu_base.catalog import Architecture


def count_tokens(pipe: Any, architecture: Architecture, prompt: str) -> int:
    if architecture in (Architecture.FLUX1, Architecture.FLUX1_KONTEXT):
        return len(pipe.tokenizer_2(prompt, truncation=False).input_ids)  # with </s>
    if architecture is Architecture.FLUX2:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input(prompts=[prompt], system_message=pipe.system_message)
        inputs = pipe.tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True, truncation=False
        )
        return len(inputs["input_ids"][0])
    if architecture is Architecture.FLUX2_KLEIN:
        text = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        return len(pipe.tokenizer(text, truncation=False).input_ids)
    raise ValueError(f"no tokenizer rule for {architecture.value}")
