"""Stable Diffusion XL, SD 1.x and SD 2.x: parts, presets, and module names in diffusers, ComfyUI and LoRAs.

A canonical module name is ``<part>.<path>``; part is ``unet``, ``text_encoder`` or ``text_encoder_2``
and path the diffusers / Hugging Face module path, with the text encoders always written with their
``text_model.`` prefix (transformers 5 dropped that submodule from ``CLIPTextModel`` but not from
``CLIPTextModelWithProjection``; maps must not depend on the transformers version)::

    unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1
    text_encoder.text_model.encoder.layers.0.layer_norm1
    text_encoder_2.text_model.encoder.layers.0.layer_norm1

ComfyUI names the same modules ``diffusion_model.<LDM path>``, ``clip_l.transformer.text_model...`` and
``clip_g.transformer.text_model...``. The UNet's diffusers <-> LDM path table comes from ComfyUI at run
time (``comfy.utils.unet_to_diffusers(unet_config)``, parameter keys); ``unet_module_table`` turns it
into a module table. Nothing here imports ComfyUI or diffusers.

SD 1.x and 2.x are this family: diffusers' ``StableDiffusionPipeline`` has the same ``UNet2DConditionModel``,
ComfyUI's SD15 / SD20 ``BaseModel`` the same ``UNetModel``, and the UNet's names come from the same table. They
have one CLIP encoder (``text_encoder``; ComfyUI's SD1 CLIP holds it as ``clip_l``), no pooled vector and no
``text_encoder_2``: a preset fitted whole hooks the parts the model has. SD 1.x reads the last layer's
normalised output, and diffusers' SD 2.x encoder ends at OpenCLIP-H's penultimate layer, so nothing is dead.
ComfyUI's SD 2.x CLIP holds OpenCLIP-H as ``clip_h`` (all 24 layers, read at the penultimate), which is not
named here: SD 2.x text-encoder maps are diffusers-only (its UNet maps work in both hosts and fold).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from ..apply_modes import APPLY_PER_ELEMENT
from ..errors import ACTInputError
from ..presets import Preset
from .base import ActivationMemory, KeyTable, ModelFamily

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
TEXT_MODEL_PREFIX = "text_model."
# ComfyUI's SDXL CLIP: clip_l is diffusers' text_encoder, clip_g is text_encoder_2.
COMFY_CLIP_PARTS = {TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "clip_g"}
COMFY_UNET_PREFIX = "diffusion_model."
# LoRA key prefixes: kohya's UNet prefix (followed by the LDM module path, dots as underscores) and the
# generic text-encoder prefix ComfyUI reads for every CLIP weight (followed by ComfyUI's state-dict path).
LORA_UNET_PREFIX = "lora_unet_"
LORA_TEXT_PREFIX = "text_encoders."
_PARAM_SUFFIXES = (".weight", ".bias")

# ------------------------------------------------------------------------------------------ presets
PRESETS: dict[str, Preset] = {
    "unet_norms": Preset(
        "unet_norms",
        "Every UNet *norm* module, Linear-AcT per element on every position's values, one map per denoising "
        "step fitted along the guided trajectory you sample with (exact causal, cond rows), each step "
        "calibrated on the UNet's output. The default: it steers models nobody tuned it for (docs/protocol.md).",
        {UNET: ("*norm*",)},
        support="unbounded",
        apply_mode=APPLY_PER_ELEMENT,
        protocol="trajectory",
        statistic="positions",
        calibrate=True,
    ),
    "unet_norms_first_step": Preset(
        "unet_norms_first_step",
        "The paper's SDXL protocol: every UNet *norm* module, Linear-AcT with source-range support, spatial "
        "mean on feature maps, statistics from the first denoising step only, one map for every step.",
        {UNET: ("*norm*",)},
    ),
    "text_encoder_norms": Preset(
        "text_encoder_norms",
        "LayerNorms of both CLIP text encoders (no UNet pass while fitting: fast).",
        {TEXT_ENCODER: ("*layer_norm*",), TEXT_ENCODER_2: ("*layer_norm*",)},
        apply_mode=APPLY_PER_ELEMENT,  # (B, T, C) outputs: per element either way; this keeps them foldable
    ),
    "text_encoder_and_unet_norms": Preset(
        "text_encoder_and_unet_norms",
        "LayerNorms of both CLIP encoders and every UNet *norm* module, unbounded support, each module "
        "fitted from the plain model at the first step (at once). Superseded by unet_norms.",
        {TEXT_ENCODER: ("*layer_norm*",), TEXT_ENCODER_2: ("*layer_norm*",), UNET: ("*norm*",)},
        support="unbounded",
        mode="at_once",
    ),
    "unet_norms_foldable": Preset(
        "unet_norms_foldable",
        "UNet *norm* modules, one unbounded per-element map for every step: can be fused into weights and "
        "exported as a LoRA. Weights act on every row of a CFG batch, so its hooks do too.",
        {UNET: ("*norm*",)},
        support="unbounded",
        apply_mode=APPLY_PER_ELEMENT,
        cfg_rows="all",
    ),
}
DEFAULT_PRESET = "unet_norms"


def dead_text_encoder_paths(part: str, num_hidden_layers: int, has_second_encoder: bool) -> tuple[str, ...]:
    """Canonical-path globs of text encoder modules whose output never reaches the UNet in SDXL.

    SDXL (two encoders) conditions on ``hidden_states[-2]`` (the output of the second-to-last layer). Text
    encoder 1's last layer and final LayerNorm are therefore dead; text encoder 2's still feed the pooled
    embedding. SD 1.x (one encoder) uses the last layer's normalised output: nothing is dead.
    """
    if part != TEXT_ENCODER or not has_second_encoder:
        return ()
    return (f"text_model.encoder.layers.{num_hidden_layers - 1}.*", "text_model.final_layer_norm")


# ------------------------------------------------------------------------------------------ diffusers names
def has_text_model(component: nn.Module) -> bool:
    """True for text encoders whose modules live under a ``text_model`` submodule."""
    return isinstance(getattr(component, "text_model", None), nn.Module)


def canonical_name(part: str, path: str, component: nn.Module | None = None) -> str:
    """Canonical name of module ``path`` of a diffusers component (``component`` tells the layout)."""
    if part == UNET:
        return f"{part}.{path}"
    if part not in PARTS:
        raise ACTInputError(f"Unknown model part {part!r}; expected one of {PARTS}.")
    if path.startswith(TEXT_MODEL_PREFIX) or (component is not None and has_text_model(component)):
        return f"{part}.{path}"
    return f"{part}.{TEXT_MODEL_PREFIX}{path}"


def component_modules(part: str, component: nn.Module) -> dict[str, nn.Module]:
    """Every named submodule of a diffusers component, keyed by canonical name."""
    return {
        canonical_name(part, path, component): module for path, module in component.named_modules() if path
    }


def lora_key(module_name: str, state_key: str | None = None) -> str:
    """LoRA-file key stem for a canonical module name; the exporter appends ``.diff`` / ``.diff_b``.

    ``state_key`` is the module's prefix in the original (LDM/SGM) checkpoint layout as ComfyUI names it
    (``comfy_state_keys``: ``diffusion_model.input_blocks.1.0.in_layers.0``). A UNet module then gets kohya's
    key, ``lora_unet_<LDM path, dots as underscores>``, which ComfyUI, Forge and A1111 all map onto that
    module; without one, its canonical name (``unet.<diffusers path>``), which ComfyUI and Forge read and
    A1111 does not. Text-encoder modules get ``text_encoders.clip_l.transformer.<path>`` (clip_g for encoder
    2), the one form ComfyUI reads for norms: its kohya ``lora_te1_`` / ``lora_te2_`` names cover attention
    and MLP linears only.
    """
    part, _, path = module_name.partition(".")
    if part not in PARTS or not path:
        raise ACTInputError(f"{module_name!r} is not an SDXL module name (unet.*, text_encoder*.*).")
    if part != UNET:
        return LORA_TEXT_PREFIX + comfy_clip_key(module_name)
    if state_key is None:
        return module_name
    if not state_key.startswith(COMFY_UNET_PREFIX):
        raise ACTInputError(f"{state_key!r} is not a UNet state-dict key (diffusion_model.*).")
    return LORA_UNET_PREFIX + state_key.removeprefix(COMFY_UNET_PREFIX).replace(".", "_")


# ------------------------------------------------------------------------------------------ LDM names
# The diffusers UNet2DConditionModel's modules in the original (LDM/SGM) layout: the modules outside the
# blocks, and a ResnetBlock2D's (a block's attention keeps its diffusers sub-paths).
_LDM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def ldm_unet_path(path: str, layers: tuple[int, ...], up_attention: tuple[bool, ...]) -> str | None:
    """The LDM module path of a diffusers UNet module path, or None for a module that has none.

    ``layers`` is the resnet count of each down block (``layers_per_block``), ``up_attention`` whether each up
    block has attentions. LDM numbers its blocks consecutively: ``input_blocks.0`` is ``conv_in``, then each
    level's resnets (with their attentions) and, but for the last level, its downsampler; each up block has
    one more resnet than its down block, and its upsampler follows the last one's resnet (and attention).
    """
    for old, new in _LDM_TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    parts = path.split(".")
    if (
        parts[0] == "mid_block"
        and len(parts) >= 3
        and parts[1] in ("resnets", "attentions")
        and parts[2].isdigit()
    ):
        kind, index, rest = parts[1], int(parts[2]), parts[3:]  # resnets.0, attentions.0, resnets.1
        head = f"middle_block.{2 * index if kind == 'resnets' else 1}"
    elif (
        parts[0] in ("down_blocks", "up_blocks")
        and len(parts) >= 4
        and parts[1].isdigit()
        and parts[3].isdigit()
    ):
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        down = parts[0] == "down_blocks"
        sizes = [n + 1 for n in layers] if down else [n + 1 for n in reversed(layers)]
        first = 1 + sum(sizes[:block]) if down else sum(sizes[:block])
        name = "input_blocks" if down else "output_blocks"
        if kind in ("resnets", "attentions"):
            head = f"{name}.{first + index}.{0 if kind == 'resnets' else 1}"
        elif kind == "downsamplers" and down and rest[:1] == ["conv"]:
            head, rest = f"{name}.{first + layers[block]}.0.op", rest[1:]
        elif kind == "upsamplers" and not down:
            head = f"{name}.{first + sizes[block] - 1}.{2 if up_attention[block] else 1}"
        else:
            return None
    else:
        return None
    if kind == "resnets" and rest:
        rest = [_LDM_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([head, *rest])


def ldm_key_table(unet: nn.Module) -> dict[str, str]:
    """``{diffusers parameter key: LDM parameter key}`` of a diffusers ``UNet2DConditionModel``: the table
    ComfyUI's ``unet_to_diffusers`` gives for the same UNet, from its config (``layers_per_block``,
    ``up_block_types``). Parameters without an LDM name are left out."""
    config = unet.config
    per_block = config.layers_per_block
    layers = (
        tuple(per_block)
        if isinstance(per_block, (list, tuple))
        else (per_block,) * len(config.down_block_types)
    )
    up_attention = tuple("CrossAttn" in kind for kind in config.up_block_types)
    table = {}
    for key, _ in unet.named_parameters():
        path, _, param = key.rpartition(".")
        ldm = ldm_unet_path(path, layers, up_attention)
        if ldm is not None:
            table[key] = f"{ldm}.{param}"
    return table


def pipeline_key_table(pipe: object) -> dict[str, str]:
    """``ldm_key_table`` of a diffusers pipeline's UNet (``ModelFamily.diffusers_key_table``)."""
    return ldm_key_table(pipe.unet)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ ComfyUI names
