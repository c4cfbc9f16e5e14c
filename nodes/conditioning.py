"""ComfyUI conditioning of prompt lists for fitting: encode, stack into one batch, and what the text
encoders see of a prompt (to compare prompt sets)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def encode_prompts(clip: Any, prompts: Sequence[str], check: Callable[[], None]) -> list[tuple]:
    out = []
    for prompt in prompts:
        check()
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        out.append((cond, pooled))
    return out


def stack_conds(encoded: Sequence[tuple], length: int | None = None) -> list:
    """One conditioning entry for a batch of prompts (token lengths made equal by repetition, which leaves
    cross-attention unchanged: ComfyUI batches conds of different lengths the same way)."""
    lengths = [cond.shape[1] for cond, _ in encoded]
    common = length or math.lcm(*lengths)
    cond = torch.cat([c.repeat(1, common // c.shape[1], 1) for c, _ in encoded])
    # "pooled_output" is always there, None for encoders without one (T5 alone), as CLIPTextEncode's output:
    # some models read it unconditionally (ComfyUI's FLUX and Chroma: encode_adm).
    pooled = [p for _, p in encoded]
    extra = {"pooled_output": torch.cat(pooled) if all(p is not None for p in pooled) else None}
    return [[cond, extra]]


def hf_tokenizer(clip: Any) -> Any:
    """The Hugging Face tokenizer behind ComfyUI's CLIP tokenizer (clip_l's, else clip_g's), if any."""
    for name in ("clip_l", "clip_g"):
        inner = getattr(getattr(clip, "tokenizer", None), name, None)
        if hasattr(getattr(inner, "tokenizer", None), "tokenize"):
            return inner.tokenizer
    return None


def token_keys(clip: Any, prompts: Sequence[str]) -> list[tuple]:
    """What the text encoders see of each prompt (token ids of every encoder), to compare prompt sets."""
    keys = []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        keys.append(
            tuple(
                (name, tuple(t[0] for chunk in value for t in chunk))
                for name, value in sorted(tokens.items())
            )
        )
    return keys
