"""FLUX.2 in diffusers: the family's sampling adapter (``act_core.families.flux2`` holds its data).

Flux2Pipeline runs no CFG (FLUX.2 [dev] embeds its guidance scale), so a fitting call has rows ``[target;
source; plain source]`` on shared latents. Everything else is the pipeline's own: the prompts are encoded by
its ``encode_prompt`` (the system message and chat template, the Mistral encoder's stacked hidden states,
``max_sequence_length``), the noise is drawn as its ``prepare_latents`` draws it (already patchified:
``(4 x latent channels, height / 2, width / 2)`` per image, then packed into tokens), the schedule is its
linear sigmas shifted by its empirical ``mu`` (``compute_empirical_mu``: image tokens and step count), and the
transformer gets ``timestep = sigma`` (the noise level itself) and the guidance scale.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ..errors import ACTInputError
from ..families.flux2 import FLUX2
from ..sampling import CallRows, SamplingSettings, TrajectoryRun, seeded_noise
from .adapter import DiffusersAdapter, follow_scheduler


def _length(settings: SamplingSettings) -> int:
    return settings.max_sequence_length or FLUX2.max_sequence_length[0]


def _check_pipeline(pipe: Any) -> None:
    """Refuse pipelines that share FLUX.2's transformer but not its sampling (FLUX.2 [klein]: a Qwen3 prompt
    and real CFG as two calls a step)."""
    if not hasattr(pipe, "_get_mistral_3_small_prompt_embeds"):
        name = type(pipe).__name__.removeprefix("ACT")
        raise ACTInputError(
            f"{name} shares FLUX.2's transformer but not Flux2Pipeline's sampling (its prompt encoder and CFG), "
            "which ACT's FLUX.2 fitting follows; fit FLUX.2 maps with Flux2Pipeline."
        )


def flux2_latents(pipe: Any, settings: SamplingSettings, seed: int, count: int):
    """(packed noise latents, their position ids): pair i's noise from seed ``seed + i``, what
    ``Flux2Pipeline.prepare_latents`` draws with that generator (patchified channels, half the latent size)."""
    transformer = pipe.transformer
    height = 2 * (settings.height // (pipe.vae_scale_factor * 2))
    width = 2 * (settings.width // (pipe.vae_scale_factor * 2))
    shape = (transformer.config.in_channels, height // 2, width // 2)
    noise = seeded_noise(shape, seed, count).to(device=pipe._execution_device, dtype=transformer.dtype)
    return pipe._pack_latents(noise), pipe._prepare_latent_ids(noise[:1]).to(pipe._execution_device)


def flux2_timesteps(pipe: Any, scheduler: Any, steps: int, image_seq_len: int) -> list[torch.Tensor]:
    """Flux2Pipeline's schedule: linear sigmas, shifted by its empirical ``mu`` for the image size and steps."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, pipe._execution_device, sigmas=sigmas, mu=mu)
    return list(timesteps)


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_flux2_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along FLUX.2's (guidance-embedded) trajectory, feeding every transformer call to
    ``run.session``."""
    _check_pipeline(pipe)
    source, target, seed = run.source, run.target, run.seed
    transformer, device, dtype = pipe.transformer, pipe._execution_device, pipe.transformer.dtype
    length = _length(settings)
    src, text_ids = pipe.encode_prompt(prompt=list(source), device=device, max_sequence_length=length)
    tgt, _ = pipe.encode_prompt(prompt=list(target), device=device, max_sequence_length=length)
    latents, image_ids = flux2_latents(pipe, settings, seed, len(source))
    scheduler = copy.deepcopy(pipe.scheduler)
    timesteps = flux2_timesteps(pipe, scheduler, settings.num_inference_steps, latents.shape[1])
    scheduler.set_begin_index(0)

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        batch = layout.copies * layout.k
        return transformer(
            hidden_states=torch.cat([latents[rows]] * layout.copies).to(dtype),
            timestep=t.expand(batch).to(latents.dtype) / 1000,
            guidance=torch.full([batch], settings.guidance_scale, device=device, dtype=torch.float32),
            encoder_hidden_states=layout.stack(tgt, src, rows),
            txt_ids=text_ids[:1],
            img_ids=image_ids,
            return_dict=False,
        )[0][:, : latents.shape[1]]

    # FLUX.2 runs no CFG batch (its guidance scale is embedded)
    follow_scheduler(
        run, latents, timesteps, scheduler, call, guided=False, guidance_scale=settings.guidance_scale
    )


ADAPTER = DiffusersAdapter(
    run_trajectory=run_flux2_trajectory,
    timestep_scale=lambda pipe: 1.0,  # Flux2Pipeline passes timestep / 1000: the noise level itself
    patch_size=2,
)
