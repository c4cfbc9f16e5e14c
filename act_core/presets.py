"""Presets: which modules of an SDXL (or SD 1.5) pipeline a map hooks, and how it is fitted.

Each preset is named after what it hooks:

* ``unet_norms`` (default): the paper's SDXL protocol. Every UNet module named ``*norm*`` (ResNet and
  Transformer2D GroupNorms, transformer LayerNorms norm1/2/3, conv_norm_out), Linear-AcT with source
  [min, max] support, UNet feature maps transported by their spatial mean as the reference does. It is
  the default because it is what the paper measured (best style/content trade-off at lambda = 1).
* ``text_encoder_norms``: the LayerNorms of both CLIP text encoders, fitted with no UNet pass at all
  (seconds, not minutes). Modules whose output cannot reach the UNet are skipped: SDXL reads the
  penultimate hidden state, so text encoder 1's last layer and final LayerNorm are dead.
* ``text_encoder_and_unet_norms``: both of the above with unbounded support, every module fitted from the
  plain model (``mode="at_once"``). First-step statistics of a many-step sampler understate how far
  source and target drift apart at later steps; fitting the parts independently adds their shifts, and
  on the shipped demo model this is the preset that reaches the target style at lambda <= 1 (fitted
  causally across parts it under-steers: see docs/demo_results.md).
* ``unet_norms_foldable``: the same UNet norms with unbounded support and per-element maps, so the map
  is affine and can be fused into the weights (``fuse_act``) or exported as a LoRA: zero cost at inference.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from .errors import ACTInputError
from .maps import APPLY_PER_ELEMENT, APPLY_SPATIAL_MEAN
from .names import TEXT_ENCODER, TEXT_ENCODER_2, UNET

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Preset:
    """What a map hooks (glob patterns per part, norm layers only) and how it is fitted."""

    name: str
    description: str
    patterns: Mapping[str, tuple[str, ...]]
    method: str = "linear"
    support: str | None = None
    apply_mode: str = APPLY_SPATIAL_MEAN
    mode: str = "causal"
    types: tuple[type[nn.Module], ...] = field(default=NORM_TYPES)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.patterns)

    @property
    def needs_unet(self) -> bool:
        return UNET in self.patterns

    def select(
        self, part: str, candidates: Mapping[str, nn.Module], excluded: tuple[str, ...] = ()
    ) -> dict[str, nn.Module]:
        """The ``candidates`` of ``part`` (canonical names) this preset hooks: a norm type, a path that
        matches the part's patterns and none of ``excluded``. Shared by the diffusers and ComfyUI hosts."""

        def hooked(name: str, module: nn.Module) -> bool:
            path = name.split(".", 1)[1]
            return (
                isinstance(module, self.types)
                and any(fnmatch.fnmatchcase(path, p) for p in self.patterns[part])
                and not any(fnmatch.fnmatchcase(path, p) for p in excluded)
            )

        return {name: module for name, module in candidates.items() if hooked(name, module)}


PRESETS: dict[str, Preset] = {
    "unet_norms": Preset(
        "unet_norms",
        "Paper protocol: every UNet *norm* module, Linear-AcT, source-range support, spatial-mean on feature maps.",
        {UNET: ("*norm*",)},
    ),
    "text_encoder_norms": Preset(
        "text_encoder_norms",
        "LayerNorms of both CLIP text encoders (no UNet pass while fitting: fast).",
        {TEXT_ENCODER: ("*layer_norm*",), TEXT_ENCODER_2: ("*layer_norm*",)},
        apply_mode=APPLY_PER_ELEMENT,  # (B, T, C) outputs: per element either way; this keeps them foldable
    ),
    "text_encoder_and_unet_norms": Preset(
        "text_encoder_and_unet_norms",
        "LayerNorms of both CLIP encoders and every UNet *norm* module, unbounded support, each module "
        "fitted from the plain model (at once): the strongest steering per lambda (measured on the demo model).",
        {TEXT_ENCODER: ("*layer_norm*",), TEXT_ENCODER_2: ("*layer_norm*",), UNET: ("*norm*",)},
        support="unbounded",
        mode="at_once",
    ),
    "unet_norms_foldable": Preset(
        "unet_norms_foldable",
        "UNet *norm* modules, unbounded per-element maps: can be fused into weights and exported as a LoRA.",
        {UNET: ("*norm*",)},
        support="unbounded",
        apply_mode=APPLY_PER_ELEMENT,
    ),
}
DEFAULT_PRESET = "unet_norms"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ACTInputError(f"Unknown ACT preset {name!r}; choose one of {', '.join(PRESETS)}.") from None


def dead_text_encoder_paths(part: str, num_hidden_layers: int) -> tuple[str, ...]:
    """Canonical-path globs of text encoder modules whose output never reaches the UNet in SDXL.

    SDXL conditions on ``hidden_states[-2]`` (the output of the second-to-last layer). Text encoder 1's
    last layer and final LayerNorm are therefore dead; text encoder 2's still feed the pooled embedding.
    """
    if part != TEXT_ENCODER:
        return ()
    return (f"text_model.encoder.layers.{num_hidden_layers - 1}.*", "text_model.final_layer_norm")