def unet_module_table(diffusers_to_ldm_keys: Mapping[str, str]) -> dict[str, str]:
    """``{diffusers module path: LDM module path}`` from ``comfy.utils.unet_to_diffusers(unet_config)``.

    Parameter keys are stripped of ``.weight`` / ``.bias``; a module whose weight and bias disagree
    about their LDM module is an error (it would make names ambiguous).
    """
    table: dict[str, str] = {}
    for diffusers_key, ldm_key in diffusers_to_ldm_keys.items():
        for suffix in _PARAM_SUFFIXES:
            if diffusers_key.endswith(suffix) and ldm_key.endswith(suffix):
                diffusers_path, ldm_path = diffusers_key[: -len(suffix)], ldm_key[: -len(suffix)]
                previous = table.setdefault(diffusers_path, ldm_path)
                if previous != ldm_path:
                    raise ACTInputError(
                        f"UNet module {diffusers_path!r} maps to two ComfyUI modules ({previous!r}, {ldm_path!r})."
                    )
                break
    if not table:
        raise ACTInputError(
            "This model has no diffusers <-> ComfyUI UNet name table: it is not a UNet model "
            "(SD 1.x, SD 2.x, SDXL). FLUX models are supported through their own family."
        )
    return table


def comfy_unet_modules(diffusion_model: nn.Module, table: Mapping[str, str]) -> dict[str, nn.Module]:
    """Every UNet module that has a diffusers name, keyed by canonical name (``unet.<diffusers path>``).

    Table entries whose LDM module does not exist in this model are skipped.
    """
    named = dict(diffusion_model.named_modules())
    return {f"{UNET}.{d}": named[ldm] for d, ldm in table.items() if ldm in named}


