"""Qwen-Image (diffusers ``QwenImagePipeline`` / ``QwenImageTransformer2DModel``; ComfyUI's
``comfy.ldm.qwen_image``): parts, presets and module names.

Parts: ``transformer`` (the denoiser: 60 double-stream MMDiT blocks in Qwen-Image) and ``text_encoder``
(Qwen2.5-VL; the pipeline wraps the prompt in a chat template, runs the encoder with its attention mask and
keeps the last hidden states after the template's first 34 tokens). Canonical names are the diffusers module
paths plus two *streams* per block, elements of its tuple output:

    transformer.transformer_blocks.3:text    # a block's text-token output (encoder_hidden_states)
    transformer.transformer_blocks.3:image   # its image-token output (hidden_states)

Both hosts' ``QwenImageTransformerBlock`` return ``(encoder_hidden_states, hidden_states)`` and ComfyUI's
Qwen-Image model has diffusers' module paths (its checkpoints are diffusers-keyed), so the names are the same
modules in both hosts and a map fitted in either applies in the other.

Default preset, and why: the prompt reaches the transformer by ONE route. There is no pooled text vector:
``time_text_embed`` (despite its name) embeds the timestep alone, and every block's modulation
(``img_mod`` / ``txt_mod``) and the output norm (``norm_out``) read that embedding only. The encoder's
hidden states enter through ``txt_norm`` and ``txt_in`` into the blocks' text stream, and reach the image
tokens through each block's joint attention. So the default ``transformer_blocks`` hooks the text and image
outputs of every block: the text stream carries the prompt, the image stream what the prompt did to the image
(as on Chroma, FLUX's reference setup without the pooled vector). The last block's text output is read by
nothing (the transformer projects only the image stream after it), so it is not a module; ``txt_in`` is the
entry of the same route one block earlier (the first block's text output carries it), so it is not hooked
separately. ``transformer_norms`` hooks the LayerNorms before each block's modulation instead.

CFG rows: QwenImagePipeline's "true CFG" runs when ``true_cfg_scale > 1`` AND a negative prompt is given,
as two transformer calls a step (the prompt's first, then the negative prompt's), and rescales the guided
prediction to the norm of the prompt's. Fitting follows that trajectory with ``[uncond; target; source;
plain source]`` rows in one call (``act_core.diffusers.qwenimage``), the uncond rows un-steered, so the maps
steer the prompt's branch: ``cfg_rows="cond"``, ``cfg_calls="separate"`` (the diffusers step gate steers the
first call at each noise level). A fit's ``guidance_scale`` is the pipeline's ``true_cfg_scale`` (the
adapter's ``guidance_parameter``); without a negative prompt the pipeline, and so the fit, runs unguided.

No text-encoder preset: the pipeline's template puts a fixed system prompt before the user's (the first
``<|im_end|>`` ends it), so pooling the encoder's tokens up to the first EOS, as the text-encoder fits of the
other families do, would see the template only. No map folds (block outputs have no weights to absorb a map,
the blocks' LayerNorms have no affine parameters), so Qwen-Image has no LoRA export.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import ACTInputError
from ..presets import Preset
from ..recording import OutputOf
from .base import ActivationMemory, KeyTable, ModelFamily
from .flux import DIFFUSERS_STREAMS, IMAGE, TEXT, trajectory_preset

TRANSFORMER, TEXT_ENCODER = "transformer", "text_encoder"
PARTS = (TRANSFORMER, TEXT_ENCODER)
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)$")
BLOCK_STREAMS = ("transformer_blocks.*:text", "transformer_blocks.*:image")
# The LayerNorms before each block's modulation (no affine parameters): the same paths in both hosts.
BLOCK_NORMS = ("img_norm1", "txt_norm1", "img_norm2", "txt_norm2")

PRESETS: dict[str, Preset] = {
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The text and image output streams of every transformer block, fitted along your sampler's (guided) "
        "trajectory: the one route by which Qwen-Image's prompt reaches the transformer (its modulation sees "
        "the timestep only).",
        BLOCK_STREAMS,
        cfg_rows="cond",  # fitted with un-steered uncond rows: the maps steer the prompt's branch
    ),
    "transformer_norms": trajectory_preset(
        "transformer_norms",
        "The LayerNorms before every block's modulation (image and text streams), fitted along your "
        "sampler's (guided) trajectory.",
        tuple(f"transformer_blocks.*.{norm}" for norm in BLOCK_NORMS),
        cfg_rows="cond",
    ),
}
DEFAULT_PRESET = "transformer_blocks"


def _block_width(block: nn.Module) -> int:
    return int(block.img_norm1.normalized_shape[-1])


def _with_streams(part: str, root: nn.Module, streams: dict[str, int]) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of ``root`` under ``part``, plus each block's streams (``streams``: stream ->
    index in the block's tuple output); the last block has no text stream (nothing reads it)."""
    modules: dict[str, nn.Module | OutputOf] = {}
    blocks = [path for path, _ in root.named_modules() if _BLOCK.match(path)]
    last = blocks[-1] if blocks else None
    for path, module in root.named_modules():
        if not path:
            continue
        name = f"{part}.{path}"
        modules[name] = module
        if part == TRANSFORMER and _BLOCK.match(path):
            for stream, index in streams.items():
                if stream == TEXT and path == last:
                    continue
                modules[f"{name}:{stream}"] = OutputOf(module, index, _block_width(module))
    return modules


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of a diffusers Qwen-Image component by canonical name, plus the blocks' streams."""
    if part not in PARTS:
        raise ACTInputError(f"Unknown Qwen-Image part {part!r}; expected one of {PARTS}.")
    return _with_streams(part, component, {TEXT: DIFFUSERS_STREAMS[TEXT], IMAGE: DIFFUSERS_STREAMS[IMAGE]})


