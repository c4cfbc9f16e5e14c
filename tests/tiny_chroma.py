"""A tiny Chroma pipeline built offline from configs (random weights, the tests' character tokenizer).

A ``ChromaTransformer2DModel`` of 2 double and 2 single blocks with a 1-layer distilled-guidance
approximator, the tests' 2-layer T5 (Chroma's only text encoder), the 4-channel VAE and the flow-matching
scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from tiny_flux import TINY_FLUX_BLOCKS, tiny_t5
from tiny_sdxl import finish_tiny_pipeline, tiny_vae, write_tokenizer

# The tokenizer's own length: the tests' prompts differ after 16 characters, where a shorter T5 length would
# cut them into one prompt.
MAX_SEQUENCE_LENGTH = 32


def tiny_chroma_transformer(approximator_num_channels: int = 16) -> ChromaTransformer2DModel:
    """The tiny FLUX transformer's layout with a 1-layer distilled-guidance approximator."""
    return ChromaTransformer2DModel(
        **TINY_FLUX_BLOCKS,
        approximator_num_channels=approximator_num_channels,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )


def build_tiny_chroma(folder: Path, seed: int = 0) -> ChromaPipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny ChromaPipeline."""
    torch.manual_seed(seed)
    transformer = tiny_chroma_transformer()
    vae = tiny_vae(shift_factor=0.0, scaling_factor=1.0)
    tokenizer = write_tokenizer(folder / "tokenizer")
    text_encoder = tiny_t5(len(tokenizer), d_model=32)  # the transformer's joint_attention_dim
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, folder)
