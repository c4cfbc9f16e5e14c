"""Shared constants and input parsing for the ACT nodes (no ComfyUI import: schemas are tested without it)."""

from __future__ import annotations

import math
import re

from act_core.errors import ACTInputError
from act_core.families.sdxl import DEFAULT_PRESET, PARTS, PRESETS
from act_core.presets import Preset

CATEGORY = "ACT"
ACT_MAP = "ACT_MAP"

PRESET_NAMES = list(PRESETS)
METHODS = ["linear", "mean", "gaussian"]
SUPPORTS = ["auto", "range", "unbounded", "q0.5-99.5", "q1-99", "q5-95", "q10-90", "q25-75", "q40-60"]
# "preset": the preset's own mode (causal except text_encoder_and_unet_norms).
MODES = ["preset", "causal", "at_once"]
CAUSAL_STRATEGIES = ["auto", "lockstep", "groupwise"]
LORA_DTYPES = ["fp16", "fp32"]
# Fallbacks for the sampler/scheduler combos when ComfyUI is not importable (schema tests in CI).
FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc"]
FALLBACK_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_IMBALANCE = 4.0
STRENGTH_SPEC = {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05, "display": "slider"}

DEFAULT_SOURCE_PROMPTS = "\n".join(
    [
        "a photo of a cat sitting on a sofa",
        "a photo of a lighthouse on a cliff",
        "a photo of a bowl of fruit on a table",
        "a photo of a city street at night",
    ]
)
DEFAULT_TARGET_PROMPTS = "\n".join(
    [
        "a watercolor painting of a cat sitting on a sofa",
        "a watercolor painting of a lighthouse on a cliff",
        "a watercolor painting of a bowl of fruit on a table",
        "a watercolor painting of a city street at night",
    ]
)


def parse_prompts(text: str, side: str) -> list[str]:
    """One prompt per line; blank lines and surrounding spaces ignored; at least 2 prompts."""
    if not isinstance(text, str):
        raise ACTInputError(f"The {side} prompts must be text, one prompt per line.")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) < 2:
        raise ACTInputError(
            f"The {side} prompt list has {len(prompts)} non-empty line(s); ACT needs at least 2 {side} prompts, "
            f"one per line (the paper uses hundreds). Add more lines to '{side}_prompts'."
        )
    return prompts


def check_balance(source: list[str], target: list[str], max_ratio: float = MAX_IMBALANCE) -> None:
    """Refuse prompt sets whose sizes differ by more than ``max_ratio`` (usually a pasting mistake)."""
    n, m = len(source), len(target)
    if max(n, m) > max_ratio * min(n, m):
        raise ACTInputError(
            f"Unbalanced prompt lists: {n} source vs {m} target prompts. Give both lists a similar number of "
            f"lines (at most {max_ratio:g}x apart; equal is best), e.g. the same prompts with and without the style."
        )


def parse_parts(text: str, preset: Preset) -> tuple[str, ...]:
    """A comma-separated subset of the preset's parts; blank means all of them."""
    wanted = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if not wanted:
        return preset.parts
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ACTInputError(f"Unknown part(s) {unknown}; parts are {', '.join(PARTS)} (comma-separated).")
    outside = [p for p in wanted if p not in preset.parts]
    if outside:
        raise ACTInputError(
            f"Preset {preset.name!r} hooks {', '.join(preset.parts)}, not {', '.join(outside)}. Leave 'parts' empty "
            "for all of the preset's parts, or pick another preset."
        )
    return tuple(dict.fromkeys(wanted))


def parse_lambdas(text: str) -> list[float]:
    """Comma/space-separated lambda values such as ``"0, 0.25, 0.5, 0.75, 1"``."""
    items = [item for item in re.split(r"[,\s;]+", text or "") if item]
    if not items:
        raise ACTInputError("Give at least one lambda value, e.g. '0, 0.25, 0.5, 0.75, 1'.")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ACTInputError(
                f"Cannot read lambda value {item!r}; write numbers separated by commas, e.g. '0, 0.5, 1'."
            ) from None
        if not math.isfinite(value):
            raise ACTInputError(f"Lambda values must be finite numbers, got {item!r}.")
        values.append(value)
    if len(values) > 64:
        raise ACTInputError(f"{len(values)} lambda values is too many for one sweep (at most 64).")
    return values


def check_window(start_percent: float, end_percent: float) -> tuple[float, float]:
    start, end = float(start_percent), float(end_percent)
    if not 0.0 <= start <= end <= 1.0:
        raise ACTInputError(
            f"Need 0 <= start_percent <= end_percent <= 1 (fractions of denoising), got {start} and {end}."
        )
    return start, end


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8 or width < 64 or height < 64:
        raise ACTInputError(f"width and height must be multiples of 8 and at least 64, got {width}x{height}.")


def resolve_support(support: str, method: str, preset: Preset) -> str | None:
    """'auto' means the preset's support (the foldable preset: unbounded), else the method's default."""
    return (preset.support or None) if support == "auto" else support


__all__ = [
    "ACT_MAP",
    "CATEGORY",
    "DEFAULT_PRESET",
    "check_balance",
    "check_size",
    "check_window",
    "parse_lambdas",
    "parse_parts",
    "parse_prompts",
    "resolve_support",
]
