"""A tiny FLUX.1 pipeline built offline from configs (random weights, the tests' character tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tiny_sdxl import finish_tiny_pipeline, text_config, tiny_vae, write_tokenizer
from transformers import CLIPTextModel, T5Config, T5EncoderModel

MAX_SEQUENCE_LENGTH = 16
# The tiny FLUX transformer's layout (2 double and 2 single blocks of 2 heads of 16, 4 latent channels in 2x2
# patches), which the tiny Chroma transformers share.
TINY_FLUX_BLOCKS = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}


def tiny_t5(vocab_size: int, d_model: int) -> T5EncoderModel:
    """The tests' 2-layer T5 encoder (FLUX's and SD3's third text encoder) at width ``d_model``."""
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=1,
            eos_token_id=1,
        )
    )


def build_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny FluxPipeline (2 double, 2 single blocks)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        **TINY_FLUX_BLOCKS, pooled_projection_dim=32, guidance_embeds=guidance_embeds
    )
    vae = tiny_vae(shift_factor=0.0, scaling_factor=1.0)
    tokenizer = write_tokenizer(folder / "tokenizer")
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2")
    text_encoder = CLIPTextModel(text_config(len(tokenizer)))
    text_encoder_2 = tiny_t5(len(tokenizer_2), d_model=32)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, folder)
