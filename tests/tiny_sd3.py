"""A tiny Stable Diffusion 3 pipeline built offline from configs (random weights, the tests' tokenizer).

Two CLIP encoders with projection (SD3's CLIP-L and CLIP-G) and a T5 encoder, an ``SD3Transformer2DModel``
of 3 MMDiT blocks (the last is ``context_pre_only``, as in SD3), a 4-channel VAE and the flow-matching
scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tiny_flux import tiny_t5
from tiny_sdxl import finish_tiny_pipeline, text_config, tiny_vae, write_tokenizer
from transformers import CLIPTextModelWithProjection


def build_tiny_sd3(folder: Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny StableDiffusion3Pipeline."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width; the two CLIPs' 32 + 32 hidden states are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIPs' projections, concatenated
        out_channels=4,
        pos_embed_max_size=32,
    )
    vae = tiny_vae(shift_factor=0.0, scaling_factor=1.0)
    tokenizer = write_tokenizer(folder / "tokenizer")
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2")
    text_encoder = CLIPTextModelWithProjection(text_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(len(tokenizer_2)))
    tokenizer_3 = write_tokenizer(folder / "tokenizer_3")
    text_encoder_3 = tiny_t5(len(tokenizer_3), d_model=64)  # the transformer's joint_attention_dim
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, folder)
