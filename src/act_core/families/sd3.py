"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``): parts, presets and module names.

Parts: ``transformer`` (the MMDiT denoiser), ``text_encoder`` (CLIP-L), ``text_encoder_2`` (CLIP-G) and
``text_encoder_3`` (T5). As in FLUX, the prompt reaches the transformer by two routes: the token sequence
(both CLIPs' hidden states and T5's, through every block's text stream) and the pooled vector (both CLIPs'
projections, through ``time_text_embed.text_embedder`` into every block's modulation), and the default
preset hooks both. Each ``JointTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``, the
streams ``transformer_blocks.N:text`` / ``:image``; the last block is ``context_pre_only`` (its text output
is ``None``), so it has an image stream only. SD3 samples with CFG, so maps steer the cond rows.
Diffusers only for now: ComfyUI's MMDiT is not mapped, and maps do not fold (no LoRA export).
"""

from __future__ import annotations

from torch import nn

from ..errors import ACTInputError
from ..presets import Preset
from ..recording import OutputOf
from .base import ModelFamily
from .flux import IMAGE, POOLED_TEXT, TEXT, block_streams, trajectory_preset

TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3 = (
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
)
PARTS = (TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)
BLOCK_STREAMS = ("transformer_blocks.*:text", "transformer_blocks.*:image")


PRESETS: dict[str, Preset] = {
    "pooled_text_and_blocks": trajectory_preset(
        "pooled_text_and_blocks",
        "The pooled-text projection that feeds every block's modulation (time_text_embed.text_embedder) and "
        "the text and image output streams of every MMDiT block, fitted along your sampler's trajectory.",
        (POOLED_TEXT[0], *BLOCK_STREAMS),
        cfg_rows="cond",  # SD3 runs a CFG batch: steer the prompt's rows, as on SDXL
    ),
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The text and image output streams of every MMDiT block, fitted along your sampler's trajectory.",
        BLOCK_STREAMS,
        cfg_rows="cond",
    ),
}
DEFAULT_PRESET = "pooled_text_and_blocks"


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of a diffusers SD3 component by canonical name, plus the blocks' streams."""
    if part not in PARTS:
        raise ACTInputError(f"Unknown SD3 part {part!r}; expected one of {PARTS}.")
    modules: dict[str, nn.Module | OutputOf] = {}
    for path, module in component.named_modules():
        if not path:
            continue
        modules[f"{part}.{path}"] = module
        if part == TRANSFORMER and type(module).__name__ == "JointTransformerBlock":
            streams = (IMAGE,) if getattr(module, "context_pre_only", False) else (TEXT, IMAGE)
            modules.update(block_streams(f"{part}.{path}", module, streams))
    return modules


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"SD3 maps do not fold into weights ({module_name!r}: per-step maps on block outputs), so they cannot "
        "be exported as a LoRA; apply them with hooks."
    )


SD3 = ModelFamily(
    name="sd3",
    display_name="SD3",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="sigma (= timestep / 1000 in diffusers' SD3 pipelines): 1 = pure noise",
    lora_key=lora_key,
    max_sequence_length=(256, 512),
    diffusers_pipelines=("StableDiffusion3Pipeline",),
    diffusers_denoisers=("SD3Transformer2DModel",),
    diffusers_adapter="act_core.diffusers.sd3",
    diffusers_modules=component_modules,
)
FAMILY = SD3
