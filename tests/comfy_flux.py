"""A diffusers FLUX transformer as ComfyUI's own FLUX MODEL, through ComfyUI's diffusers key conversion.

ComfyUI's ``convert_diffusers_mmdit`` maps the diffusers weights onto its ``Flux`` (double_blocks /
single_blocks), ``detect_unet_config`` reads the architecture off them and ``model_config_from_unet_config``
picks the supported model (FLUX.1-schnell without guidance embedding): the path its UNETLoader takes for a
diffusers-format FLUX file. Detection hard-codes FLUX.1's full sizes (width 3072, 24 heads, ...); the tiny
model's are taken from its diffusers config instead. ``test_comfy_flux.py`` checks it is the same model.
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_support import patcher_of, setup_comfy, tiny_comfy_clip


def load_flux_transformer(transformer: torch.nn.Module) -> Any:
    """A float32 CPU ModelPatcher of ComfyUI's FLUX with ``transformer``'s weights."""
    setup_comfy()
    import comfy.model_detection

    # Copies: the conversion rewrites some tensors in place (FLUX's final scale/shift swap), which would
    # otherwise change the diffusers model's own parameters.
    weights = {
        key: value.detach().to(torch.float32, copy=True) for key, value in transformer.state_dict().items()
    }
    state = comfy.model_detection.convert_diffusers_mmdit(weights, "")
    config = comfy.model_detection.detect_unet_config(state, "")
    ours = transformer.config
    heads, head_dim = ours.num_attention_heads, ours.attention_head_dim
    config.update(
        hidden_size=heads * head_dim,
        num_heads=heads,
        context_in_dim=ours.joint_attention_dim,
        out_channels=(ours.out_channels or ours.in_channels) // 4,
        axes_dim=list(ours.axes_dims_rope),
        mlp_ratio=state["double_blocks.0.img_mlp.0.weight"].shape[0] / (heads * head_dim),
    )
    model_config = comfy.model_detection.model_config_from_unet_config(config, state)
    if model_config is None:
        raise RuntimeError(f"ComfyUI does not recognise this transformer ({config})")
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model(state)
    # ComfyUI's FLUX latent format says 16 channels (FLUX.1's VAE); the tiny VAE has in_channels / 4. Empty
    # latents (the Fit node's, EmptyLatentImage's) take their channel count from here.
    base.latent_format.latent_channels = (ours.in_channels) // 4
    return patcher_of(base, state)


# Tiny widths matching tests/tiny_flux.py's transformer (joint_attention_dim 32, pooled_projection_dim 32).
TINY_FLUX_CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
}
TINY_FLUX_T5 = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_heads": 2, "num_layers": 2}


def build_flux_clip(seed: int = 0) -> Any:
    """ComfyUI's own FLUX text encoders (clip_l + t5xxl, ``comfy.text_encoders.flux``) at tiny widths, random
    weights, with ComfyUI's real CLIP and T5 tokenizers: what a FLUX checkpoint's CLIP output is, small."""
    setup_comfy()
    import comfy.text_encoders.flux as flux

    return tiny_comfy_clip(
        flux.FluxTokenizer,
        flux.FluxClipModel,
        seed,
        clip_l_model_config=dict(TINY_FLUX_CLIP_L),
        t5xxl_model_config=dict(TINY_FLUX_T5),
    )


def flux_clip_like(pipe: Any, seed: int = 0) -> Any:
    """ComfyUI's FLUX CLIP with the sizes of a diffusers FluxPipeline's text encoders, and their norm weights
    loaded through ComfyUI's own per-encoder loaders (``clip_l.load_sd`` / ``t5xxl.load_sd``, keyed by the
    transformers module paths as real checkpoints are). Other weights stay random: the tiny pipeline's
    vocabularies and position tables are not ComfyUI's, so only the norms are the same modules."""
    setup_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    from comfy_support import init_weights

    clip_config, t5_config = pipe.text_encoder.config, pipe.text_encoder_2.config
    target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.FluxClipModel
    )
    clip = comfy.sd.CLIP(
        target,
        model_options={
            "dtype": torch.float32,
            "clip_l_model_config": {
                key: getattr(clip_config, key)
                for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
            },
            "t5xxl_model_config": {
                key: getattr(t5_config, key) for key in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers")
            },
        },
    )
    init_weights(clip.cond_stage_model, seed + 1)
    norms = {
        "clip_l": {
            (key if key.startswith("text_model.") else f"text_model.{key}"): value
            for key, value in pipe.text_encoder.state_dict().items()
            if "layer_norm" in key
        },
        "t5xxl": {
            key: value for key, value in pipe.text_encoder_2.state_dict().items() if "layer_norm" in key
        },
    }
    for name, weights in norms.items():
        missing, unexpected = getattr(clip.cond_stage_model, name).load_sd(weights)
        if unexpected or not weights:
            raise RuntimeError(f"{name}: the norm weights do not fit ({unexpected[:3]})")
    clip.cond_stage_model.eval()
    return clip
