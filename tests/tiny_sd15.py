"""A tiny Stable Diffusion 1.5 (and 2.x) built offline from configs, in diffusers and in ComfyUI.

diffusers: a ``StableDiffusionPipeline`` with SD 1.5's layout shrunk (one CLIP text encoder, no pooled
vector, cross-attention at the top level and in the middle, 8 attention heads, 32 GroupNorm groups), the tests'
character tokenizer, the tests' 4-channel VAE and SD 1.5's PNDM scheduler (``skip_prk_steps``: its PLMS
sampler evaluates the second timestep twice). ``build_tiny_sd2`` is the SD 2.x variant: linear projections in
the transformers, 64-wide heads, a v-prediction DDIM scheduler.

ComfyUI (imported inside the functions): the same UNet as ComfyUI's own ``supported_models.SD15`` /
``SD20`` model (``model_base.BaseModel``) with the diffusers weights moved by ComfyUI's own diffusers -> LDM key
table (``comfy.utils.unet_to_diffusers``), and a tiny SD1 CLIP (``sd1_clip.SD1ClipModel``, ``clip_l``) on
ComfyUI's real SD1 tokenizer, with the diffusers text encoder's width and depth (its weights are its own:
the tokenizers differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tiny_sdxl import text_config, tiny_vae, write_tokenizer
from transformers import CLIPTextModel

TEXT_WIDTH = 32  # the CLIP encoder's width: the UNet's cross-attention (context) width
TEXT_LAYERS = 4
# SD 1.5's UNet shrunk: two levels (cross-attention at the first), one res block each, 8 heads.
SD15_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8,  # diffusers' SD naming: the head count
    "cross_attention_dim": TEXT_WIDTH,
    "norm_num_groups": 32,  # ComfyUI's UNet always has 32 groups
    "use_linear_projection": False,
}
# SD 2.x: linear projections, heads of 16 (ComfyUI's SD20 sets num_head_channels 64; the tiny levels are
# narrower, see comfy_unet_config).
SD2_UNET = {**SD15_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True}


def sd_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler (its ``scheduler_config.json``)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd2_scheduler() -> DDIMScheduler:
    """SD 2.1's (768 px) scheduler: DDIM with v-prediction."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )


def build_tiny_sd15(folder: Path, seed: int = 0, sd2: bool = False) -> StableDiffusionPipeline:
    """Build, save to ``folder`` (a diffusers folder) and return a tiny StableDiffusionPipeline (SD 1.5's
    layout; ``sd2``: SD 2.x's)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SD2_UNET if sd2 else SD15_UNET))
    tokenizer = write_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(text_config(len(tokenizer)))
    assert text_encoder.config.hidden_size == TEXT_WIDTH
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd2_scheduler() if sd2 else sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return pipe.to(torch.float32)


def build_tiny_sd2(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    return build_tiny_sd15(folder, seed, sd2=True)


# ------------------------------------------------------------------------------------------ ComfyUI
def comfy_unet_config(unet: UNet2DConditionModel) -> dict:
    """ComfyUI's UNet config of the tiny diffusers UNet (what ComfyUI's model detection would give)."""
    config = unet.config
    channels = list(config.block_out_channels)
    blocks = config.layers_per_block
    attention = [kind.startswith("CrossAttn") for kind in config.down_block_types]
    heads = config.attention_head_dim
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    comfy = {
        "model_channels": channels[0],
        "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": [blocks] * len(channels),
        "transformer_depth": [int(a) for a in attention for _ in range(blocks)],
        "transformer_depth_output": [int(a) for a in attention for _ in range(blocks + 1)],
        "transformer_depth_middle": 1,
        "context_dim": config.cross_attention_dim,
        "use_linear_in_transformer": config.use_linear_projection,
        "adm_in_channels": None,
        "use_checkpoint": False,
        "image_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    if config.use_linear_projection:  # SD 2.x: one head width (ComfyUI's num_head_channels)
        widths = {c // h for c, h in zip(channels, heads, strict=True)}
        assert len(widths) == 1, "ComfyUI's SD 2.x UNet has one head width"
        comfy["num_head_channels"] = widths.pop()
    else:  # SD 1.x: one head count (ComfyUI's num_heads)
        assert len(set(heads)) == 1, "ComfyUI's SD 1.x UNet has one head count"
        comfy["num_heads"] = heads[0]
    return comfy


def load_comfy_unet(unet: UNet2DConditionModel) -> Any:
    """The diffusers UNet's weights in ComfyUI's own SD 1.5 (or SD 2.x) model, as a ModelPatcher, float32 CPU.

    ComfyUI's ``supported_models.SD15`` / ``SD20`` with the tiny config make a ``model_base.BaseModel``; its
    ``unet_extra_config`` sets SD's head layout (SD15: 8 heads; SD20: 64-wide heads), replaced by the tiny
    UNet's. The weights go through ``comfy.utils.unet_to_diffusers``, the table ComfyUI loads diffusers UNets
    with and names their LoRA keys by; every weight has to land."""
    from comfy_support import setup_comfy

    setup_comfy()
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    config = comfy_unet_config(unet)
    kind = comfy.supported_models.SD20 if unet.config.use_linear_projection else comfy.supported_models.SD15
    model_config = kind(dict(config))
    for key in ("num_heads", "num_head_channels"):
        model_config.unet_config[key] = config.get(key, -1)
    model_config.set_inference_dtype(torch.float32, None)
    if unet.config.use_linear_projection:
        model_config.unet_config.pop("attn_precision", None)
    if unet.config.use_linear_projection:  # SD 2.x (768 px) predicts v, as the tiny SD 2.x scheduler says
        model_config.model_type = lambda state_dict, prefix="": comfy.model_base.ModelType.V_PREDICTION
    base = model_config.get_model({})
    key_map = comfy.utils.unet_to_diffusers(config)
    weights = unet.state_dict()
    state = {key_map[k]: v.detach().float().clone() for k, v in weights.items() if k in key_map}
    missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected or len(state) != len(weights):
        unmapped = [k for k in weights if k not in key_map]
        raise RuntimeError(
            f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}, {unmapped[:3]}"
        )
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def build_comfy_sd1_clip(seed: int = 0) -> Any:
    """ComfyUI's SD1 CLIP (``sd1_clip.SD1ClipModel``: ``clip_l``, the last layer's normalised output) at the
    tiny encoder's width and depth, float32, on ComfyUI's real SD1 tokenizer; random weights."""
    from comfy_support import setup_comfy, tiny_comfy_clip

    setup_comfy()
    import comfy.sd1_clip

    clip_l = {
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": TEXT_LAYERS,
    }
    return tiny_comfy_clip(
        comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, seed, clip_l_model_config=clip_l
    )
