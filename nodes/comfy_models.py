"""Reach the modules and weights of ComfyUI's MODEL and CLIP under canonical ACT names.

ComfyUI is imported lazily inside the functions: this module must import without ComfyUI.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from act_core.errors import ACTModelMismatchError
from act_core.families import FLUX, SDXL, ModelFamily, flux, sdxl
from act_core.families.flux import comfy_transformer_modules
from act_core.families.sdxl import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    comfy_clip_key,
    comfy_unet_key,
    comfy_unet_modules,
    unet_module_table,
)
from act_core.maps import ACTMap, part_of


def denoiser_family(model: Any) -> ModelFamily:
    """The family of a ComfyUI MODEL's denoiser: FLUX (``double_blocks`` / ``single_blocks``) or SDXL."""
    return FLUX if hasattr(model.model.diffusion_model, "double_blocks") else SDXL


def denoiser_modules(model: Any, family: ModelFamily) -> tuple[dict[str, nn.Module], Any]:
    """(canonical name -> module of the MODEL's denoiser, the UNet's name table or None)."""
    diffusion_model = model.model.diffusion_model
    if family not in (SDXL, FLUX):
        raise ACTModelMismatchError(
            f"This ACT map was fitted on a {family.name.upper()} model, which ComfyUI-ACT applies through diffusers "
            "only for now (pipe.enable_act); in ComfyUI use SDXL or FLUX maps."
        )
    if family is FLUX:
        if denoiser_family(model) is not FLUX:
            raise ACTModelMismatchError(
                "This ACT map was fitted on a FLUX model (its transformer), but this MODEL is not a FLUX model; "
                "use a map fitted on this model."
            )
        return comfy_transformer_modules(diffusion_model), None
    if denoiser_family(model) is FLUX:
        raise ACTModelMismatchError(
            "This MODEL is a FLUX model but the ACT map was fitted on an SDXL model; fit a map on this model."
        )
    table = unet_table(model)
    return unet_modules(model, table), table


def unet_table(model: Any) -> dict[str, str]:
    """``{diffusers path: LDM path}`` of a ComfyUI MODEL (a ModelPatcher), from its UNet config."""
    import comfy.utils

    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return unet_module_table(comfy.utils.unet_to_diffusers(config))


def unet_modules(model: Any, table: Mapping[str, str] | None = None) -> dict[str, nn.Module]:
    """Canonical name -> module of the UNet of a MODEL (``model.model.diffusion_model``)."""
    return comfy_unet_modules(model.model.diffusion_model, table if table is not None else unet_table(model))


# Each family's map of ComfyUI's CLIP (``CLIP.cond_stage_model``) onto its canonical text-encoder names.
CLIP_MODULES: dict[str, Callable[[nn.Module], dict[str, nn.Module]]] = {
    SDXL.name: sdxl.comfy_clip_modules,
    FLUX.name: flux.comfy_clip_modules,
}


def comfy_clip_modules(cond_stage_model: nn.Module, family: ModelFamily = SDXL) -> dict[str, nn.Module]:
    """Canonical name -> module of ComfyUI text encoders (``CLIP.cond_stage_model``) as ``family`` names them."""
    return CLIP_MODULES[family.name](cond_stage_model)


def clip_modules(clip: Any, family: ModelFamily = SDXL) -> dict[str, nn.Module]:
    """Canonical name -> module of the text encoders of a CLIP (``clip.cond_stage_model``)."""
    return comfy_clip_modules(clip.cond_stage_model, family)


def has_text_encoder_2(clip: Any) -> bool:
    return getattr(clip.cond_stage_model, "clip_g", None) is not None


def state_key(name: str, table: Mapping[str, str] | None) -> str:
    """ComfyUI state-dict module prefix of a canonical module name (UNet needs the model's table)."""
    return comfy_unet_key(name, table or {}) if part_of(name) == UNET else comfy_clip_key(name)


def modules_for(
    act_map: ACTMap, model: Any, clip: Any, table: Mapping[str, str] | None
) -> dict[str, nn.Module]:
    """The modules of ``model`` / ``clip`` the map's parts live in (all candidates, the map picks)."""
    modules: dict[str, nn.Module] = {}
    parts = act_map.parts()
    if UNET in parts:
        modules.update(unet_modules(model, table))
    if TEXT_ENCODER in parts or TEXT_ENCODER_2 in parts:
        modules.update(clip_modules(clip))
    return modules


def check_fits(act_map: ACTMap, modules: Mapping[str, nn.Module], what: str) -> None:
    """Raise ``ACTModelMismatchError`` (naming ``what``) when a module of the map is missing or too narrow."""
    from act_core.recording import widths_of

    act_map.check_compatible(widths_of(modules), what=what)


def weights_of(patcher: Any, keys: Iterable[str], with_patches: bool = True) -> dict[str, torch.Tensor]:
    """float32 CPU copies of state-dict entries of a ModelPatcher, *without* whatever another loaded clone
    patched into the shared module (ComfyUI keeps the originals in the shared ``backup``), plus this
    patcher's own weight patches when ``with_patches`` (e.g. a LoRA on the same layer, or an earlier fold).
    """
    import comfy.lora

    keys = list(keys)
    key_patches = patcher.get_key_patches()
    out = {}
    for key in keys:
        entry = key_patches.get(key)
        if entry is None:
            raise ACTModelMismatchError(
                f"The model has no weight {key!r}; the ACT map was fitted on another model."
            )
        weight, convert = entry[0]
        value = weight.detach().to("cpu", torch.float32, copy=True)
        if convert is not None:
            value = convert(value, inplace=False)
        if with_patches and patcher.patches.get(key):
            value = comfy.lora.calculate_weight(
                patcher.patches[key], value, key, intermediate_dtype=torch.float32
            )
        out[key] = value.float()
    return out


def weight_shells(
    modules: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor], key_of: Mapping[str, str]
) -> dict[str, nn.Module]:
    """Shallow copies of ``modules`` whose weight/bias are the given tensors (``key_of[name] + ".weight"``).

    act_core's folding reads ``module.weight``; the live module may hold another clone's patched weights
    while that clone is loaded, so folds and LoRA exports read these shells instead.
    """
    shells = {}
    for name, module in modules.items():
        shell = copy.copy(module)
        params = {}
        for param in ("weight", "bias"):
            if module._parameters.get(param) is not None:
                params[param] = weights[f"{key_of[name]}.{param}"]
        object.__setattr__(shell, "_parameters", params)
        shells[name] = shell
    return shells


def checkpoint_shells(
    patcher: Any,
    names: Iterable[str],
    modules: Mapping[str, nn.Module],
    key_of: Mapping[str, str],
    with_patches: bool,
) -> dict[str, nn.Module]:
    """Shells of ``modules[name]`` holding the weights ``patcher`` would load (see ``weights_of``)."""
    names = list(names)
    wanted = [
        f"{key_of[name]}.{param}"
        for name in names
        for param in ("weight", "bias")
        if modules[name]._parameters.get(param) is not None
    ]
    weights = weights_of(patcher, wanted, with_patches=with_patches)
    return weight_shells({name: modules[name] for name in names}, weights, key_of)
