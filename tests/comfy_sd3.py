"""A tiny SD3 in both hosts with the same weights: a diffusers StableDiffusion3Pipeline and ComfyUI's own SD3
MODEL (``OpenAISignatureMMDITWrapper``) made from its transformer through ComfyUI's diffusers key conversion,
plus ComfyUI's own SD3 CLIP at tiny widths.

ComfyUI's MMDiT fixes its geometry from the block count (``hidden_size = 64 * depth``, ``depth`` heads of 64) and
its diffusers conversion (``comfy.utils.mmdit_to_diffusers``) assumes ``depth`` blocks, so the tiny transformer
has 2 blocks of 2 heads of 64 (width 128; the second is ``context_pre_only``, as SD3's last block). ComfyUI's
SD3 CLIP pads CLIP-L / CLIP-G's hidden states to 4096 (T5-XXL's width), so the transformer's
``joint_attention_dim`` is 4096 and so is the diffusers pipeline's tiny T5. The latents have 4 channels (the
tests' VAE); ComfyUI's SD3 model config is built directly (its detection asks for SD3's 16 channels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from comfy_support import patcher_of, setup_comfy, tiny_comfy_clip

CONTEXT_WIDTH = 4096  # ComfyUI's SD3ClipModel pads the CLIP hidden states to T5-XXL's width
TINY_SD3_CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
}
TINY_SD3_CLIP_G = {**TINY_SD3_CLIP_L, "projection_dim": 32}
POOLED_WIDTH = 64  # CLIP-L's pooled vector (32, unprojected in ComfyUI) and CLIP-G's projection (32)
MAX_SEQUENCE_LENGTH = 16


def build_sd3_pipeline(folder: Path, seed: int = 0) -> Any:
    """A tiny diffusers StableDiffusion3Pipeline whose transformer ComfyUI's MMDiT can hold (see above)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny_flux import tiny_t5
    from tiny_sdxl import finish_tiny_pipeline, text_config, tiny_vae, write_tokenizer
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=CONTEXT_WIDTH,
        caption_projection_dim=128,
        pooled_projection_dim=POOLED_WIDTH,
        out_channels=4,
        pos_embed_max_size=16,
    )
    tokenizers = [write_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=CLIPTextModelWithProjection(text_config(len(tokenizers[0]))),
        tokenizer=tokenizers[0],
        text_encoder_2=CLIPTextModelWithProjection(text_config(len(tokenizers[1]))),
        tokenizer_2=tokenizers[1],
        text_encoder_3=tiny_t5(len(tokenizers[2]), d_model=CONTEXT_WIDTH),
        tokenizer_3=tokenizers[2],
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe)


def load_sd3_transformer(transformer: torch.nn.Module) -> Any:
    """A float32 CPU ModelPatcher of ComfyUI's SD3 with ``transformer``'s weights, converted by ComfyUI's own
    ``convert_diffusers_mmdit`` (the path its UNETLoader takes for a diffusers-format SD3 file) and
    configured by its ``detect_unet_config``."""
    setup_comfy()
    import comfy.model_detection
    import comfy.supported_models

    weights = {  # copies: the conversion rewrites some tensors in place (the scale/shift swaps)
        key: value.detach().to(torch.float32, copy=True) for key, value in transformer.state_dict().items()
    }
    state = comfy.model_detection.convert_diffusers_mmdit(weights, "")
    config = comfy.model_detection.detect_unet_config(state, "")
    model_config = comfy.supported_models.SD3(config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model(state)
    base.latent_format.latent_channels = transformer.config.in_channels  # the tests' 4-channel latents
    return patcher_of(base, state)


def build_sd3_clip(seed: int = 0) -> Any:
    """ComfyUI's own SD3 text encoders (``comfy.text_encoders.sd3_clip``: clip_l + clip_g, no T5, as an SD3
    checkpoint without T5 loads) at tiny widths, random weights, with ComfyUI's real tokenizers."""
    setup_comfy()
    import comfy.text_encoders.sd3_clip as sd3_clip

    return tiny_comfy_clip(
        sd3_clip.SD3Tokenizer,
        sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False),
        seed,
        clip_l_model_config=dict(TINY_SD3_CLIP_L),
        clip_g_model_config=dict(TINY_SD3_CLIP_G),
    )
