"""ComfyUI's own Qwen-Image classes, tiny: the diffusion model with a diffusers transformer's weights, and the
Qwen2.5-VL CLIP.

* ``load_qwenimage_transformer``: ComfyUI's ``QwenImageTransformer2DModel`` (``comfy.ldm.qwen_image``) as
  ComfyUI's UNETLoader makes it from a diffusers-format Qwen-Image file: ``detect_unet_config`` reads the
  architecture off the weights, ``model_config_from_unet_config`` picks the supported model, and the weights
  load under their own (diffusers) keys, which are ComfyUI's. Detection reads only the layer count and input
  width; the tiny widths are taken from the diffusers config. ``test_comfy_qwenimage.py`` checks it is the
  same model.
* ``build_qwenimage_clip``: ComfyUI's Qwen-Image text encoder (``comfy.text_encoders.qwen_image``: the real
  Qwen2.5 tokenizer and chat template ComfyUI ships, ``Qwen25_7BVLI``) at a tiny width through ComfyUI's own
  ``<name>_model_config`` option, random weights. Its vision tower is built with fixed Qwen2.5-VL sizes
  (1280 wide, 32 blocks: 630M parameters) that no option reaches; text-to-image never runs it, so it is built
  1 block, 16 wide here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from comfy_support import patcher_of, setup_comfy, tiny_comfy_clip

# ComfyUI's Qwen2.5-VL config fields (Qwen25_7BVLI_Config) at the tiny diffusers text encoder's width; its
# head_dim (128) and multimodal RoPE sections are class constants.
TINY_QWEN25 = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def load_qwenimage_transformer(transformer: torch.nn.Module) -> Any:
    """A float32 CPU ModelPatcher of ComfyUI's Qwen-Image with ``transformer``'s weights."""
    setup_comfy()
    import comfy.model_detection

    state = {
        key: value.detach().to(torch.float32, copy=True) for key, value in transformer.state_dict().items()
    }
    config = comfy.model_detection.detect_unet_config(state, "")
    ours = transformer.config
    config.update(
        patch_size=ours.patch_size,
        out_channels=ours.out_channels,
        attention_head_dim=ours.attention_head_dim,
        num_attention_heads=ours.num_attention_heads,
        joint_attention_dim=ours.joint_attention_dim,
        axes_dims_rope=tuple(ours.axes_dims_rope),
    )
    model_config = comfy.model_detection.model_config_from_unet_config(config, state)
    if model_config is None:
        raise RuntimeError(f"ComfyUI does not recognise this transformer ({config})")
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model(state)
    # Qwen-Image's latent format (Wan 2.1's) normalises 16 channels; the tiny VAE has out_channels, with mean 0
    # and std 1 (its latents_mean / latents_std). Empty latents take their channel count from here.
    latent_format = base.latent_format
    channels = ours.out_channels
    latent_format.latent_channels = channels
    latent_format.latents_mean = torch.zeros(1, channels, 1, 1, 1)
    latent_format.latents_std = torch.ones(1, channels, 1, 1, 1)
    return patcher_of(base, state)


@contextlib.contextmanager
def _tiny_vision_tower():
    """While ComfyUI builds its Qwen2.5-VL, its vision tower (unused by text-to-image) is 1 block, 16 wide."""
    import comfy.text_encoders.llama as llama

    full = llama.qwen_vl.Qwen2VLVisionTransformer

    def tiny(**kwargs):
        return full(**{**kwargs, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "num_layers": 1})

    llama.qwen_vl.Qwen2VLVisionTransformer = tiny
    try:
        yield
    finally:
        llama.qwen_vl.Qwen2VLVisionTransformer = full


def build_qwenimage_clip(seed: int = 0) -> Any:
    """ComfyUI's Qwen-Image CLIP (``comfy.text_encoders.qwen_image``) at tiny widths, random weights, with
    ComfyUI's real Qwen2.5 tokenizer and template."""
    setup_comfy()
    import comfy.text_encoders.qwen_image as qwen_image

    with _tiny_vision_tower():
        return tiny_comfy_clip(
            qwen_image.QwenImageTokenizer, qwen_image.te(), seed, qwen25_7b_model_config=dict(TINY_QWEN25)
        )
