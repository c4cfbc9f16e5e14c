"""The shipped shapes models (diffusers folders in ``models/``) as ComfyUI's own MODEL, CLIP and VAE.

ComfyUI's checkpoint loaders expect real SDXL sizes ("Could not detect model type" for these); the shapes
models are SDXL's architecture shrunk, so they are built here from ComfyUI's classes (``supported_models.SDXL``
with a matching UNet config, ``SDXLClipModel`` with tiny CLIP configs, ``SDTokenizer`` on the model's own
vocabulary, the VAE's ``AutoencoderKL``), the few sizes ComfyUI hard-codes for SDXL are set to the model's
(GroupNorm groups, size-embedding width, vocabulary, pooled projection, the VAE's 4x scale), and the diffusers
weights go through ComfyUI's own diffusers -> LDM key tables. Nothing is downloaded.

Used by the "ACT demo model" node (``demo_models.py``) and by the tests (``tests/comfy_shapes.py``), which
check it is the same model as in diffusers (``tests/comfyui/test_comfy_parity.py``). ComfyUI is imported
inside the functions: this module imports without it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from act_core.errors import ACTInputError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
# The shipped SDXL-architecture shapes models ComfyUI's SDXL classes take as they are, and the settings each
# is evaluated with (docs/demo_model.md): (steps, cfg, ComfyUI sampler, ComfyUI scheduler; "simple" is
# diffusers' "trailing" spacing). Models b and c do not fit: b's attention heads differ in width between
# levels, c has 48-channel levels that ComfyUI's UNet cannot build with its 32 GroupNorm groups.
SHAPES_SDXL = {
    "shapes-sdxl": (20, 3.0, "euler", "simple"),
    "shapes-sdxl-d": (30, 6.0, "euler_ancestral", "simple"),
}
IMAGE_SIZE = 32  # pixels: every shapes model draws 32 x 32 images


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def model_folder(name: str) -> Path:
    """``models/<name>``, refused with a clear message when it is not a shipped shapes model or is missing."""
    if name not in SHAPES_SDXL:
        raise ACTInputError(f"Unknown demo model {name!r}; the demo models are {', '.join(SHAPES_SDXL)}.")
    folder = MODELS_DIR / name
    if not (folder / "model_index.json").is_file():
        raise ACTInputError(
            f"The demo model folder {folder} is missing; it ships with the ComfyUI-ACT repository "
            "(git clone it into ComfyUI/custom_nodes/)."
        )
    return folder


def vae_scale(folder: Path) -> int:
    """How many pixels one latent cell covers (4 for the shapes models, 8 for SD/SDXL)."""
    return 2 ** (len(_json(folder / "vae" / "config.json")["block_out_channels"]) - 1)


def unet_config(diffusers: dict) -> dict:
    """ComfyUI's UNet config (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``) of a diffusers
    SDXL-layout ``UNet2DConditionModel`` config."""
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


def load_unet(folder: Path) -> Any:
    """The UNet as a ComfyUI ModelPatcher (``model_base.SDXL``, EPS) with the folder's weights, float32."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    folder = Path(folder)
    config = _json(folder / "unet" / "config.json")
    config_for_comfy = unet_config(config)
    model_config = comfy.supported_models.SDXL(config_for_comfy)
    # supported_models' unet_extra_config sets 64-wide heads for every SDXL; this model's heads are narrower
    model_config.unet_config["num_head_channels"] = config_for_comfy["num_head_channels"]
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    base.embedder = comfy.model_base.Timestep(config["addition_time_embed_dim"])
    # ComfyUI derives SDXL's size conditioning from the latent assuming an 8x VAE; this model's VAE is 4x and
    # it was trained at one size: condition on that size, as the diffusers pipeline does.
    pixels = config["sample_size"] * vae_scale(folder)
    encode_adm = base.encode_adm

    def trained_size_adm(**kwargs):
        kwargs.update(
            width=pixels, height=pixels, target_width=pixels, target_height=pixels, crop_w=0, crop_h=0
        )
        return encode_adm(**kwargs)

    base.encode_adm = trained_size_adm
    base.latent_format.scale_factor = _json(folder / "vae" / "config.json")["scaling_factor"]
    key_map = comfy.utils.unet_to_diffusers(config_for_comfy)
    weights = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    state = {key_map[k]: v.float() for k, v in weights.items() if k in key_map}
    missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected or len(state) != len(weights):
        raise RuntimeError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # ComfyUI's SDXL UNet hard-codes 32 GroupNorm groups; diffusers' UNet uses norm_num_groups for every one
    # (their eps are the same in both: norm_eps in the ResNets and the output, 1e-6 in the transformers).
    for module in base.diffusion_model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.num_groups = config["norm_num_groups"]
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def load_clip(folder: Path) -> Any:
    """Both text encoders as ComfyUI's SDXL CLIP (``comfy.sd.CLIP``), on the model's own tokenizer, float32."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    folder = Path(folder)
    configs = {
        name: _json(folder / sub / "config.json")
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


@contextlib.contextmanager
def _group_norms_with(groups: int):
    """While the block runs, ComfyUI's VAE builds its GroupNorms with ``groups`` groups instead of 32 (the
    shapes VAE has 16-channel levels, which 32 groups do not divide, so they cannot be resized afterwards)."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    original = ops.GroupNorm

    def group_norm(num_groups, num_channels, *args, **kwargs):
        return original(groups, num_channels, *args, **kwargs)

    ops.GroupNorm = group_norm
    try:
        yield
    finally:
        ops.GroupNorm = original


