"""Canonical module names, so one map file works in diffusers and in ComfyUI.

A canonical name is ``<part>.<path>`` where part is ``unet``, ``text_encoder`` or ``text_encoder_2`` and
path is the diffusers / Hugging Face module path, with the text encoders always written with their
``text_model.`` prefix (transformers 5 dropped that submodule from ``CLIPTextModel`` but not from
``CLIPTextModelWithProjection``; maps must not depend on the transformers version):

    unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1
    text_encoder.text_model.encoder.layers.0.layer_norm1
    text_encoder_2.text_model.encoder.layers.0.layer_norm1

ComfyUI names the same modules ``diffusion_model.<LDM path>``, ``clip_l.transformer.text_model...`` and
``clip_g.transformer.text_model...``; the UNet's diffusers <-> LDM path table is passed in by the
caller (ComfyUI derives it from the model config), the text encoder rule is fixed and lives here.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .errors import ACTInputError

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
TEXT_MODEL_PREFIX = "text_model."
# ComfyUI's SDXL CLIP: clip_l is diffusers' text_encoder, clip_g is text_encoder_2.
COMFY_CLIP_PARTS = {TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "clip_g"}
COMFY_UNET_PREFIX = "diffusion_model."
# Key prefixes that ComfyUI's stock LoraLoader maps onto model weights (see docs/lora_export.md).
LORA_PREFIXES = {
    UNET: "diffusion_model.",
    TEXT_ENCODER: "text_encoders.clip_l.transformer.",
    TEXT_ENCODER_2: "text_encoders.clip_g.transformer.",
}


def split_part(name: str) -> tuple[str, str]:
    """``"unet.down_blocks.0..." -> ("unet", "down_blocks.0...")``, validating the part."""
    part, _, path = name.partition(".")
    if part not in PARTS or not path:
        raise ACTInputError(
            f"{name!r} is not a canonical ACT module name; it must start with one of {PARTS}."
        )
    return part, path


def has_text_model(component: nn.Module) -> bool:
    """True for text encoders whose modules live under a ``text_model`` submodule."""
    return isinstance(getattr(component, "text_model", None), nn.Module)


def canonical_name(part: str, path: str, component: nn.Module | None = None) -> str:
    """Canonical name of module ``path`` of a diffusers component (``component`` tells the layout)."""
    if part == UNET:
        return f"{part}.{path}"
    if part not in PARTS:
        raise ACTInputError(f"Unknown model part {part!r}; expected one of {PARTS}.")
    if path.startswith(TEXT_MODEL_PREFIX) or (component is not None and has_text_model(component)):
        return f"{part}.{path}"
    return f"{part}.{TEXT_MODEL_PREFIX}{path}"


def component_path(name: str, component: nn.Module) -> str:
    """The module path inside ``component`` for a canonical name (inverse of ``canonical_name``)."""
    part, path = split_part(name)
    if part != UNET and not has_text_model(component) and path.startswith(TEXT_MODEL_PREFIX):
        return path[len(TEXT_MODEL_PREFIX) :]
    return path


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module]:
    """Every named submodule of a diffusers component, keyed by canonical name."""
    return {
        canonical_name(part, path, component): module for path, module in component.named_modules() if path
    }


def to_comfy(name: str, unet_diffusers_to_ldm: Mapping[str, str] | None = None) -> str:
    """Canonical name -> ComfyUI module path (``diffusion_model.input_blocks...`` / ``clip_l.transformer...``)."""
    part, path = split_part(name)
    if part == UNET:
        if unet_diffusers_to_ldm is None:
            raise ACTInputError(
                "Translating UNet names to ComfyUI needs the diffusers->LDM table of the model."
            )
        try:
            return COMFY_UNET_PREFIX + unet_diffusers_to_ldm[path]
        except KeyError:
            raise ACTInputError(f"UNet module {path!r} has no ComfyUI counterpart in this model.") from None
    return f"{COMFY_CLIP_PARTS[part]}.transformer.{path}"


def from_comfy(comfy_name: str, unet_ldm_to_diffusers: Mapping[str, str] | None = None) -> str:
    """ComfyUI module path -> canonical name (inverse of ``to_comfy``)."""
    if comfy_name.startswith(COMFY_UNET_PREFIX):
        if unet_ldm_to_diffusers is None:
            raise ACTInputError("Translating ComfyUI UNet names needs the LDM->diffusers table of the model.")
        path = comfy_name[len(COMFY_UNET_PREFIX) :]
        try:
            return f"{UNET}.{unet_ldm_to_diffusers[path]}"
        except KeyError:
            raise ACTInputError(f"ComfyUI UNet module {path!r} has no diffusers counterpart.") from None
    for part, clip in COMFY_CLIP_PARTS.items():
        prefix = f"{clip}.transformer."
        if comfy_name.startswith(prefix):
            return canonical_name(part, comfy_name[len(prefix) :])
    raise ACTInputError(
        f"{comfy_name!r} is not a ComfyUI SDXL module name (diffusion_model.*, clip_l.*, clip_g.*)."
    )


def lora_key(module_name: str) -> str:
    """LoRA-file key stem for a canonical module name; the exporter appends ``.diff`` / ``.diff_b``.

    ComfyUI's stock LoraLoader reads UNet keys in diffusers form (``unet.<path>``, i.e. the canonical
    name) and text encoder norms only as ``text_encoders.clip_l.transformer.<path>`` (clip_g for
    encoder 2): the diffusers/kohya text encoder names cover attention and MLP linears only.
    """
    part, path = split_part(module_name)
    return module_name if part == UNET else LORA_PREFIXES[part] + path
