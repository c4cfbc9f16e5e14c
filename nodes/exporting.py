"""Export a foldable ACT map from ComfyUI as a LoRA file the stock Load LoRA node applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from act_core.errors import ACTInputError
from act_core.lora import as_foldable, export_lora
from act_core.maps import ACTMap, part_of

from .applying import map_family
from .comfy_models import check_fits, checkpoint_shells, modules_for, state_keys


def export_map(model: Any, clip: Any, act_map: ACTMap, path: Path, dtype: str) -> Path:
    """Write ``act_map`` as full-weight diffs against the checkpoint's own weights (not other clones')."""
    family = map_family(act_map)
    if not family.folds:
        family.lora_key(next(iter(act_map.modules)))  # raises: says why this family has no LoRA export
    denoiser, parts = family.denoiser, act_map.parts()
    if denoiser in parts and model is None:
        raise ACTInputError(f"This ACT map steers the {denoiser}: connect the MODEL it was fitted on.")
    if any(part != denoiser for part in parts) and clip is None:
        raise ACTInputError("This ACT map steers the text encoders: connect the CLIP it was fitted on.")
    modules = modules_for(act_map, model, clip, family)
    check_fits(act_map, modules, "this MODEL/CLIP")
    as_foldable(act_map, modules)  # the clear "cannot be exported" error before any weight is read
    keys = state_keys(act_map.modules, family, model if denoiser in parts else None)
    shells = {}
    for owner, names in (
        (model, [n for n in act_map.modules if part_of(n) == denoiser]),
        (clip.patcher if clip is not None else None, [n for n in act_map.modules if part_of(n) != denoiser]),
    ):
        if names:
            shells.update(checkpoint_shells(owner, names, modules, keys, with_patches=False))
    return export_lora(act_map, shells, path, strength=1.0, dtype=dtype, state_keys=keys)
