"""FLUX.1: parts, presets, and module names in diffusers and ComfyUI.

Parts: ``transformer`` (the denoiser), ``text_encoder`` (CLIP-L: only its pooled vector reaches the
transformer) and ``text_encoder_2`` (T5: the token sequence). The prompt reaches the transformer by two
routes: T5's tokens through the blocks' text stream, and CLIP's pooled vector through
``time_text_embed.text_embedder`` (ComfyUI's ``vector_in``) into every block's modulation. The default
preset hooks both, because a model may carry an attribute by either one (docs/protocol.md: the shapes
FLUX models draw stripes from the pooled vector, colours from the tokens). Canonical names are the
diffusers module paths, plus three *streams* that are elements of a block's tuple output rather than
modules:

    transformer.transformer_blocks.3:text      # a double block's text-token output
    transformer.transformer_blocks.3:image     # its image-token output
    transformer.single_transformer_blocks.7:joint   # a single block's output, text and image tokens

diffusers (>= 0.35) returns ``(encoder_hidden_states, hidden_states)`` from both block types, so a
single block's joint stream is its two outputs joined along tokens; ComfyUI's ``DoubleStreamBlock``
returns ``(img, txt)`` and its ``SingleStreamBlock`` the joined tensor itself: the names below map one
onto the other, so a map fitted in either host applies in the other. Norm presets hook the
normalisations before each block's modulation (``AdaLayerNormZero.norm`` = ComfyUI's ``img_norm1``).
None of FLUX's maps fold into weights (block outputs are not layer outputs with weights, and FLUX's
LayerNorms have no affine parameters), so FLUX has no LoRA export.

Text encoders: ComfyUI's FLUX CLIP (``CLIP.cond_stage_model``, a ``FluxClipModel``) holds CLIP-L as
``clip_l`` and T5 as ``t5xxl``; their ``.transformer`` modules have the transformers module paths
(``text_model.encoder.layers.0.layer_norm1``; ``encoder.block.0.layer.0.layer_norm``,
``encoder.final_layer_norm``), so ``text_encoder.<path>`` is ``clip_l.transformer.<path>`` and
``text_encoder_2.<path>`` is ``t5xxl.transformer.<path>``. T5's RMSNorm has no bias, so these maps do not
fold either: ComfyUI applies them with hooks.
"""

from __future__ import annotations

import re

from torch import nn

from ..apply_modes import APPLY_PER_ELEMENT
from ..errors import ACTInputError, ACTModelMismatchError
from ..presets import Preset
from ..recording import OutputOf
from .base import ActivationMemory, KeyTable, ModelFamily

TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2 = "transformer", "text_encoder", "text_encoder_2"
PARTS = (TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2)
TEXT, IMAGE, JOINT = "text", "image", "joint"
_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)$")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)$")
# Where diffusers' blocks put each stream, and ComfyUI's.
DIFFUSERS_STREAMS = {TEXT: 0, IMAGE: 1, JOINT: (0, 1)}
COMFY_DOUBLE_STREAMS = {IMAGE: 0, TEXT: 1}
# diffusers norm path (inside a block) -> ComfyUI's.
COMFY_NORMS = {
    "norm1.norm": "img_norm1",
    "norm1_context.norm": "txt_norm1",
    "norm2": "img_norm2",
    "norm2_context": "txt_norm2",
}
COMFY_SINGLE_NORM = ("norm.norm", "pre_norm")
# The pooled-text projection: diffusers' path in the transformer -> ComfyUI's module (same output).
POOLED_TEXT = ("time_text_embed.text_embedder", "vector_in")
# Text-encoder part -> the encoder's attribute on ComfyUI's FluxClipModel (its ``.transformer`` has the
# transformers module paths).
COMFY_CLIP_PARTS = {TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "t5xxl"}
CLIP_TEXT_MODEL_PREFIX = "text_model."
BLOCK_STREAMS = (
    "transformer_blocks.*:text",
    "transformer_blocks.*:image",
    "single_transformer_blocks.*:joint",
)


def trajectory_preset(
    name: str, description: str, patterns: tuple[str, ...], cfg_rows: str = "all"
) -> Preset:
    """A transformer preset of the default protocol (also SD3's, whose CFG batch makes ``cfg_rows="cond"``)."""
    return Preset(
        name,
        description,
        {TRANSFORMER: patterns},
        support="unbounded",
        apply_mode=APPLY_PER_ELEMENT,
        protocol="trajectory",
        statistic="positions",
        calibrate=True,
        cfg_rows=cfg_rows,  # FLUX.1 runs no CFG batch: every row of a transformer call is the prompt's
        types=(nn.Module,),
    )


