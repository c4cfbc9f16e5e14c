"""Any other DiT that ComfyUI loads: the structural fallback, for a MODEL whose diffusion model no family claims.

ComfyUI loads many transformer denoisers ACT has no table for (AuraFlow, HiDream, PixArt, HunyuanDiT, ...).
They share a shape: the denoiser runs a stack of identical transformer blocks, each of which maps the hidden
token streams to new ones of the same width. That is where a prompt's effect lives (the text tokens, or the
image tokens that attended to them), and what FLUX's and SD3's default presets hook by name. Here they are
found by structure:

* a block list is an ``nn.ModuleList`` of at least 2 modules of one class that has an attention submodule
  (a submodule path containing ``attn``), not nested in a block already found;
* a block's width is its first LayerNorm's (else the input width of its attention's first Linear); the
  model's hidden width is the width most blocks have, and lists of another width are left out;
* a block's output is one tensor, named ``transformer.<ComfyUI module path>``, unless every ``return`` of its
  class's ``forward`` is a literal tuple of ``n`` elements (``return c, x``): then each element is a stream,
  ``transformer.<path>:<index>``. A block whose source cannot be read, or that returns anything else, is
  hooked as one module (its first tensor output), which is right for a tensor and safe for a tuple.

The one preset, ``transformer_blocks``, hooks them all along the sampler's trajectory (FLUX's default protocol:
per-element, unbounded, calibrated), steering the cond rows of ComfyUI's CFG batch. The noise level is
``model_sampling.timestep(sigma) / timestep(sigma_max)`` (``comfy_timestep_scale=None``): 1 is the model's pure
noise, in whatever units its timestep has. Maps record the ComfyUI class they were fitted on
(``comfy_denoiser``) and apply only to a MODEL of that class (``act_core.families.check_comfy_map``); they
do not fold and have no diffusers host. A fit and an apply warn that the fallback is in use, naming what it
hooks.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap
import warnings
from collections import Counter
from typing import Any

from torch import nn

from ..errors import ACTInputError, ACTWarning
from ..memory import UNMEASURED
from ..recording import OutputOf
from .base import KeyTable, ModelFamily
from .flux import trajectory_preset

log = logging.getLogger("ComfyUI-ACT")
TRANSFORMER = "transformer"
PARTS = (TRANSFORMER,)
NAME = "structural"
# The metadata key holding the class name of the ComfyUI diffusion model a map was fitted on.
COMFY_CLASS_KEY = "comfy_denoiser"
MIN_BLOCKS = 2

PRESETS = {
    "transformer_blocks": trajectory_preset(
        "transformer_blocks",
        "The output streams of every transformer block of a DiT ACT has no table for, found by structure (a "
        "list of identical attention blocks at the model's hidden width), fitted along your sampler's trajectory.",
        ("*",),
        cfg_rows="cond",  # fitted with un-steered uncond rows: the maps steer the prompt's branch
    )
}
DEFAULT_PRESET = "transformer_blocks"


@functools.cache
def tuple_arity(cls: type) -> int | None:
    """``n`` when every ``return`` of ``cls.forward`` is a literal tuple of ``n >= 2`` elements; None when it
    returns one value, anything else, or its source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    function = tree.body[0] if tree.body else None
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    returns: list[ast.Return] = []
    pending: list[ast.AST] = list(function.body)
    while pending:  # the function's own returns, not those of functions defined inside it
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return):
            returns.append(node)
        pending.extend(ast.iter_child_nodes(node))
    sizes = {
        len(node.value.elts)
        if isinstance(node.value, ast.Tuple) and not any(isinstance(e, ast.Starred) for e in node.value.elts)
        else 0
        for node in returns
    }
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return size if size >= 2 else None


def block_width(block: nn.Module) -> int | None:
    """A block's hidden width: its first LayerNorm's, else the input width of its attention's first Linear."""
    for module in block.modules():
        if isinstance(module, nn.LayerNorm) and module.normalized_shape:
            return int(module.normalized_shape[-1])
    for path, module in block.named_modules():
        if "attn" in path.lower() and isinstance(module, nn.Linear):
            return int(module.in_features)
    return None


def _has_attention(block: nn.Module) -> bool:
    return any("attn" in path.lower() for path, _ in block.named_modules() if path)


