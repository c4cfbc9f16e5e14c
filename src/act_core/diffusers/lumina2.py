"""Lumina 2 in diffusers: the family's sampling adapter (``act_core.families.lumina2`` holds its data).

Lumina2Pipeline samples with real CFG as two transformer calls a step (the prompt's, then the negative
prompt's), guides ``uncond + scale * (cond - uncond)`` and rescales that to the prompt's norm along the last
latent axis (``cfg_normalization``, on by default); fitting puts both calls in one, rows ``[uncond; target;
source; plain source]`` on shared latents, each row with its own Gemma attention mask (the transformer
places each row's caption tokens by its mask, so a row is computed as in a call of its own), and guides the
same way. The transformer gets ``1 - sigma`` ("t=0 is the noise"), and the pipeline steps the scheduler with
the negated prediction; the schedule is the pipeline's (linear sigmas, shifted by ``mu``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..families.lumina2 import LUMINA2
from ..sampling import CallRows, SamplingSettings, TrajectoryRun, follow_trajectory, seeded_noise
from .adapter import DiffusersAdapter, shifted_flow_timesteps


def _encode(pipe: Any, prompts: list[str], negative_prompt: str | None, guided: bool, length: int):
    """(embeds, mask, negative embeds, negative mask) as Lumina2Pipeline.encode_prompt makes them (its system
    prompt before each prompt)."""
    return pipe.encode_prompt(
        prompts,
        guided,
        negative_prompt=negative_prompt,
        device=pipe._execution_device,
        max_sequence_length=length,
    )


def cfg_normalized(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Lumina2Pipeline's guided prediction with ``cfg_normalization``: the CFG result rescaled to the cond
    prediction's norm along the last axis."""
    guided = uncond + scale * (cond - uncond)
    return guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_lumina2_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along Lumina 2's guided trajectory, feeding every transformer call to
    ``run.session``."""
    source, target, seed = run.source, run.target, run.seed
    transformer, device = pipe.transformer, pipe._execution_device
    guided = settings.guided
    length = settings.max_sequence_length or LUMINA2.max_sequence_length[0]
    src, src_mask, _, _ = _encode(pipe, list(source), settings.negative_prompt, False, length)
    tgt, tgt_mask, neg, neg_mask = _encode(pipe, list(target), settings.negative_prompt, guided, length)
    channels = transformer.config.in_channels
    # Lumina2Pipeline.prepare_latents: the latent size rounded to whole 2x2 patches, in the embeddings' dtype
    shape = (
        channels,
        2 * (settings.height // (pipe.vae_scale_factor * 2)),
        2 * (settings.width // (pipe.vae_scale_factor * 2)),
    )
    latents = seeded_noise(shape, seed, len(source)).to(device=device, dtype=tgt.dtype)
    scheduler = copy.deepcopy(pipe.scheduler)
    # Lumina2Pipeline shifts the schedule by ``latents.shape[1]`` of its (B, C, H, W) latents: the channels
    timesteps = shifted_flow_timesteps(pipe, scheduler, settings.num_inference_steps, channels)
    scheduler.set_begin_index(0)
    train_steps = scheduler.config.num_train_timesteps

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        batch = layout.copies * layout.k
        return transformer(
            hidden_states=torch.cat([latents[rows]] * layout.copies),
            timestep=(1 - t / train_steps).expand(batch),  # Lumina's time runs from 0 at pure noise
            encoder_hidden_states=layout.stack(tgt, src, rows, neg),
            encoder_attention_mask=layout.stack(tgt_mask, src_mask, rows, neg_mask),
            return_dict=False,
        )[0]

    follow_trajectory(
        run,
        latents,
        timesteps,
        level_of=lambda t: min(1.0, max(0.0, float(t) / train_steps)),
        call=call,
        # the pipeline steps with the negated prediction (its transformer predicts toward the image)
        advance=lambda prediction, t, latents: scheduler.step(-prediction, t, latents, return_dict=False)[0],
        guided=guided,
        guidance_scale=settings.guidance_scale,
        guide=lambda uncond, cond: cfg_normalized(uncond, cond, settings.guidance_scale),
    )


ADAPTER = DiffusersAdapter(
    run_trajectory=run_lumina2_trajectory,
    timestep_scale=lambda pipe: 1.0,  # Lumina2Pipeline passes 1 - t / 1000: one minus the noise level
    timestep_reversed=True,
    patch_size=2,
)
