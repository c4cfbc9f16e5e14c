"""Render one sample per lambda with the same seed and noise: an ACT "slider" preview as a LATENT batch."""

from __future__ import annotations

from typing import Any

import torch

from act_core.maps import ACTMap
from act_core.validation import parse_lambdas

from .applying import apply_map, map_family


def encode_text(clip: Any, text: str) -> list:
    """Conditioning as CLIPTextEncode makes it (scheduled encoding when this ComfyUI has it)."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
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
) -> tuple[dict, str]:
    """(LATENT with one sample per lambda per input latent, "0, 0.5, 1" labels)."""
    import comfy.model_management as mm
    import comfy.sample
    import comfy.utils

    values = parse_lambdas(lambdas)
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    steers_text = any(part != map_family(act_map).denoiser for part in act_map.parts())
    try:
        import latent_preview
    except ImportError:  # outside the ComfyUI server
        latent_preview = None
    conds = None
    samples = []
    for lam in values:
        mm.throw_exception_if_processing_interrupted()
        patched_model, patched_clip, _ = apply_map(
            model, clip, act_map, lam, None, start_percent, end_percent
        )
        if conds is None or steers_text:
            conds = (encode_text(patched_clip, positive), encode_text(patched_clip, negative))
        callback = (
            latent_preview.prepare_callback(patched_model, steps) if latent_preview is not None else None
        )
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
            callback=callback,
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
