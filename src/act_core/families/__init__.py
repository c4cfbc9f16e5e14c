"""Model families, each described in one file (its parts, presets, and names in other hosts).

Adding a family is adding a file here and an entry in ``FAMILIES``.
"""

from __future__ import annotations

from ..errors import ACTInputError
from .base import ModelFamily
from .flux import FLUX
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {SDXL.name: SDXL, FLUX.name: FLUX}


def get_family(name: str) -> ModelFamily:
    """A family by name ("sdxl", ...)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ACTInputError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.") from None


__all__ = ["FAMILIES", "FLUX", "SDXL", "ModelFamily", "get_family"]
