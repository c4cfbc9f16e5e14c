"""Export a foldable ACT map as a LoRA-style "diff" file that ComfyUI's stock LoraLoader applies.

A foldable map (unbounded support, affine on every element) is the same as adding
``lam * (omega - 1) * W`` to a norm layer's weight and ``lam * ((omega - 1) * b + beta)`` to its bias.
Those are full-weight diffs, linear in lambda, which ComfyUI stores as ``<key>.diff`` / ``<key>.diff_b``
and scales by the LoraLoader strength. So the file needs no custom node and no hooks at inference:
the loader's strength slider *is* lambda (times the strength the file was exported at).

Key names are the family's (``ModelFamily.lora_key``). Given the modules' names in the original checkpoint
layout (``state_keys``, or a diffusers pipeline, whose UNet config gives them), UNet keys are kohya's
``lora_unet_<LDM path>``, which A1111 and Forge read as well as ComfyUI (README, "LoRA export").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .applying import Strength, check_strength, folded_diffs
from .errors import ACTInputError
from .families import family_of_map
from .files import atomic_write
from .maps import APPLY_PER_ELEMENT, APPLY_SPATIAL_MEAN, ACTMap

LORA_FORMAT = "act_lora"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# Modules whose outputs carry units on the last axis (B, T, C): "spatial_mean" never applies to them,
# so a spatial-mean map on them is already per element (e.g. the text_encoder_norms preset).
_PER_TOKEN_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.Linear)
_LOADER_NOTE = (
    "Full-weight diffs of an ACT map (Activation Transport). ComfyUI's stock LoraLoader applies them as "
    "weight += strength * diff, so the loader strength is lambda (0 = model, 1 = full transport) times "
    "the export strength stored here. Load with strength_model for lora_unet_* (or unet.*) keys and "
    "strength_clip for text_encoders.* keys."
)


def _modules_of(modules: Mapping[str, nn.Module] | Any, act_map: ACTMap) -> Mapping[str, nn.Module]:
    """Accept either a name -> module mapping or an ACT pipeline (its ``act_modules``)."""
    if hasattr(modules, "act_modules"):
        return modules.act_modules(act_map.parts())
    return modules


def check_family_folds(act_map: ACTMap) -> None:
    """Refuse a map of a family whose maps never fold (FLUX, SD3...: no affine norms), saying why."""
    family = family_of_map(act_map.metadata)
    if not family.folds:
        family.lora_key(next(iter(act_map.modules)))  # raises: says why this family's maps do not fold


def check_foldable(act_map: ACTMap) -> None:
    """Refuse, naming the fix, a map that cannot become weights whatever the model: a family whose maps never
    fold, a time-aware map, a bounded support. (``as_foldable`` adds the check that needs the modules.)"""
    family = family_of_map(act_map.metadata)
    check_family_folds(act_map)
    if act_map.two_sided:
        raise ACTInputError(
            "This map is two-sided (lambda < 0 steers toward its 'less' prompts), and a LoRA holds one side "
            "(a negative LoRA strength extrapolates the other): export one side, act_map.side('more') or "
            "act_map.side('less')."
        )
    preset = family.foldable_preset
    timed = [name for name, m in act_map.modules.items() if m.bucketed]
    if timed:
        raise ACTInputError(
            f"This ACT map cannot be exported as a LoRA as it is: it is time-aware ({len(timed)} of its "
            f"{len(act_map)} modules have one map per noise level), and LoRA weights cannot change between "
            "denoising steps. Fold it first (a static map fitted to steer like its hooks, along the prompts it "
            "was fitted on, which fits record): in ComfyUI the 'Fold ACT map' node between Fit and Export; "
            "pipe.fold_act(map) in diffusers (pipe.fuse_act(map) folds by itself); 'act export-lora' folds by "
            f"itself. Or fit with preset {preset!r}, or apply this map with hooks (enable_act / the Apply ACT "
            "node)."
        )
    bounded = [name for name, m in act_map.modules.items() if not m.unbounded]
    if bounded:
        raise ACTInputError(
            f"This ACT map cannot be exported as a LoRA: {len(bounded)} of its {len(act_map)} modules have a "
            f"bounded support (support={act_map.metadata.get('support', '?')!r}; first: {bounded[0]!r}), so it "
            f"is not affine on every element and cannot be written into weights. Fit it with preset {preset!r} "
            f"(CLI: act fit --preset {preset}), or with support='unbounded' for text encoder presets; or apply "
            "this map with hooks (enable_act / the Apply ACT node)."
        )


def as_foldable(act_map: ACTMap, modules: Mapping[str, nn.Module]) -> ACTMap:
    """The map with spatial-mean maps on per-token modules (LayerNorm, Linear) marked per element.

    Those modules produce (B, T, C) outputs, where the hooks transport every element whatever the
    apply mode says, so relabelling changes nothing the model computes and makes them foldable.
    Raises an error naming the foldable preset when some module still cannot be folded.
    """
    check_foldable(act_map)
    relabelled = {}
    for name, module_map in act_map.modules.items():
        if module_map.apply_mode == APPLY_SPATIAL_MEAN and isinstance(modules.get(name), _PER_TOKEN_TYPES):
            module_map = replace(module_map, apply_mode=APPLY_PER_ELEMENT)
        relabelled[name] = module_map
    spatial = [name for name, m in relabelled.items() if not m.foldable]
    if spatial:
        preset = family_of_map(act_map.metadata).foldable_preset
        raise ACTInputError(
            f"This ACT map cannot be exported as a LoRA: {len(spatial)} of its {len(act_map)} modules transport "
            f"feature maps by their spatial mean (first: {spatial[0]!r}), so it is not affine on every element "
            f"and cannot be written into weights. Fit it with preset {preset!r} (CLI: act fit --preset "
            f"{preset}); or apply this map with hooks (enable_act / the Apply ACT node)."
        )
    return ACTMap(relabelled, act_map.metadata)


def lora_keys(
    act_map: ACTMap, modules: Mapping[str, nn.Module] | Any, state_keys: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The LoRA-file key stem of each of the map's modules (``.diff`` / ``.diff_b`` follow).

    ``state_keys`` names the modules in the original checkpoint layout (``ModelFamily.comfy_state_keys``:
    ``diffusion_model.input_blocks.1.0.in_layers.0``); when ``modules`` is a diffusers pipeline they come
    from its UNet's config. Without either, UNet keys are the canonical names, which A1111 does not read.
    """
    family = family_of_map(act_map.metadata)  # the map says which family's keys it needs
    check_family_folds(act_map)  # families whose maps never fold (FLUX, SD3) refuse here, saying why
    if state_keys is None:
        state_keys = _pipeline_state_keys(modules, act_map) or {}
    return {name: family.lora_key(name, state_keys.get(name)) for name in act_map.modules}


