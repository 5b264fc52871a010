"""Small random-weight FLUX pipelines, built offline.

`remotegpu models build-tiny [OUT_DIR]` writes one folder per architecture
(`flux1`, `flux1-kontext`, `flux2`, `flux2-klein`) with every part of the pipeline
(transformer, VAE, text encoders, tokenizers, scheduler) created locally with
seeded random weights and saved with `save_pretrained`, so tests and the embedded
default load them through exactly the same `from_pretrained` path as real weights.
They produce noise; the catalog lists them under their own `tiny-random-*` names.

Sizes: the VAE has four blocks (scale factor 8, like FLUX's), so a 512x512 image is
a 32x32 token grid and a step takes milliseconds on a CPU; the text encoders keep
the layer counts the pipelines index into (Mistral 30, Qwen3 27) at hidden size 16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remotegpu_base.catalog import Architecture

TINY_DIRNAME = "tiny-models"
MARKER = "remotegpu-tiny.json"
BUILD_VERSION = 1  # bump when the recipe changes, so stale builds are rebuilt
SEED = 0

Progress = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_built(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file() or not (path / "model_index.json").is_file():
        return False
    try:
        return int(json.loads(marker.read_text()).get("version", 0)) == BUILD_VERSION
    except (ValueError, OSError):
        return False


# --------------------------------------------------------------------------- tokenizers


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77
    return tok


def _t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    chars = [chr(c) for c in range(33, 127)]
    for ch in chars:
        for piece, score in ((ch, -3.0), ("\u2581" + ch, -2.5)):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score))
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


_QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _qwen_tokenizer() -> Any:
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Qwen2TokenizerFast(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    )
    tok.chat_template = _QWEN_TEMPLATE
    tok.model_max_length = 512
    return tok


_MISTRAL_SPECIALS = [
    "<unk>",
    "[IMG]",
    "<s>",
    "</s>",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]

_MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set ns = namespace(text='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set ns.text = ns.text + part['text'] %}"
    "{%- elif part['type'] == 'image' %}{%- set ns.text = ns.text + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- set text = ns.text %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _mistral_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained (deterministically) on FLUX.2's system message, so the
    fixed system prompt takes few tokens and the user prompt still fits in 512."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    try:
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        corpus = [SYSTEM_MESSAGE]
    except ImportError:  # pragma: no cover - older diffusers
        corpus = []
    corpus += ["a photo of a cat on a red sofa", "an astronaut riding a horse, oil painting"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_MISTRAL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )
    tok.chat_template = _MISTRAL_TEMPLATE
    return tok


# --------------------------------------------------------------------------- models


def _seed(offset: int) -> None:
    import torch

    torch.manual_seed(SEED + offset)


def vae_blocks(n: int = 4) -> dict[str, Any]:
    """The block types of a FLUX VAE with n levels (scale factor 2**(n-1))."""
    return {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n}


def flux1_scheduler() -> Any:
    """FLUX.1's flow-matching scheduler as published (scheduler/scheduler_config.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )


def _flux2_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


# The tiny recipe: each component's constructor arguments. bench/worker_gpu.py builds
# the same components from the published full-size arguments.
_TINY_VAE = {
    **vae_blocks(),
    "block_out_channels": (4,) * 4,
    "layers_per_block": 1,
    "latent_channels": 1,
    "norm_num_groups": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    # No attention in the VAE mid block: at 1024x768 the latent grid is 12k positions.
    "mid_block_add_attention": False,
    "sample_size": 512,
}
_TINY_FLUX2_TRANSFORMER = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * 16,  # three stacked hidden states of the width-16 encoder
    timestep_guidance_channels=256,
    axes_dims_rope=(4, 4, 4, 4),
)
TINY: dict[str, dict[str, Any]] = {
    "flux1": dict(
        transformer=dict(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
        vae={**_TINY_VAE, "shift_factor": 0.0609, "scaling_factor": 1.5035},
        clip=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=1000,
            projection_dim=32,
            hidden_act="gelu",
        ),
        t5=dict(
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=5,
            relative_attention_num_buckets=8,
            vocab_size=1103,
            feed_forward_proj="relu",
            pad_token_id=0,
        ),
    ),
    "flux2": dict(
        transformer={**_TINY_FLUX2_TRANSFORMER, "guidance_embeds": True},
        vae=_TINY_VAE,
        text=dict(
            vocab_size=512,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=30,  # the pipeline reads hidden states 10, 20 and 30
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            max_position_embeddings=2048,
        ),
        vision=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=30,
            patch_size=6,
        ),
        mistral3=dict(spatial_merge_size=1),
    ),
    "flux2-klein": dict(
        transformer={**_TINY_FLUX2_TRANSFORMER, "guidance_embeds": False},
        vae=_TINY_VAE,
        text=dict(
            vocab_size=512,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=27,  # the pipeline reads hidden states 9, 18 and 27
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=2048,
        ),
    ),
}


def _quiet(_msg: str) -> None:
    pass


