"""Lumina 2 (diffusers ``Lumina2Pipeline`` / ``Lumina2Transformer2DModel``; ComfyUI's NextDiT,
``comfy.ldm.lumina.model``): parts, presets and module names. ComfyUI's NextDiT also serves Z-Image.

Parts: ``transformer`` (the denoiser, a single-stream DiT: 26 main blocks in Lumina-Image-2.0, 2 noise and 2
context refiner blocks). The text encoder (Gemma 2) is not a part: no preset hooks it (the pipeline puts a
fixed system prompt before the user's, so pooling its tokens would mostly see the system prompt, as on
Qwen-Image). Canonical names are the diffusers module paths plus one *stream* per block, the block's output
(one tensor, so the stream is the block itself):

    transformer.layers.3:joint             # a main block's output: caption and image tokens, one sequence
    transformer.context_refiner.1:text     # a context refiner block's output: the caption tokens
    transformer.noise_refiner.1:image      # a noise refiner block's output: the image tokens

Routes by which the prompt reaches the transformer (read off both hosts' code): the caption tokens (Gemma's
hidden states) pass ``time_caption_embed.caption_embedder`` (ComfyUI ``cap_embedder``) and the context
refiner blocks (caption tokens only, no modulation), then join the image tokens in ONE sequence that every
main block (``layers``) attends over jointly. There is no pooled caption vector: the modulation (adaLN) of
the noise refiner, the main blocks and the output layer reads the timestep embedding alone, and the noise
refiner sees the image tokens alone. So the caption tokens are the prompt's only route, and everything the
prompt does passes the context refiner's output.

Default preset, and why: ``caption_stream``, the output of every context refiner block (the caption tokens
alone, before they join the image tokens), as Z-Image's default, argued from structure: Lumina 2 and Z-Image
are the same NextDiT (ComfyUI runs both on this class), with the same one route. ACT's maps are per channel
over every position of a module's output, and a main block's output is ONE sequence of caption and image
tokens, so a map there (``transformer_blocks``) shares each channel's transport between the caption tokens
and the image tokens' values. On the trained Z-Image-architecture shapes model that joint stream under-steers
every harness task at lambda 1 (0/4) and the caption stream passes them all (4/4; ``families/zimage.py``,
docs/demo_model.md). No Lumina 2 model was trained here: on Lumina 2 itself this is not measured. In ComfyUI
this default is also the one Z-Image checkpoints get (they load as NextDiT, this family's class). Lumina 2
puts a long fixed system prompt before the user's; its tokens are part of the caption stream (as they are of
the joint stream), so a map is fitted on them too. ``transformer_blocks`` (every main block's joint output)
and ``transformer_norms`` (the RMSNorms before each main block's modulation) are the other presets.

The noise level: diffusers' Lumina2Pipeline passes ``1 - sigma`` to the transformer ("Lumina uses t=0 as the
noise"), so its adapter declares the timestep reversed and the diffusers step gate reads the noise level as
``1 - timestep`` (1 = pure noise, as everywhere in ACT). ComfyUI's model_sampling gives the NextDiT ``sigma``
(it computes ``1 - t`` itself): ``comfy_timestep_scale`` 1.

CFG rows: Lumina2Pipeline does real CFG (``guidance_scale > 1``, negative prompt "" by default) as two
transformer calls a step, the prompt's first, then the negative prompt's, and rescales the guided
prediction to the prompt's norm (``cfg_normalization``). Fitting follows that trajectory with ``[uncond;
target; source; plain source]`` rows in one call (``act_core.diffusers.lumina2``), the uncond rows
un-steered: ``cfg_rows="cond"``, ``cfg_calls="separate"``. ComfyUI batches the conds itself.

ComfyUI: ``NextDiT`` (``model_base.Lumina2``) has the original Lumina module tree: ``layers.N``,
``context_refiner.N``, ``noise_refiner.N``, ``cap_embedder``, the blocks' ``attention_norm1`` /
``ffn_norm1`` (diffusers' ``norm1.norm`` / ``ffn_norm1``). Newer ComfyUI loads Z-Image checkpoints as
``class ZImage(Lumina2)`` (``image_model: "lumina2"``, dim 3840): the same NextDiT class and module tree, so
this family's ComfyUI mapping is what steers Z-Image there (a map fitted with the Fit node on a Z-Image
checkpoint is a ``lumina2`` map; ``tests/comfyui/test_comfy_lumina2.py`` pins that the Z-Image diffusers
transformer's preset modules are NextDiT's modules of the same paths). No map folds (block outputs have no
weights to absorb a map), so Lumina 2 has no LoRA export.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import ACTInputError
from ..presets import Preset
from ..recording import OutputOf
from .base import ActivationMemory, KeyTable, ModelFamily
from .flux import IMAGE, JOINT, TEXT, trajectory_preset

TRANSFORMER = "transformer"
PARTS = (TRANSFORMER,)
# Block lists and the stream each block's output is.
BLOCK_LISTS = {"layers": JOINT, "context_refiner": TEXT, "noise_refiner": IMAGE}
BLOCK_PATH = re.compile(r"^(layers|context_refiner|noise_refiner)\.(\d+)$")
BLOCK_STREAMS = ("layers.*:joint",)
CAPTION_STREAMS = ("context_refiner.*:text",)  # the caption tokens alone
# diffusers norm path inside a block -> ComfyUI's. A block with modulation wraps its first norm in
# LuminaRMSNormZero (``norm1.norm``); one without, the context refiner's, has it as ``norm1``.
COMFY_NORMS = {"norm2": "attention_norm2", "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2"}
COMFY_FIRST_NORM = "attention_norm1"
CAPTION_EMBEDDER = ("time_caption_embed.caption_embedder", "cap_embedder")

PRESETS: dict[str, Preset] = {
    "caption_stream": trajectory_preset(
        "caption_stream",
        "The output of every context refiner block (the caption tokens alone, before they join the image "
        "tokens), fitted along your sampler's guided trajectory: the prompt's one route into the NextDiT "
        "transformer of Lumina 2 and Z-Image (its modulation does not see the prompt), where no image token "
        "shares the map.",
        CAPTION_STREAMS,
        cfg_rows="cond",  # fitted with un-steered uncond rows: the maps steer the prompt's branch
    ),
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The output of every main transformer block (the joint sequence of caption and image tokens), fitted "
        "along your sampler's guided trajectory.",
        BLOCK_STREAMS,
        cfg_rows="cond",
    ),
    "transformer_norms": trajectory_preset(
        "transformer_norms",
        "The RMSNorms before every main block's modulation (attention and feed-forward), fitted along your "
        "sampler's guided trajectory.",
        ("layers.*.norm1.norm", "layers.*.ffn_norm1"),
        cfg_rows="cond",
    ),
}
DEFAULT_PRESET = "caption_stream"


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of the diffusers Lumina 2 transformer by canonical name, plus the blocks'
    streams (each block's output is one tensor: the stream is the block)."""
    return nextdit_modules(part, component, PARTS, "Lumina 2")


