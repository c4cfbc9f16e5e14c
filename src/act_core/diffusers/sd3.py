"""Stable Diffusion 3 / 3.5 in diffusers: the family's sampling adapter (``act_core.families.sd3`` holds its
data). SD3 samples with CFG like SDXL, so a fitting call has rows ``[uncond; target; source; plain source]``
on shared latents, with the flow-matching scheduler and the transformer's ``timestep`` in [0, 1000].
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..families.sd3 import SD3
from ..sampling import CallRows, SamplingSettings, TrajectoryRun, seeded_noise
from .adapter import DiffusersAdapter, encode, follow_scheduler


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_sd3_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along SD3's guided trajectory, feeding every transformer call to ``run.session``."""
    source, target, seed = run.source, run.target, run.seed
    n = len(source)
    transformer, device, dtype = pipe.transformer, pipe._execution_device, pipe.transformer.dtype
    guided = settings.guided
    options = {
        "prompt_2": None,
        "prompt_3": None,
        "max_sequence_length": settings.max_sequence_length or SD3.max_sequence_length[0],
    }
    src, src_pooled, _, _ = encode(pipe, list(source), settings.negative_prompt, False, **options)
    tgt, tgt_pooled, neg, neg_pooled = encode(pipe, list(target), settings.negative_prompt, guided, **options)
    shape = (
        transformer.config.in_channels,
        settings.height // pipe.vae_scale_factor,
        settings.width // pipe.vae_scale_factor,
    )
    latents = seeded_noise(shape, seed, n).to(device=device, dtype=dtype)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(settings.num_inference_steps, device=device)
    timesteps = list(scheduler.timesteps)
    scheduler.set_begin_index(0)
    train_steps = scheduler.config.num_train_timesteps

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        copies = layout.copies
        return transformer(
            hidden_states=torch.cat([latents[rows]] * copies),
            timestep=t.expand(copies * layout.k),
            encoder_hidden_states=layout.stack(tgt, src, rows, neg),
            pooled_projections=layout.stack(tgt_pooled, src_pooled, rows, neg_pooled),
            return_dict=False,
        )[0]

    follow_scheduler(
        run,
        latents,
        timesteps,
        scheduler,
        call,
        guided=guided,
        guidance_scale=settings.guidance_scale,
        timestep_scale=train_steps,
    )


ADAPTER = DiffusersAdapter(run_trajectory=run_sd3_trajectory, patch_size=2)
