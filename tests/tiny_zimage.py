"""A tiny Z-Image pipeline built offline from configs (random weights, the tests' character tokenizer).

A ``ZImageTransformer2DModel`` of 2 main blocks and 1 noise / 1 context refiner block (width 32, 2 heads), a
2-layer Qwen3 text encoder (width 32: the transformer's ``cap_feat_dim``), the tests' 4-channel VAE (which
downsamples by 2: image sizes are multiples of 4) and the flow-matching scheduler. ZImagePipeline wraps each
prompt in the tokenizer's chat template: the tests' character tokenizer gets Qwen3's template for a user
message (without the thinking part, which ``enable_thinking=True`` leaves out).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tiny_lumina2 import TEXT_WIDTH, tiny_decoder_config
from tiny_sdxl import finish_tiny_pipeline, tiny_vae, write_tokenizer
from transformers import Qwen3Config, Qwen3Model

# Qwen3's hidden size, TEXT_WIDTH (32), is the transformer's cap_feat_dim.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen3(vocab_size: int) -> Qwen3Model:
    return Qwen3Model(Qwen3Config(**tiny_decoder_config(vocab_size, max_position_embeddings=1024)))


def tiny_zimage_transformer() -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_WIDTH,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )


def build_tiny_zimage(folder: Path, seed: int = 0) -> ZImagePipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny ZImagePipeline."""
    torch.manual_seed(seed)
    transformer = tiny_zimage_transformer()
    # the pad and cap pad tokens start at zero: random ones make the padding visible in the tests
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = tiny_vae(shift_factor=0.0, scaling_factor=1.0)
    tokenizer = write_tokenizer(folder / "tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    text_encoder = tiny_qwen3(len(tokenizer))
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, folder)