def nextdit_modules(
    part: str, component: nn.Module, parts: tuple[str, ...], label: str
) -> dict[str, nn.Module | OutputOf]:
    """The NextDiT module tree by canonical name (Lumina 2's and Z-Image's): every submodule, plus each main,
    context-refiner and noise-refiner block as its stream (``layers.N:joint`` ...)."""
    if part not in parts:
        raise ACTInputError(f"Unknown {label} part {part!r}; expected one of {parts}.")
    modules: dict[str, nn.Module | OutputOf] = {}
    for path, module in component.named_modules():
        if not path:
            continue
        modules[f"{part}.{path}"] = module
        match = BLOCK_PATH.match(path)
        if match:
            modules[f"{part}.{path}:{BLOCK_LISTS[match.group(1)]}"] = module
    return modules


def comfy_transformer_modules(
    diffusion_model: nn.Module, key_table: KeyTable | None = None
) -> dict[str, nn.Module | OutputOf]:
    """ComfyUI's ``NextDiT`` (Lumina 2, and Z-Image in newer ComfyUI) under canonical names: the blocks'
    streams, their norms and the caption embedder."""
    modules: dict[str, nn.Module | OutputOf] = {}
    if hasattr(diffusion_model, CAPTION_EMBEDDER[1]):
        modules[f"{TRANSFORMER}.{CAPTION_EMBEDDER[0]}"] = getattr(diffusion_model, CAPTION_EMBEDDER[1])
    for blocks, stream in BLOCK_LISTS.items():
        for i, block in enumerate(getattr(diffusion_model, blocks, None) or []):
            base = f"{TRANSFORMER}.{blocks}.{i}"
            modules[f"{base}:{stream}"] = block
            first = "norm1.norm" if getattr(block, "modulation", False) else "norm1"
            for diffusers_path, comfy_path in ((first, COMFY_FIRST_NORM), *COMFY_NORMS.items()):
                norm = getattr(block, comfy_path, None)
                if isinstance(norm, nn.Module):
                    modules[f"{base}.{diffusers_path}"] = norm
    if not any(name.endswith(f":{JOINT}") for name in modules):
        raise ACTInputError("This model has no NextDiT blocks (layers): it is not a ComfyUI Lumina 2 model.")
    return modules


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"Lumina 2 maps do not fold into weights ({module_name!r}: per-step maps on block outputs), so they "
        "cannot be exported as a LoRA; apply them with hooks."
    )


LUMINA2 = ModelFamily(
    name="lumina2",
    display_name="Lumina 2",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="sigma (Lumina2Pipeline passes 1 - sigma to its transformer; ComfyUI sigma): 1 = pure noise",
    lora_key=lora_key,
    cfg_batch=True,  # real CFG with a negative prompt (fitted as uncond rows; see the docstring)
    cfg_calls="separate",  # Lumina2Pipeline: the prompt's transformer call, then the negative prompt's
    # Lumina2Pipeline's default; the caption RoPE axis of Lumina-Image-2.0 holds 300 positions, the image
    # tokens taking the one after the caption
    max_sequence_length=(256, 299),
    diffusers_pipelines=("Lumina2Pipeline",),
    diffusers_denoisers=("Lumina2Transformer2DModel",),
    diffusers_adapter="act_core.diffusers.lumina2",
    diffusers_modules=component_modules,
    comfy_denoisers=("NextDiT",),
    comfy_denoiser_modules=comfy_transformer_modules,
    comfy_timestep_scale=1.0,  # ComfyUI's flow model_sampling.timestep(sigma) is sigma
    comfy_batched_prompts=False,  # NextDiT takes each prompt's token count (num_tokens)
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px): Lumina-Image-2.0
    activation_memory=ActivationMemory(33_800_000, 30_400, 10_200_000, 7_330, 2304),
)
FAMILY = LUMINA2
