"""Z-Image (diffusers ``ZImagePipeline`` / ``ZImageTransformer2DModel``): parts, presets and module names.

Z-Image is a single-stream DiT of the Lumina family (Z-Image and Z-Image-Turbo: 30 main blocks, 2 noise and
2 context refiner blocks, width 3840) with a Qwen3 text encoder. Parts: ``transformer`` (the denoiser). The
text encoder is not a part: no preset hooks it (the pipeline wraps the prompt in Qwen3's chat template, so
pooling its tokens would see the template, as on Qwen-Image). Canonical names are the diffusers module paths
plus one *stream* per block, the block's output (one tensor, so the stream is the block itself):

    transformer.layers.3:joint             # a main block's output: image and caption tokens, one sequence
    transformer.context_refiner.1:text     # a context refiner block's output: the caption tokens
    transformer.noise_refiner.1:image      # a noise refiner block's output: the image tokens

Routes by which the prompt reaches the transformer (read off ``ZImageTransformer2DModel.forward``): the
caption tokens (Qwen3's second-to-last hidden states, padding dropped) pass ``cap_embedder`` and the
context refiner blocks (caption tokens only, no modulation), then join the image tokens in ONE sequence
(``[image; caption]``, each padded to a multiple of 32 with learned pad tokens) that every main block
(``layers``) attends over jointly. There is no pooled caption vector: the modulation (adaLN) of the noise
refiner, the main blocks and the final layer reads ``t_embedder``'s timestep embedding alone. So the caption
tokens are the prompt's only route, and everything the prompt does passes the context refiner's output.

Default preset, and why: ``caption_stream``, the output of every context refiner block (the caption tokens
alone, before they join the image tokens). ACT's maps are per channel over every position of a module's
output; a main block's output is ONE sequence of image and caption tokens, so a map there is fitted on (and
applied to) both at once, and the caption tokens' transport shares its map with the image tokens' values. On
the trained Z-Image-architecture shapes model (``models/shapes-zimage``, docs/demo_model.md) the main blocks'
joint outputs (``transformer_blocks``) under-steer every harness task at lambda 1 (0/4: style 0.00, colour
0.01, red->yellow 0.28, negation 0.60), while the context refiner's output passes all four (4/4: 0.96 /
1.03 / 1.00 / 1.00), and passes them again when the map fitted at 20 steps is applied at 8; hooking the
refiner and the main blocks together also passes 4/4 but steers less on every task where the two differ
(style 0.91, outlined 0.06 vs 0.13, blue->orange 0.68 vs 0.76). The context refiners see neither the
timestep nor the image, so each step's map is fitted on the same caption activations (the steps differ
in what the steered captions do downstream, which the calibration measures). ``transformer_blocks`` (every main block's joint output) and
``transformer_norms`` (the RMSNorms before each main block's modulation) are the other presets.

The noise level: ZImagePipeline passes ``(1000 - t) / 1000 = 1 - sigma`` to the transformer, so its adapter
declares the timestep reversed and the diffusers step gate reads the noise level as ``1 - timestep``.

CFG rows: ZImagePipeline guides when ``guidance_scale > 0`` (Z-Image-Turbo runs with 0: no CFG, every row
the prompt's), as ``cond + guidance_scale * (cond - uncond)``, in ONE transformer call on ``[cond; uncond]``
(the prompt's rows first, unlike diffusers' usual ``[uncond; cond]``): ``cfg_calls="batch_cond_first"``.
Fitting puts ``[uncond; target; source; plain source]`` rows in one call (``act_core.diffusers.zimage``),
the uncond rows un-steered: ``cfg_rows="cond"``. The adapter's ``cfg_threshold`` 0 says when the pipeline
guides, and its guide rule is the pipeline's.

ComfyUI: newer ComfyUI loads Z-Image checkpoints as ``class ZImage(Lumina2)`` (``image_model: "lumina2"``,
dim 3840), a ``NextDiT``, the class ComfyUI 0.3.64 has for Lumina 2, with the same module tree as this
transformer (``layers.N``, ``context_refiner.N``, ``noise_refiner.N``, ``cap_embedder``, the blocks'
``attention_norm1`` / ``ffn_norm1``). There the ``lumina2`` family's ComfyUI mapping (tested on 0.3.64's
NextDiT) steers Z-Image: fit with the Fit node on the Z-Image checkpoint, and the map is a ``lumina2`` map.
A map fitted here in diffusers names the same modules (``tests/comfyui/test_comfy_lumina2.py`` pins the
names), but it is a ``zimage`` map, which ComfyUI does not take (this family has no ComfyUI fields: the
NextDiT class is Lumina 2's). The ``lumina2`` family's default is this one's (``caption_stream``, the same
modules), so a Z-Image checkpoint fitted in ComfyUI with the Fit node's default hooks what this family's
default hooks in diffusers. No map folds, so Z-Image has no LoRA export.
"""

