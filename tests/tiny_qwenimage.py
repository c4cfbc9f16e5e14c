"""A tiny Qwen-Image pipeline built offline from configs (random weights, a tokenizer written here).

A ``QwenImageTransformer2DModel`` of 2 double-stream blocks, a 2-layer Qwen2.5-VL text encoder with a
1-block vision tower, the 4-channel Qwen-Image VAE (downsampling 4x) and the flow-matching scheduler.

The tokenizer is a byte-level BPE ``Qwen2Tokenizer`` (every byte a token) whose merges spell the words of
QwenImagePipeline's chat template whole, as Qwen's own tokenizer does: the template's system part and
``<|im_start|>user\\n`` are then 34 tokens, the ``prompt_template_encode_start_idx`` the pipeline drops from
the encoder's output, so the transformer sees the user's prompt and the closing ``<|im_end|>\\n<|im_start|>
assistant\\n`` only, as with the real tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tiny_sdxl import finish_tiny_pipeline
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

# QwenImagePipeline's template (``prompt_template_encode``) and how many tokens it drops.
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXT_WIDTH = 16  # the encoder's hidden size: the transformer's joint_attention_dim


def byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet (``bytes_to_unicode``): one printable character per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def write_qwen_tokenizer(folder: Path) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2Tokenizer (special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``)
    that spells the template's words whole, saved in ``folder``."""
    symbols = byte_symbols()
    space = symbols[ord(" ")]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    text = TEMPLATE.replace("{}", "")
    for special in SPECIAL:
        text = text.replace(special, "")
    # the template's words as Qwen's pre-tokenizer cuts them: a word after a space carries it (Ġ)
    for word in re.findall(r" ?[A-Za-z]+", text):
        spelled = word.replace(" ", space)
        for end in range(2, len(spelled) + 1):
            if spelled[:end] not in vocab:
                vocab[spelled[:end]] = len(vocab)
                merges.append((spelled[: end - 1], spelled[end - 1]))
    for special in SPECIAL:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_qwen_vl(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL (hidden size TEXT_WIDTH) with a 1-block vision tower, random weights, for
    ``tokenizer``'s vocabulary."""
    vocab_size = len(tokenizer)
    special = {
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab_size,
            **special,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": TEXT_WIDTH,
        },
        hidden_size=TEXT_WIDTH,
        vocab_size=vocab_size,
        **special,
        # out of the tiny vocabulary: no prompt holds an image placeholder
        image_token_id=vocab_size + 1,
        video_token_id=vocab_size + 2,
        vision_start_token_id=vocab_size + 3,
        vision_end_token_id=vocab_size + 4,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwenimage(folder: Path, seed: int = 0) -> QwenImagePipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny QwenImagePipeline."""
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    tokenizer = write_qwen_tokenizer(folder / "tokenizer")
    text_encoder = tiny_qwen_vl(tokenizer)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, folder)