def vae_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The diffusers VAE weights under ComfyUI's LDM names (``comfy.diffusers_convert``), float32.

    ComfyUI's table numbers the decoder's up blocks for SD's 4 levels; a VAE with fewer levels has its
    indices shifted down. A VAE without mid-block attention gets an attention block that adds exactly zero
    (zero output projection): ComfyUI's Encoder/Decoder always have one."""
    import comfy.diffusers_convert

    folder = Path(folder)
    config = _json(folder / "vae" / "config.json")
    weights = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    state = comfy.diffusers_convert.convert_vae_state_dict({k: v.float() for k, v in weights.items()})
    shift = 4 - len(config["block_out_channels"])
    renamed = {}
    for key, value in state.items():
        if key.startswith("decoder.up."):
            index, rest = key[len("decoder.up.") :].split(".", 1)
            key = f"decoder.up.{int(index) - shift}.{rest}"
        renamed[key] = value
    if not config.get("mid_block_add_attention", True):
        width = config["block_out_channels"][-1]
        for coder in ("encoder", "decoder"):
            prefix = f"{coder}.mid.attn_1."
            renamed[prefix + "norm.weight"] = torch.ones(width)
            renamed[prefix + "norm.bias"] = torch.zeros(width)
            for conv in ("q", "k", "v", "proj_out"):
                renamed[f"{prefix}{conv}.weight"] = torch.zeros(width, width, 1, 1)
                renamed[f"{prefix}{conv}.bias"] = torch.zeros(width)
    return renamed


def load_vae(folder: Path) -> Any:
    """The VAE as ComfyUI's ``comfy.sd.VAE`` (its ``AutoencoderKL``), float32, with the model's scale."""
    import comfy.sd

    folder = Path(folder)
    config = _json(folder / "vae" / "config.json")
    channels = config["block_out_channels"]
    ddconfig = {
        "double_z": True,
        "z_channels": config["latent_channels"],
        "resolution": config["sample_size"],
        "in_channels": config["in_channels"],
        "out_ch": config["out_channels"],
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": config["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    state = vae_state_dict(folder)
    with _group_norms_with(config["norm_num_groups"]):
        vae = comfy.sd.VAE(
            sd=state,
            config={"params": {"ddconfig": ddconfig, "embed_dim": config["latent_channels"]}},
            dtype=torch.float32,
        )
    missing, unexpected = vae.first_stage_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"VAE weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    vae.downscale_ratio = vae.upscale_ratio = vae_scale(folder)
    return vae


def load_shapes_sdxl(name: str = "shapes-sdxl") -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of a shipped SDXL-architecture shapes model, by folder name under ``models/``."""
    folder = model_folder(name)
    return load_unet(folder), load_clip(folder), load_vae(folder)