def comfy_transformer_modules(
    diffusion_model: nn.Module, key_table: KeyTable | None = None
) -> dict[str, nn.Module | OutputOf]:
    """ComfyUI's Qwen-Image model (``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``) under canonical
    names: its module paths are diffusers' (``transformer_blocks.N.img_norm1``, ...), and its blocks return
    ``(encoder_hidden_states, hidden_states)`` as diffusers' do."""
    if not hasattr(diffusion_model, "transformer_blocks"):
        raise ACTInputError("This model has no transformer_blocks: it is not a ComfyUI Qwen-Image model.")
    return _with_streams(TRANSFORMER, diffusion_model, {TEXT: 0, IMAGE: 1})


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"Qwen-Image maps do not fold into weights ({module_name!r}: block outputs and Qwen-Image's LayerNorms "
        "have no weights to absorb them), so they cannot be exported as a LoRA; apply them with hooks."
    )


QWEN_IMAGE = ModelFamily(
    name="qwenimage",
    display_name="Qwen-Image",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="sigma (= timestep / 1000 in diffusers' QwenImagePipeline): 1 = pure noise",
    lora_key=lora_key,
    cfg_batch=True,  # true CFG with a negative prompt (fitted as uncond rows; see the docstring)
    cfg_calls="separate",  # QwenImagePipeline: the prompt's transformer call, then the negative prompt's
    # QwenImagePipeline's default prompt length (after the template), and the most it accepts
    max_sequence_length=(512, 1024),
    diffusers_pipelines=("QwenImagePipeline",),
    diffusers_denoisers=("QwenImageTransformer2DModel",),
    diffusers_adapter="act_core.diffusers.qwenimage",
    diffusers_modules=component_modules,
    comfy_denoisers=("QwenImageTransformer2DModel",),
    comfy_denoiser_modules=comfy_transformer_modules,
    comfy_timestep_scale=1.0,  # ComfyUI's Qwen-Image samples flow with multiplier 1: timestep(sigma) = sigma
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px): Qwen-Image, 512 caption tokens
    activation_memory=ActivationMemory(44_200_000, 23_400, 26_900_000, 12_600, 3072),
)
FAMILY = QWEN_IMAGE
