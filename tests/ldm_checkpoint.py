"""Write a diffusers SDXL pipeline as one original-layout (LDM/SGM) ``.safetensors`` checkpoint.

Why this exists: ``act_core.diffusers.loading`` loads single-file SDXL checkpoints (the format most users have),
and testing that needs such a file; real ones are gigabytes and tests may download nothing. So the tests
build the tiny pipeline of ``tiny_sdxl`` and write its weights in the layout of the original SDXL
release, the inverse of what diffusers' single-file loader converts back:

- UNet under ``model.diffusion_model.`` (input_blocks / middle_block / output_blocks, time_embed, ...);
- ``text_encoder`` (CLIP-L, Hugging Face layout) under ``conditioner.embedders.0.transformer.``;
- ``text_encoder_2`` in OpenCLIP layout under ``conditioner.embedders.1.model.``;
- VAE under ``first_stage_model.`` (encoder.down.i.block.j, mid.attn_1, decoder.up in reversed order).

The UNet table is written here: ``act_core.families.sdxl.unet_module_table`` gets its table from ComfyUI at runtime.
"""

from __future__ import annotations

import os

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

UNET, CLIP_L, CLIP_G, VAE = (
    "model.diffusion_model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
    "first_stage_model.",
)
_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def unet_key(key: str, layers: int, up_blocks_with_attention: set[int]) -> str:
    """LDM name of a diffusers UNet parameter; ``layers`` is the config's ``layers_per_block``."""
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        head = f"middle_block.{2 * index if kind == 'resnets' else 1}"
    else:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        first = block * (layers + 1) + (1 if parts[0] == "down_blocks" else 0)  # input_blocks.0 is conv_in
        name = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
        if kind == "downsamplers":  # the last input block of a level: ``op`` is the strided conv
            head, rest = f"{name}.{first + layers}.0.op", rest[1:]
        elif kind == "upsamplers":  # after the resnet (and the attention, if the level has one)
            head = f"{name}.{first + layers}.{2 if block in up_blocks_with_attention else 1}"
        else:
            head = f"{name}.{first + index}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        rest = [_UNET_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([head, *rest])


def vae_key(key: str, levels: int) -> str:
    """LDM name of a diffusers VAE parameter; ``levels`` is the number of up (= down) blocks."""
    parts = key.split(".")
    if parts[1] == "conv_norm_out":
        parts[1] = "norm_out"
    elif parts[1] == "down_blocks":  # encoder.down_blocks.i.{resnets.j,downsamplers.0}
        parts[1:5] = (
            ["down", parts[2], "block", parts[4]]
            if parts[3] == "resnets"
            else ["down", parts[2], "downsample"]
        )
    elif parts[1] == "up_blocks":  # the decoder numbers its levels from the lowest resolution up
        level = str(levels - 1 - int(parts[2]))
        parts[1:5] = ["up", level, "block", parts[4]] if parts[3] == "resnets" else ["up", level, "upsample"]
    elif parts[1] == "mid_block":  # mid_block.{resnets.j -> block_{j+1}, attentions.0 -> attn_1}
        parts[1:4] = ["mid", f"block_{int(parts[3]) + 1}" if parts[2] == "resnets" else "attn_1"]
        if parts[2] == "attn_1":
            parts[3:] = [_VAE_ATTENTION[parts[3]], parts[-1]]  # to_out.0.weight -> proj_out.weight
    return ".".join(parts).replace("conv_shortcut", "nin_shortcut")


def open_clip_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """OpenCLIP names of a ``CLIPTextModelWithProjection`` (fused q/k/v, transposed projection)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    for layer in range(text_encoder.config.num_hidden_layers):
        old, new = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{old}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{new}attn.in_proj_{kind}"] = torch.cat(qkv)
            for ours, theirs in [
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ]:
                out[f"{new}{theirs}.{kind}"] = state.pop(f"{old}{ours}.{kind}")
    unused = [key for key in state if not key.endswith("position_ids")]
    assert not unused, f"text_encoder_2 weights without an OpenCLIP name: {unused}"
    return out


def unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under their original-layout names (``model.diffusion_model.<LDM path>``)."""
    state = unet.state_dict()
    with_attention = {
        int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k
    }
    layers = unet.config.layers_per_block
    pairs = {UNET + unet_key(k, layers, with_attention): v for k, v in state.items()}
    assert len(pairs) == len(state), "two UNet weights got the same LDM name"
    return pairs


def write_ldm_checkpoint(pipe: StableDiffusionXLPipeline, path: str | os.PathLike) -> None:
    """Save ``pipe``'s UNet, VAE and both text encoders as one original-layout SDXL safetensors file."""
    levels = len(pipe.vae.config.up_block_types)
    pairs = list(unet_state(pipe.unet).items())
    for key, value in pipe.vae.state_dict().items():
        if ".mid_block.attentions." in key and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        pairs.append((VAE + vae_key(key, levels), value))
    for key, value in pipe.text_encoder.state_dict().items():  # flat in transformers >= 5.6
        pairs.append((CLIP_L + "text_model." + key.removeprefix("text_model."), value))
    pairs += [(CLIP_G + k, v) for k, v in open_clip_state(pipe.text_encoder_2).items()]
    tensors = {key: value.detach().contiguous() for key, value in pairs}
    assert len(tensors) == len(pairs), "two weights got the same LDM name"
    save_file(tensors, str(path))
