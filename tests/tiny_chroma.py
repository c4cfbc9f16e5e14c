"""A tiny Chroma pipeline built offline from configs (random weights, the tests' character tokenizer).

A ``ChromaTransformer2DModel`` of 2 double and 2 single blocks with a 1-layer distilled-guidance
approximator, the tests' 2-layer T5 (Chroma's only text encoder), the 4-channel VAE and the flow-matching
scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from tiny_flux import tiny_t5
from tiny_sdxl import tiny_vae, write_tokenizer

# The tokenizer's own length: the tests' prompts differ after 16 characters, where a shorter T5 length would
# cut them into one prompt.
MAX_SEQUENCE_LENGTH = 32


def build_tiny_chroma(folder: Path, seed: int = 0) -> ChromaPipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny ChromaPipeline."""
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
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
    for module in (transformer, vae, text_encoder):
        module.eval()  # built from configs, they start in training mode (T5's dropout would be live)
    pipe.save_pretrained(str(folder))
    return pipe.to(torch.float32)