def _pipeline_state_keys(pipe: Any, act_map: ACTMap) -> dict[str, str] | None:
    """The map's modules' original-layout state-dict prefixes, from a diffusers pipeline's own config."""
    family = family_of_map(act_map.metadata)
    if (
        not hasattr(pipe, "act_modules")
        or family.diffusers_key_table is None
        or family.comfy_state_keys is None
    ):
        return None
    return family.comfy_state_keys(act_map.modules, lambda: family.diffusers_key_table(pipe))


def lora_state_dict(
    act_map: ACTMap,
    modules: Mapping[str, nn.Module] | Any,
    strength: Strength = 1.0,
    dtype: torch.dtype = torch.float32,
    state_keys: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{key + ".diff": dW, key + ".diff_b": db}`` at ``strength``, ``key`` from ``lora_keys``.

    ``modules`` is the model's canonical name -> module mapping (``pipe.act_modules()``) or an ACT
    pipeline; the diffs need the current weights, since the weight diff is ``lam * (omega - 1) * W``.
    ``state_keys``: see ``lora_keys`` (a pipeline gives them itself).
    """
    keys = lora_keys(act_map, modules, state_keys)  # first: families whose maps never fold refuse here
    modules = _modules_of(modules, act_map)
    foldable = as_foldable(act_map, modules)
    diffs = folded_diffs(modules, foldable, strength)
    state: dict[str, torch.Tensor] = {}
    for key, diff in diffs.items():
        module_name, param = key.rsplit(".", 1)
        suffix = ".diff" if param == "weight" else ".diff_b"
        value = diff.to(dtype).contiguous()
        if not torch.isfinite(value).all():
            raise ACTInputError(
                f"The diff for {key!r} overflows {dtype} (largest |value| {diff.abs().max().item():.3g}); "
                "export with dtype fp32 (the default) instead."
            )
        state[keys[module_name] + suffix] = value
    return state


def export_lora(
    act_map: ACTMap,
    modules: Mapping[str, nn.Module] | Any,
    path: str | os.PathLike,
    strength: float = 1.0,
    dtype: str | torch.dtype = "fp32",
    state_keys: Mapping[str, str] | None = None,
) -> Path:
    """Write the map's folded diffs as a safetensors LoRA file (atomically) and return its path.

    ``strength`` is baked into the diffs; ComfyUI's LoraLoader strength multiplies it, so export at 1
    and use the loader's slider as lambda. ``dtype`` is "fp32" (default: exact; norm diffs are small files)
    or "fp16" (half the size; refused when a diff overflows it). ``state_keys``: the modules' names in the
    original checkpoint layout, for key names A1111 reads too (see ``lora_keys``; a pipeline gives them).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ACTInputError(f"LoRA files are saved as .safetensors; got {path.name!r}.")
    strength = check_strength(strength)
    torch_dtype = _dtype(dtype)
    state = lora_state_dict(act_map, modules, strength, torch_dtype, state_keys)
    dtype_name = next(name for name, value in DTYPES.items() if value == torch_dtype)
    header = {
        "format": LORA_FORMAT,
        "act_version": __version__,
        "strength": repr(strength),
        "dtype": dtype_name,
        "modules": str(len(act_map)),
        "parts": ",".join(act_map.parts()),
        "note": _LOADER_NOTE,
        "act_map_metadata": json.dumps(act_map.metadata),
    }
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ACTInputError(f"LoRA dtype must be float16 or float32, got {dtype}.")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ACTInputError(f"LoRA dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.") from None