def block_lists(diffusion_model: nn.Module) -> list[tuple[str, nn.ModuleList, int]]:
    """``(path, blocks, width)`` of every block list found by structure, at the model's hidden width."""
    found: list[tuple[str, nn.ModuleList, int]] = []
    for path, module in diffusion_model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < MIN_BLOCKS:
            continue
        if any(path.startswith(f"{outer}.") for outer, _, _ in found):
            continue  # a list inside a block already found (its MLP's layers, ...)
        if len({type(block) for block in module}) != 1 or not _has_attention(module[0]):
            continue
        widths = {block_width(block) for block in module}
        if len(widths) != 1 or None in widths:
            continue
        found.append((path, module, widths.pop()))
    if not found:
        return []
    counts: Counter[int] = Counter()
    for _, blocks, width in found:
        counts[width] += len(blocks)
    hidden = counts.most_common(1)[0][0]
    return [entry for entry in found if entry[2] == hidden]


def structural_modules(diffusion_model: nn.Module) -> dict[str, nn.Module | OutputOf]:
    """Canonical name -> block (or one stream of its tuple output) of every block found by structure."""
    modules: dict[str, nn.Module | OutputOf] = {}
    for path, blocks, width in block_lists(diffusion_model):
        for i, block in enumerate(blocks):
            name = f"{TRANSFORMER}.{path}.{i}"
            arity = tuple_arity(type(block))
            if arity is None:
                modules[name] = block
            else:
                modules.update({f"{name}:{k}": OutputOf(block, k, width) for k in range(arity)})
    return modules


def describe(diffusion_model: nn.Module) -> str:
    """What the fallback hooks on this model, for the warning: the lists, their blocks and streams."""
    lists = block_lists(diffusion_model)
    parts = []
    for path, blocks, _ in lists:
        arity = tuple_arity(type(blocks[0]))
        streams = f", {arity} output streams each" if arity else ""
        parts.append(f"{path} ({len(blocks)} x {type(blocks[0]).__name__}{streams})")
    return f"{', '.join(parts)}, width {lists[0][2]}" if lists else "nothing"


def comfy_transformer_modules(
    diffusion_model: nn.Module, key_table: KeyTable | None = None
) -> dict[str, nn.Module | OutputOf]:
    """The structural fallback's modules of a ComfyUI diffusion model, with a warning saying so."""
    modules = structural_modules(diffusion_model)
    if not modules:
        raise ACTInputError(
            f"ACT found no transformer blocks in this {type(diffusion_model).__name__} (a list of at least "
            f"{MIN_BLOCKS} identical attention blocks): it cannot steer it."
        )
    message = (
        f"ComfyUI-ACT has no table for {type(diffusion_model).__name__}: it uses the structural fallback, the "
        f"output streams of the transformer blocks found by structure, {len(modules)} modules: "
        f"{describe(diffusion_model)}. A map fitted so applies to {type(diffusion_model).__name__} models only."
    )
    log.info("ACT: %s", message)
    warnings.warn(message, ACTWarning, stacklevel=2)
    return modules


def lora_key(module_name: str) -> str:
    raise ACTInputError(
        f"Structural-fallback maps do not fold into weights ({module_name!r}: per-step maps on block outputs), so "
        "they cannot be exported as a LoRA; apply them with hooks."
    )


STRUCTURAL = ModelFamily(
    name=NAME,
    display_name="DiT (structural fallback)",
    parts=PARTS,
    denoiser=TRANSFORMER,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    noise_level="timestep(sigma) / timestep(sigma_max) of ComfyUI's model_sampling: 1 = pure noise",
    lora_key=lora_key,
    cfg_batch=True,  # ComfyUI batches cond and uncond rows itself; the maps steer the cond rows
    comfy_denoisers=(),  # claims no class: family_of_comfy_model falls back to it by structure
    comfy_denoiser_modules=comfy_transformer_modules,
    comfy_timestep_scale=None,  # timestep units differ between architectures: relative to sigma_max
    # any DiT: the largest per-row figures measured on a family (act_core.memory.UNMEASURED)
    activation_memory=UNMEASURED,
)
FAMILY = STRUCTURAL


def fitted_class(metadata: Any) -> str | None:
    """The ComfyUI class a structural map was fitted on, from its metadata."""
    value = metadata.get(COMFY_CLASS_KEY) if hasattr(metadata, "get") else None
    return str(value) if value is not None else None
