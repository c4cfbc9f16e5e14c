"""Constants and choices shared by the ACT nodes (no ComfyUI import: tested without it).

Input checks live in ``act_core.validation`` (one layer for the nodes, the mixin and the CLI).
"""

from __future__ import annotations

from act_core.errors import ACTInputError
from act_core.families import FAMILIES, LEGACY_FAMILY, ModelFamily
from act_core.presets import Preset

CATEGORY = "ACT"
ACT_MAP = "ACT_MAP"
# Node titles. The frontend's node search looks at the id and the display name only (fuzzy, and only near the
# start: Fuse.js with threshold 0.3 and distance 100 finds a word that starts within about the first 30
# characters), and ComfyUI 0.3.64 has no search aliases: the words artists search for ("slider", "steer",
# "transport") are in the names themselves.
DISPLAY_NAMES = {
    "ACTFitMap": "Fit ACT map (transport slider)",
    "ACTApply": "Apply ACT (steer, slider)",
    "ACTSaveMap": "Save ACT map",
    "ACTLoadMap": "Load ACT map",
    "ACTExportLoRA": "Export ACT as LoRA",
    "ACTSweep": "ACT lambda sweep (slider preview)",
    "ACTFoldMap": "Fold ACT map (slider into a LoRA)",
}
# The families ComfyUI-ACT steers in ComfyUI (``act_core.families`` data).
COMFY_FAMILIES = [family for family in FAMILIES.values() if "comfyui" in family.hosts]
# "default": the MODEL family's own default preset, so one Fit node works on every family; then each
# family's presets (the Fit node looks the name up in the MODEL's family).
FAMILY_DEFAULT_PRESET = "default"
PRESET_NAMES = [FAMILY_DEFAULT_PRESET, *dict.fromkeys(name for f in COMFY_FAMILIES for name in f.presets)]
DEFAULT_PRESET = FAMILY_DEFAULT_PRESET
METHODS = ["linear", "mean", "gaussian"]
SUPPORTS = ["auto", "range", "unbounded", "q0.5-99.5", "q1-99", "q5-95", "q10-90", "q25-75", "q40-60"]
# "preset": the preset's own mode (causal except text_encoder_and_unet_norms).
MODES = ["preset", "causal", "at_once"]
CAUSAL_STRATEGIES = ["auto", "lockstep", "groupwise"]
LORA_DTYPES = ["fp32", "fp16"]
# Fallbacks for the sampler/scheduler combos when ComfyUI is not importable.
FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc"]
FALLBACK_SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF
# Strength (lambda) sliders: clicks and drags snap to 0.05 (the frontend rounds every change to ``round``;
# without it a click lands on -0.01 or 0.92 and exactly 0 needs a pixel-exact click).
STRENGTH_RANGE = {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05, "round": 0.05}

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


def parse_parts(text: str, preset: Preset, family: ModelFamily = LEGACY_FAMILY) -> tuple[str, ...]:
    """A comma-separated subset of the preset's parts; blank means all of them."""
    wanted = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if not wanted:
        return preset.parts
    unknown = [p for p in wanted if p not in family.parts]
    if unknown:
        raise ACTInputError(
            f"Unknown part(s) {unknown}; parts are {', '.join(family.parts)} (comma-separated)."
        )
    outside = [p for p in wanted if p not in preset.parts]
    if outside:
        raise ACTInputError(
            f"Preset {preset.name!r} hooks {', '.join(preset.parts)}, not {', '.join(outside)}. Leave 'parts' empty "
            "for all of the preset's parts, or pick another preset."
        )
    return tuple(dict.fromkeys(wanted))


def transformer_options_of(args: tuple, kwargs: dict) -> dict:
    """The ``transformer_options`` of an APPLY_MODEL (or DIFFUSION_MODEL) wrapper call, whatever the signature.

    It is the last dict argument: ``apply_model(x, t, c_concat, c_crossattn, control, options)``, the UNet's
    ``_forward(x, timesteps, context, y, control, options)`` and FLUX's ``_forward(..., control, options)`` all
    end with it (``control`` can be a dict too, so the first dict would be wrong).
    """
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    return next((arg for arg in reversed(args) if isinstance(arg, dict)), {})
