"""Reach the modules and weights of ComfyUI's MODEL and CLIP under canonical ACT names.

ComfyUI is imported lazily inside the functions: this module must import without ComfyUI.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from act_core.errors import ACTInputError, ACTModelMismatchError
from act_core.families import LEGACY_FAMILY, ModelFamily, family_of_comfy_model
from act_core.maps import ACTMap

KeyTable = Callable[[], Mapping[str, str]]


def model_family(model: Any) -> ModelFamily:
    """The family of a ComfyUI MODEL (``act_core.families`` decides from its diffusion model's class); a fit
    on a CLIP alone is the legacy family's."""
    return LEGACY_FAMILY if model is None else family_of_comfy_model(model.model.diffusion_model)


def timestep_scale(family: ModelFamily, model_sampling: Any) -> float:
    """What ``model_sampling.timestep(sigma)`` is divided by to give the noise level u in [0, 1]: the family's
    ``comfy_timestep_scale``, or (None: a family of several architectures) the timestep of the model's
    largest sigma, so pure noise is 1 whatever the model's timestep units."""
    if family.comfy_timestep_scale is not None:
        return family.comfy_timestep_scale
    return float(model_sampling.timestep(torch.as_tensor(model_sampling.sigma_max)))


def key_table(model: Any) -> KeyTable:
    """ComfyUI's diffusers key table of a MODEL (``comfy.utils.unet_to_diffusers``), computed on first use:
    only families whose names need it (the UNet's) ask for it."""

    @functools.cache
    def table() -> Mapping[str, str]:
        import comfy.utils

        config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
        return comfy.utils.unet_to_diffusers(config)

    return table


def denoiser_modules(model: Any, family: ModelFamily) -> dict[str, nn.Module]:
    """Canonical name -> module of the MODEL's denoiser, for a map of ``family`` (refused, naming both
    families, when the MODEL is of another one)."""
    family.check_host("comfyui")
    own = model_family(model)
    if own is not family:
        raise ACTModelMismatchError(
            f"This ACT map was fitted on a {family.display_name} model (its {family.denoiser}), but this MODEL is "
            f"{own.display_name} (its {own.denoiser}); use a map fitted on this model."
        )
    return dict(family.comfy_denoiser_modules(model.model.diffusion_model, key_table(model)))


def clip_modules(clip: Any, family: ModelFamily) -> dict[str, nn.Module]:
    """Canonical name -> module of the text encoders of a CLIP (``clip.cond_stage_model``), as ``family``
    names them."""
    family.check_host("comfyui")
    return dict(family.comfy_clip_modules(clip.cond_stage_model))


def state_keys(names: Iterable[str], family: ModelFamily, model: Any | None) -> dict[str, str]:
    """ComfyUI state-dict module prefix of each canonical module name (foldable families only)."""
    if family.comfy_state_keys is None:
        raise ACTInputError(f"{family.display_name} maps do not fold into weights; apply them with hooks.")
    return family.comfy_state_keys(names, key_table(model) if model is not None else dict)


def modules_for(act_map: ACTMap, model: Any, clip: Any, family: ModelFamily) -> dict[str, nn.Module]:
    """The modules of ``model`` / ``clip`` the map's parts live in (all candidates, the map picks)."""
    modules: dict[str, nn.Module] = {}
    parts = act_map.parts()
    if family.denoiser in parts:
        modules.update(denoiser_modules(model, family))
    if any(part != family.denoiser for part in parts):
        modules.update(clip_modules(clip, family))
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