PRESETS: dict[str, Preset] = {
    "pooled_text_and_blocks": trajectory_preset(
        "pooled_text_and_blocks",
        "The pooled-text projection that feeds every block's modulation (time_text_embed.text_embedder) and "
        "the output streams of every transformer block, fitted along your sampler's trajectory: both routes "
        "by which a prompt reaches the transformer.",
        (POOLED_TEXT[0], *BLOCK_STREAMS),
    ),
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The output streams of every transformer block (double blocks: text and image; single blocks: the "
        "joint stream), as the reference's FLUX setup, fitted along your sampler's trajectory.",
        BLOCK_STREAMS,
    ),
    "transformer_norms": trajectory_preset(
        "transformer_norms",
        "The LayerNorms before every block's modulation (both streams of the double blocks, the single "
        "blocks'), fitted along your sampler's trajectory.",
        (
            "transformer_blocks.*.norm1.norm",
            "transformer_blocks.*.norm1_context.norm",
            "transformer_blocks.*.norm2",
            "transformer_blocks.*.norm2_context",
            "single_transformer_blocks.*.norm.norm",
        ),
    ),
    "text_encoder_norms": Preset(
        "text_encoder_norms",
        "The layer norms of CLIP-L and T5 (no transformer pass while fitting: fast).",
        {TEXT_ENCODER: ("*layer_norm*",), TEXT_ENCODER_2: ("*layer_norm*",)},
        apply_mode=APPLY_PER_ELEMENT,
        types=(nn.Module,),
    ),
}
DEFAULT_PRESET = "pooled_text_and_blocks"


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of a diffusers FLUX component by canonical name, plus the blocks' streams."""
    if part not in PARTS:
        raise ACTInputError(f"Unknown FLUX part {part!r}; expected one of {PARTS}.")
    modules: dict[str, nn.Module | OutputOf] = {}
    for path, module in component.named_modules():
        if not path:
            continue
        if (
            part == TEXT_ENCODER
            and not path.startswith("text_model.")
            and not hasattr(component, "text_model")
        ):
            path = f"text_model.{path}"  # CLIPTextModel without text_model (transformers 5), as for SDXL
        modules[f"{part}.{path}"] = module
        if part != TRANSFORMER:
            continue
        if _DOUBLE.match(path):
            modules.update(block_streams(f"{part}.{path}", module, (TEXT, IMAGE)))
        elif _SINGLE.match(path):
            modules.update(block_streams(f"{part}.{path}", module, (JOINT,)))
    return modules


def joined_block_modules(
    part: str, component: nn.Module, parts: tuple[str, ...], label: str
) -> dict[str, nn.Module | OutputOf]:
    """A FLUX-layout diffusers component by canonical name for models whose single blocks return the joined
    text and image tokens as one tensor (Chroma, FLUX.2): every submodule, each double block's text and image
    streams, each single block itself as its joint stream."""
    if part not in parts:
        raise ACTInputError(f"Unknown {label} part {part!r}; expected one of {parts}.")
    modules: dict[str, nn.Module | OutputOf] = {}
    for path, module in component.named_modules():
        if not path:
            continue
        name = f"{part}.{path}"
        modules[name] = module
        if part != TRANSFORMER:
            continue
        if _DOUBLE.match(path):
            modules.update(block_streams(name, module, (TEXT, IMAGE)))
        elif _SINGLE.match(path):
            modules[f"{name}:{JOINT}"] = module
    return modules


def block_streams(name: str, block: nn.Module, streams: tuple[str, ...]) -> dict[str, OutputOf]:
    """``name:stream`` entries for the streams of a diffusers block's tuple output (FLUX's, SD3's)."""
    width = block_width(block)
    return {f"{name}:{stream}": OutputOf(block, DIFFUSERS_STREAMS[stream], width) for stream in streams}


def block_width(block: nn.Module) -> int:
    """A transformer block's stream width (its attention's inner width)."""
    for module in block.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
    raise ACTInputError(f"Cannot tell the width of FLUX block {type(block).__name__}.")


