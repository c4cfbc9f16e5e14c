"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``): parts, presets and module names.

Parts: ``transformer`` (the MMDiT denoiser), ``text_encoder`` (CLIP-L), ``text_encoder_2`` (CLIP-G) and
``text_encoder_3`` (T5). As in FLUX, the prompt reaches the transformer by two routes: the token sequence
(both CLIPs' hidden states and T5's, through every block's text stream) and the pooled vector (both CLIPs'
projections, through ``time_text_embed.text_embedder`` into every block's modulation), and the default
preset hooks both. Each ``JointTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``, the
streams ``transformer_blocks.N:text`` / ``:image``; the last block is ``context_pre_only`` (its text output
is ``None``), so it has an image stream only. SD3 samples with CFG, so maps steer the cond rows. Maps do
not fold (no LoRA export).

ComfyUI: ``MODEL.model.diffusion_model`` is an ``OpenAISignatureMMDITWrapper`` (``comfy.ldm.modules.
diffusionmodules.mmdit``). Its ``joint_blocks.N`` (a ``JointBlock`` of a ``context_block`` and an ``x_block``)
return ``(context, x)`` as diffusers' blocks return ``(encoder_hidden_states, hidden_states)``: the same
streams at the same tuple indices (the last block's context is ``None``: it is ``pre_only``). Its
``y_embedder`` is diffusers' ``time_text_embed.text_embedder`` (the pooled-text MLP, same output), so the
names below are diffusers' and a map fitted in either host applies in the other. ComfyUI's SD3 samples a
discrete flow whose ``timestep(sigma)`` is ``1000 * sigma``, as diffusers' SD3 timestep. Text encoders:
ComfyUI's ``SD3ClipModel`` holds ``clip_l``, ``clip_g`` and ``t5xxl``, whose ``.transformer`` modules have
the transformers module paths of ``text_encoder``, ``text_encoder_2`` and ``text_encoder_3`` (SD3 has no
text-encoder preset; custom presets reach them).
"""

from __future__ import annotations

from torch import nn

from ..errors import ACTInputError, ACTModelMismatchError
from ..presets import Preset
from ..recording import OutputOf
from .base import ActivationMemory, KeyTable, ModelFamily
from .flux import IMAGE, POOLED_TEXT, TEXT, block_streams, trajectory_preset

TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3 = (
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
)
PARTS = (TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)
BLOCK_STREAMS = ("transformer_blocks.*:text", "transformer_blocks.*:image")
# ComfyUI's MMDiT: where its JointBlock puts each stream ((context, x), as diffusers' (text, image)), its
# pooled-text MLP, and the text encoders' attributes on its SD3ClipModel.
COMFY_BLOCK_STREAMS = {TEXT: 0, IMAGE: 1}
COMFY_POOLED_TEXT = "y_embedder"
COMFY_CLIP_PARTS = {TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "clip_g", TEXT_ENCODER_3: "t5xxl"}


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


def comfy_transformer_modules(
    diffusion_model: nn.Module, key_table: KeyTable | None = None
) -> dict[str, nn.Module | OutputOf]:
    """ComfyUI's SD3 MMDiT (``joint_blocks``, ``y_embedder``) under diffusers' canonical names."""
    blocks = getattr(diffusion_model, "joint_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ACTInputError("This model has no joint_blocks: it is not a ComfyUI SD3 (MMDiT) model.")
    modules: dict[str, nn.Module | OutputOf] = {}
    if isinstance(getattr(diffusion_model, COMFY_POOLED_TEXT, None), nn.Module):
        modules[f"{TRANSFORMER}.{POOLED_TEXT[0]}"] = getattr(diffusion_model, COMFY_POOLED_TEXT)
    width = int(diffusion_model.hidden_size)
    for i, block in enumerate(blocks):
        streams = (IMAGE,) if block.context_block.pre_only else (TEXT, IMAGE)
        for stream in streams:
            index = COMFY_BLOCK_STREAMS[stream]
            modules[f"{TRANSFORMER}.transformer_blocks.{i}:{stream}"] = OutputOf(block, index, width)
    return modules


def comfy_clip_modules(cond_stage_model: nn.Module) -> dict[str, nn.Module]:
    """ComfyUI's SD3 text encoders (``CLIP.cond_stage_model``: ``clip_l`` / ``clip_g`` / ``t5xxl``) under
    canonical names: ``<encoder>.transformer.<path>`` is ``text_encoder{,_2,_3}.<path>``. An encoder the
    CLIP lacks is left out (the map's compatibility check names it)."""
    modules: dict[str, nn.Module] = {}
    for part, clip_name in COMFY_CLIP_PARTS.items():
        transformer = getattr(getattr(cond_stage_model, clip_name, None), "transformer", None)
        if not isinstance(transformer, nn.Module):
            continue
        modules.update({f"{part}.{path}": module for path, module in transformer.named_modules() if path})
    if not modules:
        raise ACTModelMismatchError(
            f"This CLIP ({type(cond_stage_model).__name__}) has none of SD3's text encoders (clip_l, clip_g, "
            "t5xxl): connect an SD3 CLIP (e.g. TripleCLIPLoader, or the SD3 checkpoint's CLIP)."
        )
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
    comfy_denoisers=("OpenAISignatureMMDITWrapper",),
    comfy_denoiser_modules=comfy_transformer_modules,
    comfy_clip_modules=comfy_clip_modules,
    comfy_clip_parts=COMFY_CLIP_PARTS,
    comfy_timestep_scale=1000.0,  # ComfyUI's SD3 model_sampling.timestep(sigma) is 1000 * sigma
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px):
    # per unit of width, SD3.5 medium's (10.6 kB per latent px at width 1536) at SD3.5 large's width
    activation_memory=ActivationMemory(15_200_000, 17_100, 7_580_000, 2_490, 2432),
)
FAMILY = SD3
