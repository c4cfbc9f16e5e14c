"""Presets: which modules of a model a map hooks, how they are fitted, and which CFG rows they steer.

A preset is data; each model family (``act_core.families``) lists its own. Names say what a preset
hooks (``unet_norms``, ``text_encoder_norms``, ...). ``protocol`` says where statistics come from:

* ``"trajectory"``: along the guided sampling trajectory the user generates with, one map per
  denoising step (time-aware), exact causal in one pass (``act_core.trajectory``). Steers the cond
  rows of a CFG batch. The default: measured to steer on independently trained models
  (docs/protocol.md), where the paper's protocol did nothing.
* ``"first_step"``: the paper's text-to-image protocol: the cond branch of the first denoising
  step (guidance off), one map for every step.

Text-encoder-only presets need no denoiser pass, whatever the protocol.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from .apply_modes import APPLY_SPATIAL_MEAN
from .errors import ACTInputError
from .recording import OutputOf

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)
PROTOCOLS = ("trajectory", "first_step")
CFG_ROWS = ("cond", "all")


@dataclass(frozen=True)
class Preset:
    """What a map hooks (glob patterns per part, modules of ``types`` only) and how it is fitted."""

    name: str
    description: str
    patterns: Mapping[str, tuple[str, ...]]
    method: str = "linear"
    support: str | None = None
    apply_mode: str = APPLY_SPATIAL_MEAN
    mode: str = "causal"
    protocol: str = "first_step"
    # Which rows of a CFG batch the denoiser maps steer: "cond" (the prompt's branch, what the map was
    # fitted on) or "all" (what folded weights and LoRA files do, so foldable presets use it).
    cfg_rows: str = "cond"
    types: tuple[type[nn.Module], ...] = field(default=NORM_TYPES)
    # Trajectory protocol: what one sample is. "mean": one mean per prompt and module (the paper's
    # pooling); "positions": every spatial position / token (the distribution a texture changes).
    statistic: str = "mean"
    # Trajectory protocol: scale each step's maps so the transported source rows' model output best matches
    # the target rows' (one gain per step; costs one more row per prompt pair).
    calibrate: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ACTInputError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")
        if self.cfg_rows not in CFG_ROWS:
            raise ACTInputError(f"cfg_rows must be one of {CFG_ROWS}, got {self.cfg_rows!r}.")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.patterns)

    def select(
        self, part: str, candidates: Mapping[str, nn.Module], excluded: tuple[str, ...] = ()
    ) -> dict[str, nn.Module]:
        """The ``candidates`` of ``part`` (canonical names) this preset hooks: a module type, a path that
        matches the part's patterns and none of ``excluded``. Shared by the diffusers and ComfyUI hosts."""

        def hooked(name: str, module: nn.Module | OutputOf) -> bool:
            path = name.split(".", 1)[1]
            return (
                isinstance(module, (*self.types, OutputOf))  # streams are named explicitly by the patterns
                and any(fnmatch.fnmatchcase(path, p) for p in self.patterns[part])
                and not any(fnmatch.fnmatchcase(path, p) for p in excluded)
            )

        return {name: module for name, module in candidates.items() if hooked(name, module)}
