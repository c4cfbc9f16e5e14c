"""ComfyUI <-> canonical module names for the ComfyUI nodes (no ComfyUI import here).

ComfyUI's UNet uses LDM module paths (``input_blocks.4.1.transformer_blocks.0.norm1``); ACT maps use the
diffusers paths (``unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1``) so one file works in
diffusers and in ComfyUI. The table between the two comes from ComfyUI at runtime:
``comfy.utils.unet_to_diffusers(unet_config)`` maps diffusers *parameter* keys to LDM parameter keys;
``unet_module_table`` turns it into a module table. Text encoders need no table (see ``names``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .errors import ACTInputError
from .names import COMFY_CLIP_PARTS, COMFY_UNET_PREFIX, UNET, from_comfy

_PARAM_SUFFIXES = (".weight", ".bias")


def unet_module_table(diffusers_to_ldm_keys: Mapping[str, str]) -> dict[str, str]:
    """``{diffusers module path: LDM module path}`` from ``comfy.utils.unet_to_diffusers(unet_config)``.

    Parameter keys are stripped of ``.weight`` / ``.bias``; a module whose weight and bias disagree
    about their LDM module is an error (it would make names ambiguous).
    """
    table: dict[str, str] = {}
    for diffusers_key, ldm_key in diffusers_to_ldm_keys.items():
        for suffix in _PARAM_SUFFIXES:
            if diffusers_key.endswith(suffix) and ldm_key.endswith(suffix):
                diffusers_path, ldm_path = diffusers_key[: -len(suffix)], ldm_key[: -len(suffix)]
                previous = table.setdefault(diffusers_path, ldm_path)
                if previous != ldm_path:
                    raise ACTInputError(
                        f"UNet module {diffusers_path!r} maps to two ComfyUI modules ({previous!r}, {ldm_path!r})."
                    )
                break
    if not table:
        raise ACTInputError(
            "This model has no diffusers <-> ComfyUI UNet name table: ACT nodes support UNet models "
            "(SD 1.x, SD 2.x, SDXL), not DiT models such as SD3 or Flux."
        )
    return table


def invert_table(table: Mapping[str, str]) -> dict[str, str]:
    """``{LDM path: diffusers path}`` (the inverse of ``unet_module_table``).

    LDM modules with two diffusers names (SDXL's ``label_emb.0.*`` is both ``add_embedding.*`` and
    ``class_embedding.*``) are ambiguous and left out; no norm layer is.
    """
    inverse: dict[str, str] = {}
    ambiguous: set[str] = set()
    for diffusers_path, ldm_path in table.items():
        if inverse.setdefault(ldm_path, diffusers_path) != diffusers_path:
            ambiguous.add(ldm_path)
    return {ldm: d for ldm, d in inverse.items() if ldm not in ambiguous}


def comfy_unet_modules(diffusion_model: nn.Module, table: Mapping[str, str]) -> dict[str, nn.Module]:
    """Every UNet module that has a diffusers name, keyed by canonical name (``unet.<diffusers path>``).

    Table entries whose LDM module does not exist in this model are skipped.
    """
    named = dict(diffusion_model.named_modules())
    return {f"{UNET}.{d}": named[ldm] for d, ldm in table.items() if ldm in named}


def comfy_unet_key(name: str, table: Mapping[str, str]) -> str:
    """ComfyUI state-dict module prefix (``diffusion_model.<LDM path>``) of a canonical UNet name."""
    part, _, path = name.partition(".")
    if part != UNET:
        raise ACTInputError(f"{name!r} is not a UNet module name.")
    try:
        return COMFY_UNET_PREFIX + table[path]
    except KeyError:
        raise ACTInputError(f"UNet module {path!r} has no ComfyUI counterpart in this model.") from None


def comfy_clip_modules(cond_stage_model: nn.Module) -> dict[str, nn.Module]:
    """The text-model modules of ComfyUI's CLIP (``clip_l`` / ``clip_g``), keyed by canonical name.

    ``cond_stage_model`` is ``CLIP.cond_stage_model`` (``SDXLClipModel``, ``SD1ClipModel``, ...): its
    ``clip_l.transformer.text_model.*`` modules are ``text_encoder.text_model.*``, ``clip_g`` is
    ``text_encoder_2``. Other encoders (T5, ...) have no canonical name and are left out.
    """
    modules: dict[str, nn.Module] = {}
    for clip_name in COMFY_CLIP_PARTS.values():
        encoder = getattr(cond_stage_model, clip_name, None)
        transformer = getattr(encoder, "transformer", None)
        if not isinstance(transformer, nn.Module):
            continue
        for path, module in transformer.named_modules():
            if path.startswith("text_model."):
                modules[from_comfy(f"{clip_name}.transformer.{path}")] = module
    return modules


def comfy_clip_key(name: str) -> str:
    """ComfyUI CLIP state-dict module prefix (``clip_l.transformer.text_model...``) of a canonical name."""
    part, _, path = name.partition(".")
    if part not in COMFY_CLIP_PARTS:
        raise ACTInputError(f"{name!r} is not a text encoder module name.")
    return f"{COMFY_CLIP_PARTS[part]}.transformer.{path}"