def comfy_transformer_modules(
    diffusion_model: nn.Module, key_table: KeyTable | None = None
) -> dict[str, nn.Module | OutputOf]:
    """ComfyUI's ``Flux`` model (``double_blocks`` / ``single_blocks``) under canonical names."""
    modules: dict[str, nn.Module | OutputOf] = {}
    if hasattr(diffusion_model, POOLED_TEXT[1]):
        modules[f"{TRANSFORMER}.{POOLED_TEXT[0]}"] = getattr(diffusion_model, POOLED_TEXT[1])
    for i, block in enumerate(getattr(diffusion_model, "double_blocks", [])):
        base = f"{TRANSFORMER}.transformer_blocks.{i}"
        width = int(block.img_norm1.normalized_shape[-1])
        for stream, index in COMFY_DOUBLE_STREAMS.items():
            modules[f"{base}:{stream}"] = OutputOf(block, index, width)
        for diffusers_path, comfy_path in COMFY_NORMS.items():
            modules[f"{base}.{diffusers_path}"] = getattr(block, comfy_path)
    for i, block in enumerate(getattr(diffusion_model, "single_blocks", [])):
        base = f"{TRANSFORMER}.single_transformer_blocks.{i}"
        modules[f"{base}:{JOINT}"] = block  # ComfyUI's single block returns the joined tokens itself
        modules[f"{base}.{COMFY_SINGLE_NORM[0]}"] = getattr(block, COMFY_SINGLE_NORM[1])
    if not modules:
        raise ACTInputError(
            "This model has no double_blocks / single_blocks: it is not a ComfyUI FLUX model."
        )
    return modules


def comfy_clip_modules(cond_stage_model: nn.Module) -> dict[str, nn.Module]:
    """ComfyUI's FLUX text encoders (``CLIP.cond_stage_model``: ``clip_l`` / ``t5xxl``) under canonical names.

    ``clip_l.transformer.text_model.*`` is ``text_encoder.text_model.*`` (its ``text_projection`` is not a
    FLUX module: FLUX takes the unprojected pooled vector) and ``t5xxl.transformer.*`` is
    ``text_encoder_2.*``. An encoder the CLIP lacks is left out (the map's compatibility check names it).
    """
    modules: dict[str, nn.Module] = {}
    for part, clip_name in COMFY_CLIP_PARTS.items():
        transformer = getattr(getattr(cond_stage_model, clip_name, None), "transformer", None)
        if not isinstance(transformer, nn.Module):
            continue
        for path, module in transformer.named_modules():
            if not path or (part == TEXT_ENCODER and not path.startswith(CLIP_TEXT_MODEL_PREFIX)):
                continue
            modules[f"{part}.{path}"] = module
    if not modules:
        raise ACTModelMismatchError(
            f"This CLIP ({type(cond_stage_model).__name__}) has neither FLUX text encoder (clip_l, t5xxl): "
            "connect a FLUX CLIP (e.g. DualCLIPLoader with type 'flux', or the FLUX checkpoint's CLIP)."
        )
    return modules


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"FLUX maps do not fold into weights ({module_name!r}: block outputs and FLUX's LayerNorms have no "
        "weights to absorb them), so they cannot be exported as a LoRA; apply them with hooks."
    )


FLUX = ModelFamily(
    name="flux",
    display_name="FLUX.1",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="sigma (= timestep / 1000 in diffusers' FLUX pipelines): 1 = pure noise",
    lora_key=lora_key,
    cfg_batch=False,  # dev embeds its guidance scale, schnell has none: every row is the prompt's
    max_sequence_length=(512, 512),
    diffusers_pipelines=("FluxPipeline",),
    diffusers_denoisers=("FluxTransformer2DModel",),
    diffusers_adapter="act_core.diffusers.flux",
    diffusers_modules=component_modules,
    comfy_denoisers=("Flux",),
    comfy_denoiser_modules=comfy_transformer_modules,
    comfy_clip_modules=comfy_clip_modules,
    comfy_clip_parts=COMFY_CLIP_PARTS,
    comfy_timestep_scale=1.0,  # ComfyUI's flow model_sampling.timestep(sigma) is sigma
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px):
    # FLUX.1-dev's (512 T5 tokens; schnell's 256)
    activation_memory=ActivationMemory(58_300_000, 26_500, 23_700_000, 9_510, 3072),
)
FAMILY = FLUX
