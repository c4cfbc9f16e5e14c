"""How a trajectory fit scales each step's maps so that lambda = 1 moves the prediction as far as the target
prompt moves it (``act_core.sampling.source_prediction`` calls it once per noise level).

Torch-free at import (the CLI offers the rules before torch loads); the functions take tensors.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ACTInputError

CALIBRATION_RANGE = (0.5, 3.0)
# How a step's calibration gain is chosen (calibration_gain): the gain that moves the output as far (in norm)
# as the target prompt moves it (the default since issue 23: docs/protocol.md, "Calibration"), or the
# least-squares gain (the default before; it under-reached textures and some colour pairs).
CALIBRATIONS = ("norm", "projection")
DEFAULT_CALIBRATION = "norm"


def calibration_alignment(target: Any, transported: Any, plain: Any) -> float:
    """Cosine between how far the transport moved the output and how far the target prompt moves it."""
    moved = transported.double() - plain.double()
    wanted = target.double() - plain.double()
    norms = float(moved.norm()) * float(wanted.norm())
    return 0.0 if norms <= 0.0 else float((wanted * moved).sum()) / norms


def calibration_gain(target: Any, transported: Any, plain: Any, rule: str = DEFAULT_CALIBRATION) -> float:
    """The gain g for ``plain + g * (transported - plain)`` that matches ``target``.

    Per-unit transport of each layer's statistics reproduces only part of what the target prompt changes
    in the model's output (a per-channel affine map cannot carry everything a prompt does), and guidance
    multiplies what is missing. Calibrating every step's maps on the model output itself makes lambda = 1
    mean "the prediction moves as far as the target prompt moves it": ``"norm"`` (default) the ratio of the
    two moves' norms (as far, along the direction the maps can move; the least-squares gain divided by the
    moves' cosine), ``"projection"`` the least-squares gain (the target's move projected on the transport's,
    which falls short by that cosine: 0.8-0.97 on the shapes models, enough to leave dots and some colour
    pairs under-reached). Clamped to [0.5, 3].
    """
    moved = transported.double() - plain.double()
    wanted = target.double() - plain.double()
    norm = float((moved * moved).sum())
    if norm <= 0.0:
        return 1.0
    if rule == "norm":
        gain = math.sqrt(float((wanted * wanted).sum()) / norm)
    elif rule == "projection":
        gain = float((wanted * moved).sum()) / norm
    else:
        raise ACTInputError(f"calibration must be one of {CALIBRATIONS}, got {rule!r}.")
    return min(CALIBRATION_RANGE[1], max(CALIBRATION_RANGE[0], gain))
