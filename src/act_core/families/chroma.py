"""Chroma (diffusers ``ChromaPipeline`` / ``ChromaTransformer2DModel``): parts, presets and module names.

Chroma is FLUX.1-schnell's architecture with a T5-only prompt and real CFG. Parts: ``transformer`` (the
denoiser: 19 double and 38 single blocks in Chroma1) and ``text_encoder`` (T5, run with its attention
mask). Canonical names are the diffusers module paths plus FLUX's stream names:

    transformer.transformer_blocks.3:text           # a double block's text-token output
    transformer.transformer_blocks.3:image          # its image-token output
    transformer.single_transformer_blocks.7:joint   # a single block's output, text and image tokens

``ChromaTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)`` as FLUX's does, but
``ChromaSingleTransformerBlock`` returns the joined tokens as one tensor (as ComfyUI's FLUX single block
does), so the joint stream is that block's output itself.

Default preset, and why: the prompt reaches the transformer by ONE route. FLUX also feeds CLIP's pooled
vector into every block's modulation (``time_text_embed.text_embedder``); Chroma has no CLIP and its
modulation comes from ``distilled_guidance_layer`` (the approximator) applied to
``time_text_embed(timestep)``, whose inputs are the timestep, a guidance input fixed at 0 and a constant
index table: it does not see the prompt. T5's tokens enter through ``context_embedder`` into the double
blocks' text stream and, joined with the image tokens, the single blocks' stream; that is the only route.
So the default ``transformer_blocks`` hooks the text and image outputs of every double block and the joint
output of every single block (FLUX's reference setup without the pooled vector). ``context_embedder`` is
the entry of the same route one block earlier (the first double block's text output already carries it),
so it is not hooked separately.

CFG rows: ChromaPipeline does real CFG, with the negative prompt ("" by default) when
``guidance_scale > 1``. Fitting therefore follows the guided trajectory with ``[uncond; target; source;
plain source]`` rows in one transformer call (``cfg_batch=True``; ``act_core.diffusers.chroma``), the
uncond rows un-steered, so the maps are fitted to steer the prompt's branch only: ``cfg_rows="cond"``, as
SD3's. ChromaPipeline, however, does not sample with a CFG batch: at every step it calls the transformer
twice, first on the prompt's rows, then on the negative prompt's. ``cfg_calls="separate"`` tells the
diffusers step gate so: with guidance on it steers the first call at each noise level (the prompt's) and
leaves the second alone; with ``guidance_scale <= 1`` there is no uncond call and every row is steered, as
fitted.

No map folds (block outputs have no weights to absorb a map, Chroma's LayerNorms have no affine
parameters, T5's RMSNorm no bias), so Chroma has no LoRA export.

ComfyUI: ``MODEL.model.diffusion_model`` is a ``Chroma`` (``comfy.ldm.chroma.model``; not a subclass of
ComfyUI's ``Flux``, and told apart from it by that class name). Its ``double_blocks`` / ``single_blocks``
are laid out as ComfyUI's FLUX blocks: a double block returns ``(img, txt)``, a single block the joined
tokens, with the same norms (``img_norm1`` ..., ``pre_norm``), so FLUX's ComfyUI name map gives diffusers'
Chroma names (Chroma has no pooled-text ``vector_in``). Its flow ``model_sampling.timestep(sigma)`` is
sigma (diffusers' timestep / 1000). Text encoder: ComfyUI's Chroma CLIP (``pixart_te``) holds T5 as
``t5xxl``, whose ``.transformer`` has the transformers module paths of ``text_encoder``. ComfyUI batches CFG
as ``[uncond; cond]`` rows of one call (``cond_or_uncond``), so maps steer the cond rows there directly.
"""

from __future__ import annotations

from torch import nn

from ..apply_modes import APPLY_PER_ELEMENT
from ..errors import ACTInputError, ACTModelMismatchError
from ..presets import Preset
from ..recording import OutputOf
from .base import ActivationMemory, KeyTable, ModelFamily
from .flux import comfy_transformer_modules as flux_comfy_transformer_modules
from .flux import joined_block_modules, trajectory_preset

TRANSFORMER, TEXT_ENCODER = "transformer", "text_encoder"
PARTS = (TRANSFORMER, TEXT_ENCODER)
# Text-encoder part -> the encoder's attribute on ComfyUI's Chroma CLIP (``pixart_te``: T5 alone).
COMFY_CLIP_PARTS = {TEXT_ENCODER: "t5xxl"}
BLOCK_STREAMS = (
    "transformer_blocks.*:text",
    "transformer_blocks.*:image",
    "single_transformer_blocks.*:joint",
)


