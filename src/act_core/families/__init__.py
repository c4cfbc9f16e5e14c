"""Model families, each described in one file (its parts, presets, and names in other hosts).

Adding a family is adding a file here and an entry in ``FAMILIES``.
"""

from __future__ import annotations

from ..errors import ACTInputError
from .base import ModelFamily
from .flux import FLUX
from .sd3 import SD3
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {SDXL.name: SDXL, FLUX.name: FLUX, SD3.name: SD3}


def get_family(name: str) -> ModelFamily:
    """A family by name ("sdxl", ...)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ACTInputError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.") from None


__all__ = ["FAMILIES", "FLUX", "SD3", "SDXL", "ModelFamily", "get_family"]
