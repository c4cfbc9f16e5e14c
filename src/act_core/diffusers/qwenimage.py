"""Qwen-Image in diffusers: the family's sampling adapter (``act_core.families.qwenimage`` holds its data).

QwenImagePipeline samples with "true CFG" (``true_cfg_scale > 1`` and a negative prompt) as two transformer
calls a step, the prompt's then the negative prompt's, and rescales the guided prediction to the norm of the
prompt's. Fitting puts both in one call, rows ``[uncond; target; source; plain source]`` on shared packed
latents (each row attends only to its own tokens), so the session sees the whole step at once, and guides
with the same rescaled rule. The prompts are encoded as the pipeline encodes them (the chat template, the
encoder's last hidden states after the template's first tokens, ``max_sequence_length``); every row carries
its own text mask, and rows shorter than the call's longest are zero-padded and masked, as the pipeline pads
a batch of prompts. The flow-matching schedule is the pipeline's (linear sigmas, shifted for the image size),
and the transformer gets ``timestep = sigma`` (the noise level itself).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ACTInputError
from ..families.qwenimage import QWEN_IMAGE
from ..sampling import CallRows, SamplingSettings, TrajectoryRun, follow_trajectory, seeded_noise
from .adapter import DiffusersAdapter, shifted_flow_timesteps


def _length(settings: SamplingSettings) -> int:
    return settings.max_sequence_length or QWEN_IMAGE.max_sequence_length[0]


def _encode(pipe: Any, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, mask) as QwenImagePipeline.encode_prompt makes them; its ``None`` mask (no padding) as ones."""
    embeds, mask = pipe.encode_prompt(prompts, device=pipe._execution_device, max_sequence_length=length)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds, mask


def _padded(embeds: torch.Tensor, mask: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero embeddings, masked out, after the real tokens up to ``tokens`` (as the pipeline pads a batch)."""
    missing = tokens - embeds.shape[1]
    return F.pad(embeds, (0, 0, 0, missing)), F.pad(mask, (0, missing))


def packed_noise(pipe: Any, settings: SamplingSettings, seed: int, count: int) -> torch.Tensor:
    """Pair i's packed noise latents from seed ``seed + i``: what ``pipe(..., generator=seeded)`` draws."""
    transformer = pipe.transformer
    channels = transformer.config.in_channels // 4
    height = 2 * (settings.height // (pipe.vae_scale_factor * 2))
    width = 2 * (settings.width // (pipe.vae_scale_factor * 2))
    noise = seeded_noise((channels, height, width), seed, count)
    noise = noise.to(device=pipe._execution_device, dtype=transformer.dtype)
    return pipe._pack_latents(noise, count, channels, height, width)


def true_cfg(scale: float):
    """QwenImagePipeline's guidance: CFG, rescaled to the norm of the prompt's prediction (per token)."""

    def guide(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        guided = uncond + scale * (cond - uncond)
        return guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    return guide


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_qwenimage_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along Qwen-Image's (true-CFG) trajectory, feeding every transformer call to
    ``run.session``."""
    transformer = pipe.transformer
    if transformer.config.guidance_embeds:
        raise ACTInputError(
            "This Qwen-Image transformer embeds a distilled guidance scale (guidance_embeds), which ACT's "
            "Qwen-Image fitting does not follow; fit on a model without it."
        )
    source, target, seed = run.source, run.target, run.seed
    n = len(source)
    dtype, guided, length = transformer.dtype, settings.guided, _length(settings)
    encoded = [_encode(pipe, list(source), length), _encode(pipe, list(target), length)]
    if guided:
        negative, negative_mask = _encode(pipe, [settings.negative_prompt], length)
        encoded.append((negative.expand(n, -1, -1), negative_mask.expand(n, -1)))
    tokens = max(embeds.shape[1] for embeds, _ in encoded)
    (src, src_mask), (tgt, tgt_mask), *rest = [_padded(embeds, mask, tokens) for embeds, mask in encoded]
    neg, neg_mask = rest[0] if guided else (None, None)
    latents = packed_noise(pipe, settings, seed, n)
    image_shape = (
        1,
        settings.height // pipe.vae_scale_factor // 2,
        settings.width // pipe.vae_scale_factor // 2,
    )
    scheduler = copy.deepcopy(pipe.scheduler)
    timesteps = shifted_flow_timesteps(pipe, scheduler, settings.num_inference_steps, latents.shape[1])
    scheduler.set_begin_index(0)

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        batch = layout.copies * layout.k
        mask = layout.stack(tgt_mask, src_mask, rows, neg_mask)
        return transformer(
            hidden_states=torch.cat([latents[rows]] * layout.copies),
            timestep=t.expand(batch).to(dtype) / 1000,
            encoder_hidden_states=layout.stack(tgt, src, rows, neg),
            # the pipeline passes no mask when no token is padding
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[image_shape]] * batch,
            return_dict=False,
        )[0]

    follow_trajectory(
        run,
        latents,
        timesteps,
        level_of=lambda t: min(1.0, max(0.0, float(t) / 1000)),
        call=call,
        advance=lambda prediction, t, latents: scheduler.step(prediction, t, latents, return_dict=False)[0],
        guided=guided,
        guidance_scale=settings.guidance_scale,
        guide=true_cfg(settings.guidance_scale),
    )


ADAPTER = DiffusersAdapter(
    run_trajectory=run_qwenimage_trajectory,
    timestep_scale=lambda pipe: 1.0,  # QwenImagePipeline passes timestep / 1000: the noise level itself
    patch_size=2,
    guidance_parameter="true_cfg_scale",  # QwenImagePipeline's CFG scale (guidance_scale: distilled only)
    cfg_needs_negative_prompt=True,  # true CFG runs only with a negative prompt
)
