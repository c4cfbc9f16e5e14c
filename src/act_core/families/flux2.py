"""FLUX.2 (diffusers ``Flux2Pipeline`` / ``Flux2Transformer2DModel``): parts, presets and module names.

Parts: ``transformer`` (the denoiser: 8 double and 48 single blocks in FLUX.2 [dev]) and ``text_encoder``
(Mistral Small 3.1, ``Mistral3ForConditionalGeneration``; the pipeline wraps the prompt in a chat template
after a fixed system message, runs the encoder with its attention mask and stacks its hidden states 10, 20
and 30 along features). Canonical names are the diffusers module paths plus FLUX.1's stream names:

    transformer.transformer_blocks.3:text           # a double block's text-token output
    transformer.transformer_blocks.3:image          # its image-token output
    transformer.single_transformer_blocks.7:joint   # a single block's output, text and image tokens

``Flux2TransformerBlock`` returns ``(encoder_hidden_states, hidden_states)`` as FLUX.1's does; the model runs
``Flux2SingleTransformerBlock`` on the joined tokens (``encoder_hidden_states=None``), so a single block returns
the joined tensor itself and its joint stream is the block's output.

Default preset, and why: the prompt reaches the transformer by ONE route. FLUX.1 also feeds CLIP's pooled
vector into every block's modulation (``time_text_embed.text_embedder``); FLUX.2 has no pooled text vector:
``time_guidance_embed`` embeds the timestep and the distilled guidance scale only, and the modulations shared
by all blocks (``double_stream_modulation_img`` / ``_txt``, ``single_stream_modulation``) and ``norm_out``
read that embedding alone. The stacked encoder states enter through ``context_embedder`` into the double
blocks' text stream, reach the image tokens through each block's joint attention, and, joined with the image
tokens, run through the single blocks: that is the only route. So the default ``transformer_blocks`` hooks
the text and image outputs of every double block and the joint output of every single block (FLUX.1's
reference setup without the pooled vector, as on Chroma). ``context_embedder`` is the entry of the same route
one block earlier (the first double block's text output already carries it), so it is not hooked separately.
``transformer_norms`` hooks the LayerNorms before each modulation instead (``norm1`` / ``norm1_context`` /
``norm2`` / ``norm2_context``, the single blocks' ``norm``; plain LayerNorms in FLUX.2, not FLUX.1's
``AdaLayerNormZero.norm``).

CFG rows: Flux2Pipeline runs no CFG. FLUX.2 [dev] is guidance-distilled: its ``guidance_scale`` (default 4)
is embedded (``guidance_embedder``) like FLUX.1 [dev]'s, and every transformer call is one call on the
prompt's rows. So ``cfg_batch=False`` and the maps steer every row (``cfg_rows="all"``).

No text-encoder preset: the template puts a fixed system message before the prompt, so pooling the encoder's
tokens up to the first EOS, as the text-encoder fits of the other families do, would mostly see the template
(as on Qwen-Image). Prompt length: ``max_sequence_length`` (default 512, the length FLUX.2 was trained with;
the pipeline truncates the templated prompt to it). No map folds (block outputs have no weights to absorb a
map, FLUX.2's LayerNorms have no affine parameters), so FLUX.2 has no LoRA export.

Hosts: diffusers only (ComfyUI 0.3.64 has no FLUX.2 model). ``Flux2KleinPipeline`` (FLUX.2 [klein]: a Qwen3
prompt and real CFG as two calls a step) shares the transformer class but not this family's sampling; its
adapter refuses it (``act_core.diffusers.flux2``).
"""

from __future__ import annotations

from torch import nn

from ..errors import ACTInputError
from ..presets import Preset
from ..recording import OutputOf
from .base import ActivationMemory, ModelFamily
from .flux import joined_block_modules, trajectory_preset

TRANSFORMER, TEXT_ENCODER = "transformer", "text_encoder"
PARTS = (TRANSFORMER, TEXT_ENCODER)
BLOCK_STREAMS = (
    "transformer_blocks.*:text",
    "transformer_blocks.*:image",
    "single_transformer_blocks.*:joint",
)
BLOCK_NORMS = (
    "transformer_blocks.*.norm1",
    "transformer_blocks.*.norm1_context",
    "transformer_blocks.*.norm2",
    "transformer_blocks.*.norm2_context",
    "single_transformer_blocks.*.norm",
)

PRESETS: dict[str, Preset] = {
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The output streams of every transformer block (double blocks: text and image; single blocks: the "
        "joint stream), fitted along your sampler's trajectory: the one route by which FLUX.2's prompt reaches "
        "the transformer (its modulation sees the timestep and guidance only).",
        BLOCK_STREAMS,
    ),
    "transformer_norms": trajectory_preset(
        "transformer_norms",
        "The LayerNorms before every block's modulation (both streams of the double blocks, the single "
        "blocks'), fitted along your sampler's trajectory.",
        BLOCK_NORMS,
    ),
}
DEFAULT_PRESET = "transformer_blocks"


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of a diffusers FLUX.2 component by canonical name, plus the blocks' streams."""
    return joined_block_modules(part, component, PARTS, "FLUX.2")


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"FLUX.2 maps do not fold into weights ({module_name!r}: block outputs and FLUX.2's LayerNorms have "
        "no weights to absorb them), so they cannot be exported as a LoRA; apply them with hooks."
    )


FLUX2 = ModelFamily(
    name="flux2",
    display_name="FLUX.2",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="sigma (= timestep / 1000 in diffusers' Flux2Pipeline): 1 = pure noise",
    lora_key=lora_key,
    cfg_batch=False,  # guidance-distilled: the scale is embedded, every row is the prompt's
    max_sequence_length=(512, 512),  # Flux2Pipeline's default, the length FLUX.2 was trained with
    diffusers_pipelines=("Flux2Pipeline",),
    diffusers_denoisers=("Flux2Transformer2DModel",),
    diffusers_adapter="act_core.diffusers.flux2",
    diffusers_modules=component_modules,
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px): FLUX.2 [dev]
    activation_memory=ActivationMemory(156_000_000, 65_100, 54_800_000, 19_100, 6144),
)
FAMILY = FLUX2