PRESETS: dict[str, Preset] = {
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The output streams of every transformer block (double blocks: text and image; single blocks: the "
        "joint stream), fitted along your sampler's guided trajectory: the one route by which Chroma's T5 "
        "prompt reaches the transformer (its modulation does not see the prompt).",
        BLOCK_STREAMS,
        cfg_rows="cond",  # fitted with un-steered uncond rows: the maps steer the prompt's branch
    ),
    "transformer_norms": trajectory_preset(
        "transformer_norms",
        "The LayerNorms before every block's modulation (both streams of the double blocks, the single "
        "blocks'), fitted along your sampler's guided trajectory.",
        (
            "transformer_blocks.*.norm1.norm",
            "transformer_blocks.*.norm1_context.norm",
            "transformer_blocks.*.norm2",
            "transformer_blocks.*.norm2_context",
            "single_transformer_blocks.*.norm.norm",
        ),
        cfg_rows="cond",
    ),
    "text_encoder_norms": Preset(
        "text_encoder_norms",
        "The layer norms of T5 (no transformer pass while fitting: fast).",
        {TEXT_ENCODER: ("*layer_norm*",)},
        apply_mode=APPLY_PER_ELEMENT,
        types=(nn.Module,),
    ),
}
DEFAULT_PRESET = "transformer_blocks"


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of a diffusers Chroma component by canonical name, plus the blocks' streams."""
    return joined_block_modules(part, component, PARTS, "Chroma")


def comfy_transformer_modules(
    diffusion_model: nn.Module, key_table: KeyTable | None = None
) -> dict[str, nn.Module | OutputOf]:
    """ComfyUI's ``Chroma`` (``double_blocks`` / ``single_blocks``, FLUX's layout) under diffusers' names."""
    if not len(getattr(diffusion_model, "double_blocks", ())) and not len(
        getattr(diffusion_model, "single_blocks", ())
    ):
        raise ACTInputError(
            "This model has no double_blocks / single_blocks: it is not a ComfyUI Chroma model."
        )
    return flux_comfy_transformer_modules(diffusion_model, key_table)


def comfy_clip_modules(cond_stage_model: nn.Module) -> dict[str, nn.Module]:
    """ComfyUI's Chroma text encoder (``CLIP.cond_stage_model.t5xxl``) under canonical names:
    ``t5xxl.transformer.<path>`` is ``text_encoder.<path>``."""
    modules: dict[str, nn.Module] = {}
    for part, clip_name in COMFY_CLIP_PARTS.items():
        transformer = getattr(getattr(cond_stage_model, clip_name, None), "transformer", None)
        if isinstance(transformer, nn.Module):
            modules.update({f"{part}.{path}": module for path, module in transformer.named_modules() if path})
    if not modules:
        raise ACTModelMismatchError(
            f"This CLIP ({type(cond_stage_model).__name__}) has no T5 (t5xxl), Chroma's text encoder: connect a "
            "Chroma CLIP (e.g. CLIPLoader with type 'chroma')."
        )
    return modules


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"Chroma maps do not fold into weights ({module_name!r}: block outputs and Chroma's LayerNorms have "
        "no weights to absorb them), so they cannot be exported as a LoRA; apply them with hooks."
    )


CHROMA = ModelFamily(
    name="chroma",
    display_name="Chroma",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="sigma (= timestep / 1000 in diffusers' Chroma pipelines): 1 = pure noise",
    lora_key=lora_key,
    cfg_batch=True,  # real CFG with a negative prompt (fitted as uncond rows; see the docstring)
    cfg_calls="separate",  # ChromaPipeline: the prompt's transformer call, then the negative prompt's
    max_sequence_length=(512, 512),  # ChromaPipeline's default, and the most it accepts
    diffusers_pipelines=("ChromaPipeline",),
    diffusers_denoisers=("ChromaTransformer2DModel",),
    diffusers_adapter="act_core.diffusers.chroma",
    diffusers_modules=component_modules,
    comfy_denoisers=("Chroma",),
    comfy_denoiser_modules=comfy_transformer_modules,
    comfy_clip_modules=comfy_clip_modules,
    comfy_clip_parts=COMFY_CLIP_PARTS,
    comfy_timestep_scale=1.0,  # ComfyUI's flow model_sampling.timestep(sigma) is sigma
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px): Chroma1-HD
    activation_memory=ActivationMemory(59_100_000, 26_800, 24_600_000, 11_400, 3072),
)
FAMILY = CHROMA
