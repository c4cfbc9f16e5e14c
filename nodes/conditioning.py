"""ComfyUI conditioning of prompt lists for fitting and folding: encode, stack into one batch, each prompt's
noise, and what the text encoders see of a prompt (to compare prompt sets)."""

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


# Repeating every prompt's tokens up to the least common multiple of their lengths leaves cross-attention
# unchanged (ComfyUI batches conds of different lengths the same way); with tokenizers that do not pad to a
# fixed chunk (T5, Qwen) that multiple can reach hundreds of thousands of tokens, so beyond this many times
# the longest prompt the tokens are repeated cyclically up to the longest prompt instead (not exact).
MAX_REPEAT_FACTOR = 4


def common_length(lengths: Sequence[int]) -> tuple[int, bool]:
    """(token length every prompt's conditioning is stretched to, whether the stretch is exact repetition)."""
    exact, longest = math.lcm(*lengths), max(lengths)
    return (exact, True) if exact <= MAX_REPEAT_FACTOR * longest else (longest, False)


def stretch(cond: torch.Tensor, length: int) -> torch.Tensor:
    """``cond`` (1, T, C) repeated along tokens to ``length`` (cut where ``length`` is not a multiple of T)."""
    return cond.repeat(1, -(-length // cond.shape[1]), 1)[:, :length]


def stack_conds(encoded: Sequence[tuple], length: int | None = None) -> list:
    """One conditioning entry for a batch of prompts, token lengths made equal (``common_length``)."""
    common = length or common_length([cond.shape[1] for cond, _ in encoded])[0]
    cond = torch.cat([stretch(c, common) for c, _ in encoded])
    # "pooled_output" is always there, None for encoders without one (T5 alone), as CLIPTextEncode's output:
    # some models read it unconditionally (ComfyUI's FLUX and Chroma: encode_adm).
    pooled = [p for _, p in encoded]
    extra = {"pooled_output": torch.cat(pooled) if all(p is not None for p in pooled) else None}
    return [[cond, extra]]


def prompt_noise(latent: torch.Tensor, seed: int, count: int) -> torch.Tensor:
    """KSampler's noise for ``count`` prompts on one latent each, prompt i from seed ``(seed + i) mod 2**64``
    (the same noise whatever the batching)."""
    import comfy.sample

    return torch.cat([comfy.sample.prepare_noise(latent[:1], (seed + i) % (2**64)) for i in range(count)])


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
