"""Fit an ACT map on a ComfyUI MODEL / CLIP, with the same semantics as the diffusers mixin.

Statistics come from the cond branch (guidance off) at the FIRST denoising step of a ``steps``-step
schedule; prompt i of either side gets the noise of seed ``seed + i``. Text-encoder presets run the text
encoders only (no UNet pass).

Thread-safety (lockstep causal fitting runs ``run_model`` from one thread per batch): nothing is loaded
inside those threads. Everything ComfyUI-specific happens first, in the calling thread:

* UNet presets: prompts are encoded, then for every batch ComfyUI's own sampler (``comfy.sample.sample``,
  cfg 1, ``last_step=1``) runs up to the UNet call and a forward pre-hook captures the exact arguments the
  UNet gets (noise scaled for the first sigma, context, SDXL ``y``, transformer_options with the model's
  patches and wrappers), then aborts. ``run_model`` only replays ``diffusion_model(*args, **kwargs)`` on
  the model loaded once beforehand.
* Text-encoder presets: the CLIP is loaded once and its layer options set; ``run_model`` calls
  ``encode_token_weights`` on pre-tokenized prompts (no loading, no option changes).

Lockstep is used when the UNet is fully loaded and ComfyUI's async weight offload streams are off
(partially loaded weights are cast per forward through shared CUDA streams); otherwise, or when the
concurrent activations of all batches would not fit in free memory, the group-wise strategy runs the
same ``run_model`` sequentially. Both are exact between modules fitted in different passes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from act_core._version import __version__
from act_core.errors import ACTError, ACTInputError
from act_core.families import SDXL
from act_core.families.sdxl import TEXT_ENCODER, UNET, dead_text_encoder_paths
from act_core.fitting import fit_with_stats
from act_core.maps import ACTMap, part_of, prompt_digest
from act_core.recording import token_mask_hooks

from .comfy_models import clip_modules, has_text_encoder_2, unet_modules
from .common import check_balance, check_size, parse_parts, parse_prompts, resolve_support

log = logging.getLogger("ComfyUI-ACT")
SCHEDULER = "normal"  # only the first sigma of the schedule is used; it is sigma_max for the usual schedulers
SAMPLER = "euler"
# Rough live activation size of one UNet forward at a lockstep rendezvous, per latent pixel and sample
# (skip connections of SD/SDXL UNets are ~1700 channels in total at latent resolution).
_ACTIVATION_ELEMENTS_PER_LATENT_PIXEL = 2500


class _Captured(Exception):
    """Raised from a pre-hook on the UNet to stop ComfyUI's sampler once the UNet inputs are known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured UNet inputs")
        self.args, self.kwargs = args, kwargs


def select_modules(model: Any, clip: Any, preset_name: str, parts_text: str) -> tuple[dict, tuple[str, ...]]:
    """The modules a preset hooks on this MODEL/CLIP (canonical names), and the parts used."""
    spec = SDXL.preset(preset_name)
    parts = parse_parts(parts_text, spec)
    selected = {}
    for part in parts:
        if part == UNET:
            candidates = unet_modules(model)
        else:
            candidates = {n: m for n, m in clip_modules(clip).items() if part_of(n) == part}
            if not candidates:
                raise ACTInputError(
                    f"This CLIP has no {part} (ComfyUI's {'clip_l' if part == TEXT_ENCODER else 'clip_g'}); "
                    f"preset {preset_name!r} needs one. Use an SD1.x/SDXL CLIP or set 'parts'."
                )
        excluded: tuple[str, ...] = ()
        if part == TEXT_ENCODER and has_text_encoder_2(clip):
            excluded = dead_text_encoder_paths(part, int(clip.cond_stage_model.clip_l.num_layers))
        selected.update(spec.select(part, candidates, excluded))
    if not selected:
        raise ACTInputError(f"Preset {preset_name!r} matched no module of this model's {', '.join(parts)}.")
    return selected, parts


# ------------------------------------------------------------------------------------------ UNet inputs
def _encode_prompts(clip: Any, prompts: Sequence[str], check: Callable[[], None]) -> list[tuple]:
    out = []
    for prompt in prompts:
        check()
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        out.append((cond, pooled))
    return out