def comfy_unet_key(name: str, table: Mapping[str, str]) -> str:
    """ComfyUI state-dict module prefix (``diffusion_model.<LDM path>``) of a canonical UNet name."""
    part, _, path = name.partition(".")
    if part != UNET:
        raise ACTInputError(f"{name!r} is not a UNet module name.")
    try:
        return COMFY_UNET_PREFIX + table[path]
    except KeyError:
        raise ACTInputError(f"UNet module {path!r} has no ComfyUI counterpart in this model.") from None


def comfy_clip_modules(cond_stage_model: nn.Module) -> dict[str, nn.Module]:
    """The text-model modules of ComfyUI's CLIP (``clip_l`` / ``clip_g``), keyed by canonical name.

    ``cond_stage_model`` is ``CLIP.cond_stage_model`` (``SDXLClipModel``, ``SD1ClipModel``, ...): its
    ``clip_l.transformer.text_model.*`` modules are ``text_encoder.text_model.*``, ``clip_g`` is
    ``text_encoder_2``. Other encoders (T5, ...) are not SDXL parts and are left out.
    """
    modules: dict[str, nn.Module] = {}
    for part, clip_name in COMFY_CLIP_PARTS.items():
        encoder = getattr(cond_stage_model, clip_name, None)
        transformer = getattr(encoder, "transformer", None)
        if not isinstance(transformer, nn.Module):
            continue
        for path, module in transformer.named_modules():
            if path.startswith(TEXT_MODEL_PREFIX):
                modules[canonical_name(part, path)] = module
    return modules


