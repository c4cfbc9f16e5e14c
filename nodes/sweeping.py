"""Render one sample per lambda with the same seed and noise: an ACT "slider" preview as a LATENT batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from act_core.maps import ACTMap
from act_core.validation import parse_lambdas

from .applying import apply_map, map_family


def encode_text(clip: Any, text: str) -> list:
    """Conditioning as CLIPTextEncode makes it (scheduled encoding when this ComfyUI has it), without a
    progress bar of its own (the sweep's bar covers the whole sweep)."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens, show_pbar=False)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sweep(
    model: Any,
    clip: Any,
    act_map: ACTMap,
    positive: str,
    negative: str,
    latent_image: dict,
    lambdas: str,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    announce: Callable[[int, int, float], None] | None = None,
) -> tuple[dict, str]:
    """(LATENT with one sample per lambda per input latent, "0, 0.5, 1" labels).

    One progress bar runs over the whole sweep (lambdas x steps, with the sampler's previews), not one per
    lambda; ``announce(k, n, lam)`` is told before lambda k of n is rendered (the node shows "lambda k of n").
    """
    import comfy.model_management as mm
    import comfy.sample
    import comfy.utils

    values = parse_lambdas(lambdas)
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    steers_text = any(part != map_family(act_map).denoiser for part in act_map.parts())
    try:
        import latent_preview

        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    except ImportError:  # outside the ComfyUI server
        previewer = None
    bar = comfy.utils.ProgressBar(len(values) * steps)
    conds = None
    samples = []
    for k, lam in enumerate(values):
        mm.throw_exception_if_processing_interrupted()
        if announce is not None:
            announce(k + 1, len(values), lam)
        patched_model, patched_clip, _ = apply_map(
            model, clip, act_map, lam, None, start_percent, end_percent
        )
        if conds is None or steers_text:
            conds = (encode_text(patched_clip, positive), encode_text(patched_clip, negative))
        out = comfy.sample.sample(
            patched_model,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            conds[0],
            conds[1],
            latent,
            denoise=denoise,
            noise_mask=latent_image.get("noise_mask"),
            callback=_overall_progress(bar, previewer, k, len(values)),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        samples.append(out)
    result = {key: value for key, value in latent_image.items() if key not in ("samples", "batch_index")}
    result["samples"] = torch.cat(samples)
    if "noise_mask" in result:
        mask = result["noise_mask"]
        result["noise_mask"] = torch.cat([mask] * len(values)) if mask.shape[0] == latent.shape[0] else mask
    return result, ", ".join(f"{value:g}" for value in values)


def _overall_progress(bar: Any, previewer: Any, k: int, n: int) -> Callable[..., None]:
    """The sampler's step callback for lambda k (0-based) of n: the sweep's one bar at k * steps + step + 1 of
    n * steps, with the step's preview image as the sampler nodes show it."""

    def callback(step: int, x0: Any, x: Any, total_steps: int) -> None:
        preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer is not None else None
        bar.update_absolute(k * total_steps + step + 1, n * total_steps, preview)

    return callback
