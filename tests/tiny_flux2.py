"""A tiny FLUX.2 pipeline built offline from configs (random weights, the tests' character tokenizer).

A ``Flux2Transformer2DModel`` of 2 double and 2 single blocks (width 32, 2 heads, guidance embedded as in
FLUX.2 [dev]), a Mistral 3 text encoder (``Mistral3ForConditionalGeneration``, FLUX.2's class) whose language
model has the 30 layers the pipeline reads (its hidden states 10, 20 and 30, stacked along features: the
transformer's ``joint_attention_dim`` is 3 x the encoder's width) at width 16, with a 1-layer Pixtral vision
tower, the FLUX.2 VAE at two levels (4 latent channels, downsampling 2x) and the flow-matching scheduler with
dynamic shifting (the pipeline passes its own ``mu``). The transformer's shared modulations are scaled up
(see ``build_tiny_flux2``) so that the prompt reaches the image.

FLUX.2's tokenizer is a ``PixtralProcessor``, which needs torchvision (not installed here); the pipeline only
calls its ``apply_chat_template``, which the tests' character tokenizer has too, with a Mistral-like template
for FLUX.2's ``[system, user]`` messages (their content a list of ``{"type": "text", "text": ...}`` parts).
The system message comes first (about 170 tokens here), then the prompt, then padding to
``max_sequence_length``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from tiny_sdxl import finish_tiny_pipeline, write_tokenizer
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

TEXT_WIDTH = 16  # the language model's hidden size; the transformer reads 3 of its layers stacked
TEXT_LAYERS = 30  # Flux2Pipeline reads hidden states (10, 20, 30)
# The tests' prompt length: the system message and the prompt fit, in less time than the default 512.
MAX_SEQUENCE_LENGTH = 256
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}system {% else %}inst {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %} end {% endfor %}"
)


def tiny_mistral3(vocab_size: int) -> Mistral3ForConditionalGeneration:
    """A Mistral 3 text encoder of ``TEXT_LAYERS`` layers at width ``TEXT_WIDTH``, 1-layer vision tower."""
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab_size,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 32,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 1024,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 32,
            "patch_size": 16,
        },
        image_token_index=vocab_size + 1,  # out of the tiny vocabulary: no prompt holds an image
        tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config)


def tiny_flux2_transformer(guidance_embeds: bool = True) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, 2x2 patches
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_tiny_flux2(folder: Path, seed: int = 0) -> Flux2Pipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny Flux2Pipeline."""
    torch.manual_seed(seed)
    transformer = tiny_flux2_transformer()
    # Random modulation weights give gates of about 0.04 (a trained model's are of order 1): the blocks, and
    # the prompt with them, would barely reach the output. Scaled by 10, the prompt moves the image and a fit
    # has something to steer (calibration gains near 1).
    with torch.no_grad():
        for modulation in (
            transformer.double_stream_modulation_img,
            transformer.double_stream_modulation_txt,
            transformer.single_stream_modulation,
        ):
            modulation.linear.weight.mul_(10.0)
    vae = tiny_flux2_vae()
    tokenizer = write_tokenizer(folder / "tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    text_encoder = tiny_mistral3(len(tokenizer))
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, folder)
