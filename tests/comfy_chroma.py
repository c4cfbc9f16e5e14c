"""A tiny Chroma in both hosts with the same weights: a diffusers ChromaPipeline and ComfyUI's own Chroma MODEL
(``comfy.ldm.chroma.model.Chroma``) made from its transformer, plus ComfyUI's own Chroma text encoder (T5 as
``pixart_te``, what ComfyUI's Chroma checkpoints load) at tiny widths.

ComfyUI's Chroma hard-codes what Chroma1 has: the approximator's input (16 + 16 timestep / guidance channels and
a 32-channel index embedding: diffusers' ``approximator_num_channels=64``) and 344 modulation rows (diffusers
sizes them from the block counts: 3 * single + 12 * double + 2, 344 in Chroma1), the last two of which modulate
the final layer. The tiny diffusers transformer therefore gets 64 approximator channels and Chroma1's 344-row
index table. ComfyUI converts diffusers' FLUX-layout weights with its own ``convert_diffusers_mmdit``; the
approximator (which FLUX lacks) is renamed here, one key at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from comfy_support import patcher_of, setup_comfy, tiny_comfy_clip

MAX_SEQUENCE_LENGTH = 32
MODULATION_ROWS = 344  # Chroma1's (19 double, 38 single blocks), which ComfyUI's Chroma hard-codes
TINY_CHROMA_T5 = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_heads": 2, "num_layers": 2}
# diffusers' approximator (ChromaApproximator) -> ComfyUI's (Approximator: MLPEmbedder layers, RMSNorm scales)
APPROXIMATOR_KEYS = {"linear_1": "in_layer", "linear_2": "out_layer"}


def build_chroma_pipeline(folder: Path, seed: int = 0) -> Any:
    """A tiny diffusers ChromaPipeline whose transformer ComfyUI's Chroma can hold (see above)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from diffusers.models.embeddings import get_timestep_embedding
    from tiny_chroma import tiny_chroma_transformer
    from tiny_flux import tiny_t5
    from tiny_sdxl import finish_tiny_pipeline, tiny_vae, write_tokenizer

    torch.manual_seed(seed)
    transformer = tiny_chroma_transformer(approximator_num_channels=64)
    embed = transformer.time_text_embed
    channels = embed.time_proj.num_channels
    embed.mod_proj = get_timestep_embedding(  # as diffusers builds it, for Chroma1's 344 rows
        torch.arange(MODULATION_ROWS) * 1000, 2 * channels, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    tokenizer = write_tokenizer(folder / "tokenizer")
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=tiny_t5(len(tokenizer), d_model=32),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe)


def comfy_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's Chroma state dict of a diffusers Chroma transformer."""
    import comfy.model_detection

    weights = {  # copies: ComfyUI's conversion rewrites some tensors in place
        key: value.detach().to(torch.float32, copy=True) for key, value in transformer.state_dict().items()
    }
    state = comfy.model_detection.convert_diffusers_mmdit(weights, "")  # FLUX's layout: blocks, in/out
    for key, value in weights.items():
        if not key.startswith("distilled_guidance_layer."):
            continue
        parts = key.split(".")
        if parts[1] == "layers":
            parts[3] = APPROXIMATOR_KEYS[parts[3]]
        elif parts[1] == "norms":
            parts[3] = "scale"
        state[".".join(parts)] = value
    return state


def load_chroma_transformer(transformer: torch.nn.Module) -> Any:
    """A float32 CPU ModelPatcher of ComfyUI's Chroma with ``transformer``'s weights."""
    setup_comfy()
    import comfy.supported_models

    ours = transformer.config
    heads, head_dim = ours.num_attention_heads, ours.attention_head_dim
    hidden = heads * head_dim
    config = {
        "image_model": "chroma",
        "in_channels": ours.in_channels,
        "out_channels": ours.out_channels or ours.in_channels,
        "context_in_dim": ours.joint_attention_dim,
        "hidden_size": hidden,
        "mlp_ratio": 4.0,
        "num_heads": heads,
        "depth": ours.num_layers,
        "depth_single_blocks": ours.num_single_layers,
        "axes_dim": list(ours.axes_dims_rope),
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "in_dim": ours.approximator_num_channels,
        "out_dim": hidden,
        "hidden_dim": ours.approximator_hidden_dim,
        "n_layers": ours.approximator_layers,
    }
    model_config = comfy.supported_models.Chroma(config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    base.latent_format.latent_channels = ours.in_channels // 4  # the tests' 4-channel latents, 2x2 patches
    return patcher_of(base, comfy_state(transformer))


def build_chroma_clip(seed: int = 0) -> Any:
    """ComfyUI's own Chroma text encoder (``comfy.text_encoders.pixart_t5``: T5 alone, as ComfyUI's Chroma
    model config asks) at tiny widths, random weights, with ComfyUI's real T5 tokenizer."""
    setup_comfy()
    import comfy.text_encoders.pixart_t5 as pixart_t5

    return tiny_comfy_clip(
        pixart_t5.PixArtTokenizer, pixart_t5.pixart_te(), seed, t5xxl_model_config=dict(TINY_CHROMA_T5)
    )