def flux1_components(sizes: dict[str, Any], progress: Progress = _quiet) -> dict[str, Any]:
    """FluxPipeline's parts (FLUX.1 and Kontext share them) with random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    progress("  transformer (FluxTransformer2DModel)")
    _seed(1)
    transformer = FluxTransformer2DModel(**sizes["transformer"])
    progress("  VAE (AutoencoderKL)")
    _seed(2)
    vae = AutoencoderKL(**sizes["vae"])
    progress("  text encoder (CLIP) and tokenizer")
    _seed(3)
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **sizes["clip"]))
    progress("  text encoder 2 (T5) and tokenizer")
    _seed(4)
    t5 = T5EncoderModel(T5Config(eos_token_id=1, is_encoder_decoder=False, use_cache=False, **sizes["t5"]))
    return {
        "scheduler": flux1_scheduler(),
        "vae": vae,
        "text_encoder": clip,
        "tokenizer": _clip_tokenizer(),
        "text_encoder_2": t5,
        "tokenizer_2": _t5_tokenizer(),
        "transformer": transformer,
    }


def flux2_components(sizes: dict[str, Any], progress: Progress = _quiet) -> dict[str, Any]:
    """Flux2Pipeline's parts with random weights: a Mistral3 encoder."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    progress("  tokenizer (byte-level BPE with a chat template)")
    tokenizer = _mistral_tokenizer(vocab_size=512)
    progress("  transformer (Flux2Transformer2DModel)")
    _seed(1)
    transformer = Flux2Transformer2DModel(**sizes["transformer"])
    progress("  VAE (AutoencoderKLFlux2)")
    _seed(2)
    vae = AutoencoderKLFlux2(**sizes["vae"])
    text = sizes["text"]
    progress(f"  text encoder (Mistral3, {text['num_hidden_layers']} layers of width {text['hidden_size']})")
    _seed(3)
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=MistralConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                sliding_window=None,
                **text,
            ),
            vision_config=PixtralVisionConfig(**sizes["vision"]),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            tie_word_embeddings=False,
            **sizes.get("mistral3", {}),
        )
    )
    return {
        "scheduler": _flux2_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def flux2_klein_components(sizes: dict[str, Any], progress: Progress = _quiet) -> dict[str, Any]:
    """Flux2KleinPipeline's parts with random weights: a Qwen3 encoder, distilled."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    progress("  tokenizer (Qwen2, byte-level with a chat template)")
    tokenizer = _qwen_tokenizer()
    progress("  transformer (Flux2Transformer2DModel, no guidance embedding)")
    _seed(1)
    transformer = Flux2Transformer2DModel(**sizes["transformer"])
    progress("  VAE (AutoencoderKLFlux2)")
    _seed(2)
    vae = AutoencoderKLFlux2(**sizes["vae"])
    text = sizes["text"]
    progress(f"  text encoder (Qwen3, {text['num_hidden_layers']} layers of width {text['hidden_size']})")
    _seed(3)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
            **text,
        )
    )
    return {
        "scheduler": _flux2_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "is_distilled": True,
    }


def _pipeline(architecture: Architecture, progress: Progress) -> Any:
    import diffusers

    if architecture is Architecture.FLUX1:
        return diffusers.FluxPipeline(**flux1_components(TINY["flux1"], progress))
    if architecture is Architecture.FLUX1_KONTEXT:
        return diffusers.FluxKontextPipeline(**flux1_components(TINY["flux1"], progress))
    if architecture is Architecture.FLUX2:
        return diffusers.Flux2Pipeline(**flux2_components(TINY["flux2"], progress))
    if architecture is Architecture.FLUX2_KLEIN:
        return diffusers.Flux2KleinPipeline(**flux2_klein_components(TINY["flux2-klein"], progress))
    raise ValueError(f"unknown architecture {architecture!r}")


def build_tiny(
    out_dir: Path | str,
    architecture: Architecture | str,
    *,
    force: bool = False,
    progress: Progress | None = _print,
) -> Path:
    """Builds one random-weight pipeline into out_dir/<architecture>; returns that folder.

    Written to a temporary sibling and renamed, so a crash never leaves a half-built
    folder that looks complete. Seeded: the same recipe gives the same weights.
    """
    arch = Architecture(architecture)
    say: Progress = progress or (lambda _msg: None)
    target = Path(out_dir) / arch.value
    if is_built(target) and not force:
        say(f"{arch.value}: already built at {target}")
        return target
    import torch

    started = time.monotonic()
    say(f"building tiny random-weight {arch.value} pipeline -> {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch.value}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            pipe = _pipeline(arch, say)
        say("  saving with save_pretrained")
        pipe.save_pretrained(tmp, safe_serialization=True)
        seconds = time.monotonic() - started
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "version": BUILD_VERSION,
                    "architecture": arch.value,
                    "pipeline": type(pipe).__name__,
                    "random_weights": True,
                    "seed": SEED,
                    "build_seconds": round(seconds, 2),
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    say(f"  done in {time.monotonic() - started:.1f}s ({size / 1e6:.1f} MB)")
    return target


def build_all(
    out_dir: Path | str, *, force: bool = False, progress: Progress | None = _print
) -> dict[Architecture, Path]:
    out: dict[Architecture, Path] = {}
    archs = list(Architecture)
    for i, arch in enumerate(archs, 1):
        if progress:
            progress(f"[{i}/{len(archs)}] {arch.value}")
        out[arch] = build_tiny(out_dir, arch, force=force, progress=progress)
    return out


def missing(out_dir: Path | str) -> list[Architecture]:
    return [a for a in Architecture if not is_built(Path(out_dir) / a.value)]


def build_command(args: argparse.Namespace) -> int:
    """`remotegpu models build-tiny [OUT_DIR] [--data-dir D] [--force]`."""
    from remotegpu_base import config

    out = (
        Path(args.out_dir)
        if args.out_dir
        else config.data_dir(getattr(args, "data_dir", None)) / TINY_DIRNAME
    )
    started = time.monotonic()
    build_all(out, force=bool(getattr(args, "force", False)))
    _print(f"tiny random-weight models ready in {out} ({time.monotonic() - started:.1f}s)")
    return 0
