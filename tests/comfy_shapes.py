"""The shipped shapes model (a diffusers folder) as ComfyUI's own MODEL and CLIP, for parity tests.

ComfyUI's checkpoint loaders expect real SDXL sizes; the shipped model is SDXL's architecture shrunk,
so it is built here from ComfyUI's classes (``supported_models.SDXL`` with a matching UNet config,
``SDXLClipModel`` with tiny CLIP configs, ``SDTokenizer`` on the model's own vocabulary), the few
hard-coded sizes ComfyUI assumes for SDXL are set to the model's (GroupNorm groups, size-embedding width,
vocabulary, pooled projection), and the diffusers weights are loaded through ComfyUI's own
diffusers -> LDM key table. The check that this is the same model: ``test_comfy_parity.py`` compares a
UNet forward and the text conditioning against diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from comfy_support import setup_comfy
from safetensors.torch import load_file


def _unet_config(diffusers: dict) -> dict:
    channels = diffusers["block_out_channels"]
    depth = diffusers["transformer_layers_per_block"]
    has_attention = [kind.startswith("CrossAttn") for kind in diffusers["down_block_types"]]
    per_level = [d if attn else 0 for d, attn in zip(depth, has_attention, strict=True)]
    blocks = diffusers["layers_per_block"]
    heads = diffusers["attention_head_dim"]  # diffusers' SD naming: these are head counts
    head_dims = {c // h for c, h in zip(channels, heads, strict=True)}
    if len(head_dims) != 1:
        raise ValueError("ComfyUI's UNet needs one head width for every level")
    return {
        "model_channels": channels[0],
        "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": [blocks] * len(channels),
        "transformer_depth": [d for d in per_level for _ in range(blocks)],
        "transformer_depth_output": [d for d in per_level for _ in range(blocks + 1)],
        "transformer_depth_middle": depth[-1],
        "num_head_channels": head_dims.pop(),
        "context_dim": diffusers["cross_attention_dim"],
        "adm_in_channels": diffusers["projection_class_embeddings_input_dim"],
        "use_linear_in_transformer": diffusers["use_linear_projection"],
        "use_checkpoint": False,
        "image_size": diffusers["sample_size"],
        "in_channels": diffusers["in_channels"],
        "out_channels": diffusers["out_channels"],
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def load_unet(folder: Path):
    """The UNet as a ComfyUI ModelPatcher with the folder's weights, float32 on CPU."""
    setup_comfy()
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from act_core.families.sdxl import comfy_unet_modules, component_modules, unet_module_table

    config = json.loads((folder / "unet" / "config.json").read_text())
    unet_config = _unet_config(config)
    model_config = comfy.supported_models.SDXL(unet_config)
    # supported_models' unet_extra_config sets 64-wide heads for every SDXL; this model's heads are narrower
    model_config.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    base.embedder = comfy.model_base.Timestep(config["addition_time_embed_dim"])
    # ComfyUI derives SDXL's size conditioning from the latent assuming an 8x VAE; this model's VAE is 4x and
    # it was trained at one size: condition on that size, as the diffusers pipeline does.
    pixels = config["sample_size"] * (
        2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    )
    encode_adm = base.encode_adm

    def trained_size_adm(**kwargs):
        kwargs.update(
            width=pixels, height=pixels, target_width=pixels, target_height=pixels, crop_w=0, crop_h=0
        )
        return encode_adm(**kwargs)

    base.encode_adm = trained_size_adm
    scaling = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    base.latent_format.scale_factor = scaling
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    weights = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    state = {key_map[k]: v.float() for k, v in weights.items() if k in key_map}
    missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected or len(state) != len(weights):
        raise RuntimeError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # ComfyUI's SDXL UNet hard-codes 32 GroupNorm groups; take every norm's groups and eps from diffusers.
    reference = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    table = unet_module_table(key_map)
    ours = comfy_unet_modules(base.diffusion_model, table)
    for name, module in component_modules("unet", reference).items():
        twin = ours.get(name)
        if isinstance(module, torch.nn.GroupNorm):
            twin.num_groups, twin.eps = module.num_groups, module.eps
        elif isinstance(module, torch.nn.LayerNorm):
            twin.eps = module.eps
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def load_clip(folder: Path):
    """Both text encoders as ComfyUI's SDXL CLIP, on the model's own tokenizer, float32."""
    setup_comfy()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    configs = {
        name: json.loads((folder / sub / "config.json").read_text())
        for name, sub in (("l", "text_encoder"), ("g", "text_encoder_2"))
    }
    tokenizer_path = str(folder / "tokenizer")

    class ShapesTokenizer(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 - ComfyUI's signature
            common = {
                "tokenizer_path": tokenizer_path,
                "pad_with_end": True,
                "embedding_directory": embedding_directory,
            }
            length = configs["l"]["max_position_embeddings"]
            self.clip_l = comfy.sd1_clip.SDTokenizer(
                max_length=length,
                embedding_size=configs["l"]["hidden_size"],
                embedding_key="clip_l",
                **common,
            )
            self.clip_g = comfy.sd1_clip.SDTokenizer(
                max_length=length,
                embedding_size=configs["g"]["hidden_size"],
                embedding_key="clip_g",
                **common,
            )

    def comfy_config(hf: dict) -> dict:
        keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "hidden_act")
        return {
            **{k: hf[k] for k in keys},
            "max_position_embeddings": hf["max_position_embeddings"],
            "eos_token_id": hf["eos_token_id"],
            "bos_token_id": hf["bos_token_id"],
            "vocab_size": hf["vocab_size"],
            "layer_norm_eps": hf["layer_norm_eps"],
        }

    target = comfy.supported_models_base.ClipTarget(ShapesTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(
        target,
        model_options={
            "dtype": torch.float32,
            "clip_l_model_config": comfy_config(configs["l"]),
            "clip_g_model_config": comfy_config(configs["g"]),
        },
    )
    special = {
        "start": configs["l"]["bos_token_id"],
        "end": configs["l"]["eos_token_id"],
        "pad": configs["l"]["pad_token_id"],
    }
    for name, sub in (("l", "text_encoder"), ("g", "text_encoder_2")):
        encoder = getattr(clip.cond_stage_model, f"clip_{name}")
        encoder.special_tokens = dict(special)
        text_model = encoder.transformer.text_model
        hf = configs[name]
        # ComfyUI's ops modules, resized in place (ComfyUI assumes CLIP's vocabulary and a square projection)
        embedding = text_model.embeddings.token_embedding
        embedding.weight = torch.nn.Parameter(torch.empty(hf["vocab_size"], hf["hidden_size"]))
        embedding.num_embeddings = hf["vocab_size"]
        if name == "g":
            projection = encoder.transformer.text_projection
            projection.weight = torch.nn.Parameter(torch.empty(hf["projection_dim"], hf["hidden_size"]))
            projection.out_features = hf["projection_dim"]
        weights = load_file(str(folder / sub / "model.safetensors"))
        state = {
            (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.float()
            for k, v in weights.items()
        }
        missing, unexpected = encoder.transformer.load_state_dict(state, strict=False)
        missing = [k for k in missing if name == "l" and not k.startswith("text_projection") or name == "g"]
        if missing or unexpected:
            raise RuntimeError(
                f"clip_{name} weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for module in text_model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = hf["layer_norm_eps"]
    clip.cond_stage_model.eval()
    return clip
