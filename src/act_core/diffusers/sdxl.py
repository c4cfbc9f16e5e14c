"""SDXL and SD 1.x in diffusers: the family's sampling adapter (``act_core.families.sdxl`` holds its data).

* ``run_trajectory``: the guided sampling loop the user generates with (the pipeline's scheduler,
  ``num_inference_steps``, ``guidance_scale``, size), on rows ``[uncond; target; source; plain source]``
  that share their latents; the source rows come out of every UNet call already transported by
  ``TrajectoryFit``, and their guided prediction advances the latents. Prompt pair i uses the noise of
  seed ``seed + i``.
* ``first_step_runner``: the paper's protocol (cond branch, guidance off, the first ``statistics_steps``
  steps of the schedule), as a ``run_model(batch)`` for ``act_core.fitting``, which lockstep fitting calls
  from worker threads (tokenizing happens before, in the calling thread).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..families.sdxl import TEXT_ENCODER, TEXT_ENCODER_2
from ..sampling import CallRows, SamplingSettings, TrajectoryRun, seeded_noise
from .adapter import DiffusersAdapter, encode, follow_scheduler, scheduler_step_options


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along the guided trajectory (the pipeline's scheduler), feeding every UNet call
    to ``run.session``."""
    source, target, seed = run.source, run.target, run.seed
    n = len(source)
    unet, device, dtype = pipe.unet, pipe._execution_device, pipe.unet.dtype
    guided = settings.guided
    src, src_pooled, _, _ = encode(pipe, list(source), settings.negative_prompt, False)
    tgt, tgt_pooled, neg, neg_pooled = encode(pipe, list(target), settings.negative_prompt, guided)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(settings.num_inference_steps, device=device)
    shape = (
        unet.config.in_channels,
        settings.height // pipe.vae_scale_factor,
        settings.width // pipe.vae_scale_factor,
    )
    latents = (seeded_noise(shape, seed, n) * scheduler.init_noise_sigma).to(device=device, dtype=dtype)
    time_ids = None
    if src_pooled is not None:
        time_ids = pipe._get_add_time_ids(
            (settings.height, settings.width),
            (0, 0),
            (settings.height, settings.width),
            dtype=src.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(device)
    train_steps = scheduler.config.num_train_timesteps
    step_options = scheduler_step_options(scheduler, seed)

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        copies = layout.copies
        model_input = scheduler.scale_model_input(torch.cat([latents[rows]] * copies), t)
        kwargs = {}
        if src_pooled is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": layout.stack(tgt_pooled, src_pooled, rows, neg_pooled),
                "time_ids": time_ids.repeat(copies * layout.k, 1),
            }
        embeds = layout.stack(tgt, src, rows, neg)
        return unet(model_input, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]

    follow_scheduler(
        run,
        latents,
        list(scheduler.timesteps),
        scheduler,
        call,
        guided=guided,
        guidance_scale=settings.guidance_scale,
        timestep_scale=train_steps,
        step_options=step_options,
    )


# ------------------------------------------------------------------------------------------ first step
def _encode_tokens(pipe: Any, tokens: dict[str, torch.Tensor], height: int, width: int):
    """Cond-branch prompt embeddings (and SDXL's added conditioning), as the pipeline computes them.

    SDXL: penultimate hidden states of both encoders, concatenated; pooled output of encoder 2.
    SD 1.5: the last hidden state of its one encoder.
    """
    device = pipe._execution_device
    if getattr(pipe, TEXT_ENCODER_2, None) is None:
        return pipe.text_encoder(tokens[TEXT_ENCODER].to(device))[0], None
    hidden, pooled = [], None
    for part, ids in tokens.items():
        output = getattr(pipe, part)(ids.to(device), output_hidden_states=True)
        if output[0].ndim == 2:
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    embeds = torch.cat(hidden, dim=-1)
    time_ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    return embeds, {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(embeds.shape[0], 1)}


def first_step_runner(
    pipe: Any, settings: SamplingSettings, seed: int, statistics_steps: int, use_denoiser: bool
) -> Callable[[tuple[int, dict[str, torch.Tensor]]], None]:
    """``run_model((first_index, tokens))``: encode, then the first denoising steps on seeded noise."""

    @torch.no_grad()  # grad mode is per thread: the lockstep workers need it set here
    def run_model(batch: tuple[int, dict[str, torch.Tensor]]) -> None:
        first_index, tokens = batch
        embeds, added = _encode_tokens(pipe, tokens, settings.height, settings.width)
        if not use_denoiser:
            return
        device, dtype = pipe._execution_device, pipe.unet.dtype
        shape = (
            pipe.unet.config.in_channels,
            settings.height // pipe.vae_scale_factor,
            settings.width // pipe.vae_scale_factor,
        )
        noise = seeded_noise(shape, seed + first_index, len(embeds))
        scheduler = copy.deepcopy(pipe.scheduler)  # a private copy: lockstep threads run concurrently
        scheduler.set_timesteps(settings.num_inference_steps, device=device)
        latents = (noise * scheduler.init_noise_sigma).to(device=device, dtype=dtype)
        for step, t in enumerate(scheduler.timesteps[:statistics_steps]):
            model_input = scheduler.scale_model_input(latents, t)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[
                0
            ]
            if step + 1 < statistics_steps:
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    return run_model


ADAPTER = DiffusersAdapter(run_trajectory=run_trajectory, first_step_runner=first_step_runner)
