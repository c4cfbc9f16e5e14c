"""Model families, each described in one file (its parts, presets, and names in other hosts).

Adding a family is adding a file here and an entry in ``FAMILIES``.
"""

from __future__ import annotations

from ..errors import ACTInputError
from .base import ModelFamily
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {SDXL.name: SDXL}


def get_family(name: str) -> ModelFamily:
    """A family by name ("sdxl", ...)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ACTInputError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.") from None


__all__ = ["FAMILIES", "SDXL", "ModelFamily", "get_family"]
