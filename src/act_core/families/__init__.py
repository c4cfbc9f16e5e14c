"""Model families, each described in one file (its parts, presets, module names and hosts), and the one
place each host asks which family a model or a map is.

Adding a family is adding a file here (a ``ModelFamily`` named ``FAMILY``; ``FAMILIES`` finds it) and at
most one adapter per host (diffusers: the module named by ``diffusers_adapter``; ComfyUI needs none: its
module finders are family data).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from ..errors import ACTInputError, ACTModelMismatchError
from .base import ModelFamily
from .flux import FLUX
from .sd3 import SD3
from .sdxl import SDXL
from .structural import COMFY_CLASS_KEY, STRUCTURAL, fitted_class, structural_modules


def _discover() -> dict[str, ModelFamily]:
    """Every family module of this package (one that defines ``FAMILY``), SDXL first: a new family is a
    new file, with no list to edit."""
    found = [SDXL]
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, ModelFamily) and family not in found:
            found.append(family)
    return {family.name: family for family in found}


FAMILIES: dict[str, ModelFamily] = _discover()
# Maps written before families were recorded are SDXL's.
LEGACY_FAMILY = SDXL


def get_family(name: str) -> ModelFamily:
    """A family by name ("sdxl", ...)."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ACTInputError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.") from None


def family_of_map(metadata: Mapping[str, Any]) -> ModelFamily:
    """The family a map was fitted on, from its metadata."""
    return get_family(str(metadata.get("family", LEGACY_FAMILY.name)))


def _supported(host: str) -> str:
    return ", ".join(f.display_name for f in FAMILIES.values() if host in f.hosts and f is not STRUCTURAL)


def family_of_pipeline_class(class_name: str) -> ModelFamily | None:
    """The family of a diffusers pipeline class name (``model_index.json``'s ``_class_name``), if known."""
    return next((f for f in FAMILIES.values() if class_name in f.diffusers_pipelines), None)


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a diffusers pipeline, from the class of its denoiser."""
    for family in FAMILIES.values():
        denoiser = getattr(pipe, family.denoiser, None)
        if type(denoiser).__name__ in family.diffusers_denoisers:
            return family
    raise ACTInputError(
        f"{type(pipe).__name__} is not a supported pipeline: ACT knows {_supported('diffusers')} in diffusers "
        f"(pipelines {', '.join(name for f in FAMILIES.values() for name in f.diffusers_pipelines)})."
    )


def family_of_comfy_model(diffusion_model: Any) -> ModelFamily:
    """The family of a ComfyUI MODEL's ``model.diffusion_model``, from its class; a class no family claims
    falls back to the structural family when transformer blocks are found in it by structure."""
    name = type(diffusion_model).__name__
    for family in FAMILIES.values():
        if name in family.comfy_denoisers:
            return family
    if structural_modules(diffusion_model):
        return STRUCTURAL
    raise ACTModelMismatchError(
        f"This MODEL's diffusion model is a {name}, which ComfyUI-ACT does not know, and ACT found no "
        "transformer blocks in it by structure (a list of at least 2 identical attention blocks at the model's "
        f"hidden width), so it cannot steer it; in ComfyUI it steers {_supported('comfyui')} models, and other "
        "DiTs by their transformer blocks."
    )


def check_comfy_map(metadata: Mapping[str, Any], diffusion_model: Any) -> None:
    """Refuse a map of the structural family on a ComfyUI diffusion model of another class than the one it
    was fitted on (its modules are named by that class's structure, not by a family's table)."""
    if family_of_map(metadata) is not STRUCTURAL:
        return
    fitted, name = fitted_class(metadata), type(diffusion_model).__name__
    if fitted != name:
        raise ACTModelMismatchError(
            f"This ACT map was fitted with the structural fallback on a {fitted or 'model of unrecorded class'}, "
            f"but this MODEL's diffusion model is a {name}: such maps apply only to the class they were fitted "
            "on. Fit a map on this model."
        )


__all__ = [
    "COMFY_CLASS_KEY",
    "FAMILIES",
    "FLUX",
    "SD3",
    "SDXL",
    "STRUCTURAL",
    "ModelFamily",
    "check_comfy_map",
    "family_of_comfy_model",
    "family_of_map",
    "family_of_pipeline",
    "family_of_pipeline_class",
    "get_family",
]