def _stack_conds(encoded: Sequence[tuple]) -> list:
    """One conditioning entry for a batch of prompts (token lengths made equal by repetition, which leaves
    cross-attention unchanged: ComfyUI batches conds of different lengths the same way)."""
    lengths = [cond.shape[1] for cond, _ in encoded]
    common = math.lcm(*lengths)
    cond = torch.cat([c.repeat(1, common // c.shape[1], 1) for c, _ in encoded])
    extra = {}
    if all(p is not None for _, p in encoded):
        extra["pooled_output"] = torch.cat([p for _, p in encoded])
    return [[cond, extra]]


def capture_unet_inputs(
    model: Any, conditioning: list, noise: torch.Tensor, latent: torch.Tensor, steps: int, seed: int
) -> tuple[tuple, dict]:
    """The arguments ComfyUI passes to the UNet at the first step (cfg 1: cond branch only)."""
    import comfy.sample

    diffusion_model = model.model.diffusion_model

    def hook(module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        comfy.sample.sample(
            model,
            noise,
            steps,
            1.0,
            SAMPLER,
            SCHEDULER,
            conditioning,
            conditioning,
            latent,
            denoise=1.0,
            last_step=1,
            disable_pbar=True,
            seed=seed,
        )
    except _Captured as captured:
        kwargs = dict(captured.kwargs)
        options = kwargs.get("transformer_options")
        if isinstance(options, dict):
            if any(c != 0 for c in options.get("cond_or_uncond") or [0]):
                raise ACTError(
                    "This MODEL runs the negative (uncond) branch even at cfg 1 (disable_cfg1_optimization is set "
                    "by a node before Fit ACT map); fit on the model without that option."
                ) from None
            kwargs["transformer_options"] = dict(options)
        return captured.args, kwargs
    finally:
        handle.remove()
    raise ACTError("ComfyUI's sampler never called the UNet; cannot collect ACT statistics for this model.")


def unet_batches(
    model: Any,
    clip: Any,
    prompts: Sequence[str],
    *,
    seed: int,
    width: int,
    height: int,
    steps: int,
    batch_size: int,
    check: Callable[[], None],
) -> list[tuple[tuple, dict]]:
    """Captured UNet inputs per batch of prompts; prompt i gets the noise of seed ``seed + i``."""
    import comfy.sample

    encoded = _encode_prompts(clip, prompts, check)
    batches = []
    for start in range(0, len(prompts), batch_size):
        check()
        chunk = encoded[start : start + batch_size]
        latent = torch.zeros((len(chunk), 4, height // 8, width // 8), dtype=torch.float32)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = torch.cat(
            [comfy.sample.prepare_noise(latent[:1], (seed + start + i) % (2**64)) for i in range(len(chunk))]
        )
        batches.append(capture_unet_inputs(model, _stack_conds(chunk), noise, latent, steps, seed + start))
    return batches


def lockstep_ok(model: Any, num_samples: int, width: int, height: int) -> tuple[bool, str]:
    """Whether concurrent UNet forwards are safe and fit in memory here (see the module docstring)."""
    import comfy.model_management as mm

    if getattr(model.model, "model_lowvram", False):
        return False, "the UNet is only partially loaded (low VRAM), so its weights are cast per forward"
    if getattr(mm, "NUM_STREAMS", 1) > 1:
        return False, "ComfyUI's async weight offload streams are shared between threads"
    itemsize = torch.empty((), dtype=model.model_dtype()).element_size()
    need = num_samples * (width // 8) * (height // 8) * _ACTIVATION_ELEMENTS_PER_LATENT_PIXEL * itemsize
    free = mm.get_free_memory(model.load_device)
    if need > 0.8 * free:
        return (
            False,
            f"all {num_samples} forwards at once would need ~{need / 2**30:.1f} GiB (free: {free / 2**30:.1f})",
        )
    return True, ""


# ------------------------------------------------------------------------------------------ text encoders
def text_batches(clip: Any, prompts: Sequence[str], batch_size: int) -> list[dict]:
    """Token batches for ``encode_token_weights``: the first 77-token chunk of each prompt, weights 1.

    Prompt weights only rescale the encoder OUTPUT (after the forward), so they do not change the
    activations ACT records; dropping them avoids the extra empty-prompt row ComfyUI adds for them.
    """
    tokenized = [clip.tokenize(prompt) for prompt in prompts]
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = tokenized[start : start + batch_size]
        batches.append({key: [[(t[0], 1.0) for t in tokens[key][0]] for tokens in chunk] for key in chunk[0]})
    return batches


class _TokenMasks:
    """While fitting, pool text-encoder outputs over real tokens (start .. first end token), not padding."""

    def __init__(self, clip: Any):
        self.encoders = [
            getattr(clip.cond_stage_model, name)
            for name in ("clip_l", "clip_g")
            if getattr(clip.cond_stage_model, name, None) is not None
        ]
        self.handles: list = []

    @staticmethod
    def _mask(encoder: Any, args: tuple) -> torch.Tensor | None:
        tokens = args[0] if args else None
        end = getattr(encoder, "special_tokens", {}).get("end")
        if not (
            isinstance(tokens, list)
            and end is not None
            and all(isinstance(row, list) and all(isinstance(t, int) for t in row) for row in tokens)
        ):
            return None
        rows = []
        for row in tokens:
            stop = row.index(end) + 1 if end in row else len(row)
            rows.append([i < stop for i in range(len(row))])
        if len({len(r) for r in rows}) != 1:
            return None
        return torch.tensor(rows, dtype=torch.bool)

    def __enter__(self) -> _TokenMasks:
        for encoder in self.encoders:
            self.handles += token_mask_hooks(encoder, lambda args, kwargs, enc=encoder: self._mask(enc, args))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# ------------------------------------------------------------------------------------------ fit
def fit_map(
    model: Any,
    clip: Any,
    source_text: str,
    target_text: str,
    *,
    preset: str = "unet_norms",
    parts: str = "",
    method: str = "linear",
    support: str = "auto",
    mode: str = "preset",
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = 20,
    batch_size: int = 4,
    causal_strategy: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ACTMap, Any]:
    """Fit an ACT map; returns (map, act_core.FitStats). Raises on interruption (nothing stays hooked)."""
    import comfy.model_management as mm

    source = parse_prompts(source_text, "source")
    target = parse_prompts(target_text, "target")
    check_balance(source, target)
    check_size(width, height)
    if batch_size < 1 or steps < 1:
        raise ACTInputError("batch_size and steps must be at least 1.")
    spec = SDXL.preset(preset)
    mode = spec.mode if mode == "preset" else mode
    modules, used_parts = select_modules(model, clip, preset, parts)
    uses_unet = any(part_of(name) == UNET for name in modules)
    inference = torch.is_inference_mode_enabled()

    def check() -> None:
        mm.throw_exception_if_processing_interrupted()

    strategy = causal_strategy
    if uses_unet:
        kwargs = {"seed": seed, "width": width, "height": height, "steps": steps, "batch_size": batch_size}
        source_batches = unet_batches(model, clip, source, check=check, **kwargs)
        target_batches = unet_batches(model, clip, target, check=check, **kwargs)
        mm.load_models_gpu([model])
        diffusion_model = model.model.diffusion_model
        if mode == "causal" and causal_strategy == "auto":
            ok, why = lockstep_ok(model, len(source) + len(target), width, height)
            if not ok:
                log.info("ACT fit: group-wise causal fitting because %s.", why)
                strategy = "groupwise"

        def run_model(batch: tuple[tuple, dict]) -> None:
            args, kw = batch
            kw = dict(kw)
            if isinstance(kw.get("transformer_options"), dict):
                kw["transformer_options"] = dict(kw["transformer_options"])
            with torch.inference_mode(inference):
                diffusion_model(*args, **kw)

        masks = None
    else:
        source_batches = text_batches(clip, source, batch_size)
        target_batches = text_batches(clip, target, batch_size)
        encoder = clip.cond_stage_model
        encoder.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            encoder.set_clip_options({"layer": clip.layer_idx})
        clip.load_model()

        def run_model(batch: dict) -> None:
            with torch.inference_mode(inference):
                encoder.encode_token_weights(batch)

        masks = _TokenMasks(clip)

    def report(done: int, total: int, what: str) -> None:
        check()
        if progress is not None:
            progress(done, total)

    metadata = {
        "preset": preset,
        "parts": list(used_parts),
        "model": f"ComfyUI {type(model.model).__name__}"
        if uses_unet
        else f"ComfyUI {type(clip.cond_stage_model).__name__}",
        "host": "comfyui",
        "num_source_prompts": len(source),
        "num_target_prompts": len(target),
        "source_digest": prompt_digest(source),
        "target_digest": prompt_digest(target),
        "seed": seed,
        "statistics": {
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "statistics_steps": 1 if uses_unet else 0,
            "guidance": "off (cond branch)",
        },
        "comfyui_act_version": __version__,
    }
    options = {
        "method": method,
        "support": resolve_support(support, method, spec),
        "mode": mode,
        "apply_mode": spec.apply_mode,
        "causal_strategy": strategy,
        "progress": report,
        "metadata": metadata,
    }
    if masks is None:
        return fit_with_stats(run_model, source_batches, target_batches, modules, **options)
    with masks:
        return fit_with_stats(run_model, source_batches, target_batches, modules, **options)
