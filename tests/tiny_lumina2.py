"""A tiny Lumina 2 pipeline built offline from configs (random weights, the tests' character tokenizer).

A ``Lumina2Transformer2DModel`` of 2 main blocks and 1 noise / 1 context refiner block (width 32, 2 heads,
1 KV head), a 2-layer Gemma 2 text encoder (width 32: the transformer's ``cap_feat_dim``), the tests'
4-channel VAE and the flow-matching scheduler. Lumina2Pipeline puts its system prompt before every prompt
(about 170 characters, so about 170 tokens of the character tokenizer), which its default
``max_sequence_length`` of 256 keeps whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from tiny_sdxl import finish_tiny_pipeline, tiny_vae, write_tokenizer
from transformers import Gemma2Config, Gemma2Model

TEXT_WIDTH = 32  # Gemma's hidden size: the transformer's cap_feat_dim


def tiny_decoder_config(vocab_size: int, max_position_embeddings: int) -> dict:
    """A 2-layer decoder-only text encoder's config fields (width TEXT_WIDTH, 2 heads of 16, 1 key-value
    head) on the tests' character tokenizer's ids: Gemma 2's here, Qwen3's for Z-Image."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": max_position_embeddings,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def tiny_gemma2(vocab_size: int) -> Gemma2Model:
    return Gemma2Model(Gemma2Config(**tiny_decoder_config(vocab_size, max_position_embeddings=512)))


def tiny_lumina2_transformer() -> Lumina2Transformer2DModel:
    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(300, 32, 32),
        cap_feat_dim=TEXT_WIDTH,
    )


def build_tiny_lumina2(folder: Path, seed: int = 0) -> Lumina2Pipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny Lumina2Pipeline."""
    torch.manual_seed(seed)
    transformer = tiny_lumina2_transformer()
    vae = tiny_vae(shift_factor=0.0, scaling_factor=1.0)
    tokenizer = write_tokenizer(folder / "tokenizer")
    text_encoder = tiny_gemma2(len(tokenizer))
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    return finish_tiny_pipeline(pipe, folder)
