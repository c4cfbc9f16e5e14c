"""Stable Diffusion 3 / 3.5 in diffusers: ``act_pipeline(StableDiffusion3Pipeline...)`` gets the SDXL verbs.

What differs is data (``act_core.families.sd3``) and the sampler loop the fit follows
(``run_sd3_trajectory``): SD3 samples with CFG like SDXL, so a fitting call has rows
``[uncond; target; source; plain source]`` on shared latents, with the flow-matching scheduler and the
transformer's ``timestep`` in [0, 1000].
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ACTInputError
from ..families.sd3 import SD3, component_modules
from ..trajectory import TrajectoryFit
from .fitting import CallRows, Progress, SamplingSettings, encode, follow_trajectory, seeded_noise
from .flux import ACTSequenceLengthMixin


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_sd3_trajectory(
    pipe: Any,
    session: TrajectoryFit,
    source: Sequence[str],
    target: Sequence[str],
    settings: SamplingSettings,
    *,
    seed: int,
    trajectory: str,
    pairs_in_call: int,
    progress: Progress,
    calibrate: bool = False,
    check_interrupt: Callable[[], None] = lambda: None,
) -> None:
    """Sample the pairs along SD3's guided trajectory, feeding every transformer call to ``session``."""
    n = len(source)
    transformer, device, dtype = pipe.transformer, pipe._execution_device, pipe.transformer.dtype
    guided = settings.guided
    options = {"prompt_2": None, "prompt_3": None, "max_sequence_length": settings.max_sequence_length or 256}
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
    chunks = [range(start, min(n, start + pairs_in_call)) for start in range(0, n, pairs_in_call)]

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        copies = layout.copies
        return transformer(
            hidden_states=torch.cat([latents[rows]] * copies),
            timestep=t.expand(copies * layout.k),
            encoder_hidden_states=layout.stack(tgt, src, rows, neg),
            pooled_projections=layout.stack(tgt_pooled, src_pooled, rows, neg_pooled),
            return_dict=False,
        )[0]

    follow_trajectory(
        session,
        latents,
        timesteps,
        chunks,
        level_of=lambda t: min(1.0, max(0.0, float(t) / train_steps)),
        call=call,
        advance=lambda prediction, t, latents: scheduler.step(prediction, t, latents, return_dict=False)[0],
        guided=guided,
        calibrate=calibrate,
        trajectory=trajectory,
        guidance_scale=settings.guidance_scale,
        progress=progress,
        check_interrupt=check_interrupt,
    )


class ACTSD3PipelineMixin(ACTSequenceLengthMixin):
    """Adds ACT to a diffusers ``StableDiffusion3Pipeline`` (SD3 / SD3.5): the SDXL verbs, SD3's data."""

    act_family = SD3

    def _act_component_modules(self, part: str, component: nn.Module) -> dict[str, nn.Module]:
        return component_modules(part, component)

    def _act_excluded(self, part: str) -> tuple[str, ...]:
        return ()  # unlike SDXL, SD3 pools CLIP-L's last layer too, so no text-encoder layer is dead

    def _act_first_step_runner(
        self, settings: SamplingSettings, seed: int, statistics_steps: int, use_denoiser: bool
    ):
        raise ACTInputError(
            "SD3 presets fit along the sampling trajectory (pooled_text_and_blocks, transformer_blocks); there "
            "is no first-step or text-encoder-only SD3 protocol yet."
        )

    def _act_run_trajectory(
        self, session: TrajectoryFit, source: list[str], target: list[str], settings, **options
    ):
        run_sd3_trajectory(self, session, source, target, settings, **options)