def comfy_modules(diffusion_model: nn.Module, key_table: KeyTable) -> dict[str, nn.Module]:
    """The UNet of a ComfyUI MODEL under canonical names (``key_table``: ComfyUI's diffusers key table)."""
    return comfy_unet_modules(diffusion_model, unet_module_table(key_table()))


def comfy_state_keys(names: Iterable[str], key_table: KeyTable) -> dict[str, str]:
    """ComfyUI state-dict module prefixes of canonical UNet / CLIP module names."""
    names = list(names)
    table = unet_module_table(key_table()) if any(n.partition(".")[0] == UNET for n in names) else {}
    return {n: comfy_unet_key(n, table) if n.partition(".")[0] == UNET else comfy_clip_key(n) for n in names}


def comfy_clip_key(name: str) -> str:
    """ComfyUI CLIP state-dict module prefix (``clip_l.transformer.text_model...``) of a canonical name."""
    part, _, path = name.partition(".")
    if part not in COMFY_CLIP_PARTS:
        raise ACTInputError(f"{name!r} is not a text encoder module name.")
    return f"{COMFY_CLIP_PARTS[part]}.transformer.{path}"


SDXL = ModelFamily(
    name="sdxl",
    display_name="SDXL / SD 1.x / SD 2.x",  # one family: the same UNet classes in both hosts
    parts=PARTS,
    denoiser=UNET,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="timestep / num_train_timesteps (1000): 1 = pure noise",
    lora_key=lora_key,
    foldable_preset="unet_norms_foldable",
    dead_modules=dead_text_encoder_paths,
    diffusers_pipelines=("StableDiffusionXLPipeline", "StableDiffusionPipeline"),
    diffusers_denoisers=("UNet2DConditionModel",),
    diffusers_adapter="act_core.diffusers.sdxl",
    diffusers_modules=component_modules,
    comfy_denoisers=("UNetModel",),
    comfy_denoiser_modules=comfy_modules,
    comfy_clip_modules=comfy_clip_modules,
    comfy_clip_parts=COMFY_CLIP_PARTS,
    comfy_state_keys=comfy_state_keys,
    diffusers_key_table=pipeline_key_table,
    # measured (python benchmarks/bench_memory.py, bf16, 256-1024 px):
    # SD 1.5 / 2.1's 16.6 kB per latent px; SDXL's 10.1 kB
    activation_memory=ActivationMemory(324_000, 16_700, 324_000, 7_050, 1280),
)
FAMILY = SDXL