from __future__ import annotations

from torch import nn

from ..errors import ACTInputError
from ..presets import Preset
from ..recording import OutputOf
from .base import ActivationMemory, ModelFamily
from .flux import trajectory_preset
from .lumina2 import BLOCK_STREAMS, CAPTION_STREAMS, nextdit_modules

TRANSFORMER = "transformer"
PARTS = (TRANSFORMER,)

PRESETS: dict[str, Preset] = {
    "caption_stream": trajectory_preset(
        "caption_stream",
        "The output of every context refiner block (the caption tokens alone, before they join the image "
        "tokens), fitted along your sampler's trajectory: the prompt's one route into Z-Image's transformer "
        "(its modulation does not see the prompt), where no image token shares the map.",
        CAPTION_STREAMS,
        cfg_rows="cond",  # with CFG, fitted with un-steered uncond rows: the maps steer the prompt's branch
    ),
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The output of every main transformer block (the joint sequence of image and caption tokens), fitted "
        "along your sampler's trajectory.",
        BLOCK_STREAMS,
        cfg_rows="cond",
    ),
    "transformer_norms": trajectory_preset(
        "transformer_norms",
        "The RMSNorms before every main block's modulation (attention and feed-forward), fitted along your "
        "sampler's trajectory.",
        ("layers.*.attention_norm1", "layers.*.ffn_norm1"),
        cfg_rows="cond",
    ),
}
DEFAULT_PRESET = "caption_stream"


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Every named submodule of the diffusers Z-Image transformer by canonical name, plus the blocks'
    streams (Lumina 2's NextDiT tree: ``lumina2.nextdit_modules``)."""
    return nextdit_modules(part, component, PARTS, "Z-Image")


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"Z-Image maps do not fold into weights ({module_name!r}: per-step maps on block outputs), so they "
        "cannot be exported as a LoRA; apply them with hooks."
    )


ZIMAGE = ModelFamily(
    name="zimage",
    display_name="Z-Image",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="sigma (ZImagePipeline passes 1 - sigma to its transformer): 1 = pure noise",
    lora_key=lora_key,
    cfg_batch=True,  # CFG when guidance_scale > 0 (Turbo: 0, no uncond rows)
    cfg_calls="batch_cond_first",  # ZImagePipeline: one call on [cond; uncond]
    # ZImagePipeline's default; the caption RoPE axis holds 1024 positions (the caption, padded to a
    # multiple of 32, from 1, and the image after it)
    max_sequence_length=(512, 992),
    diffusers_pipelines=("ZImagePipeline",),
    diffusers_denoisers=("ZImageTransformer2DModel",),
    diffusers_adapter="act_core.diffusers.zimage",
    diffusers_modules=component_modules,
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px):
    # Z-Image, diffusers' default configuration
    activation_memory=ActivationMemory(65_200_000, 30_400, 23_300_000, 9_900, 3840),
)
FAMILY = ZIMAGE
