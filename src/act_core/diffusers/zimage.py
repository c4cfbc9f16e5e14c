"""Z-Image in diffusers: the family's sampling adapter (``act_core.families.zimage`` holds its data).

ZImagePipeline guides when ``guidance_scale > 0`` (Z-Image-Turbo: 0, no CFG), as ``cond + scale * (cond -
uncond)``, in one transformer call on ``[cond; uncond]``; fitting calls the transformer on ``[uncond; target;
source; plain source]`` rows instead (the row order is the session's, the predictions the same: each row is
its own image and caption in the transformer's lists) and guides as the pipeline does. The transformer takes
one latent (``(C, 1, H, W)``) and one caption (Qwen3's hidden states of its real tokens) per row, as lists,
and ``1 - sigma`` as its time; the pipeline steps the scheduler with the negated prediction, on its own
schedule (linear sigmas, shifted by ``mu`` for the image size).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..families.zimage import ZIMAGE
from ..sampling import CallRows, SamplingSettings, TrajectoryRun, follow_trajectory, seeded_noise
from .adapter import DiffusersAdapter

# ZImagePipeline's default image size (its __call__: ``height or 1024``), and the timestep its scheduler
# counts to (the pipeline gives the transformer ``(1000 - t) / 1000``).
NATIVE_SIZE = 1024
TIMESTEPS = 1000


def _encode(pipe: Any, prompts: list[str], negative_prompt: str | None, guided: bool, length: int):
    """(embeds, negative embeds): lists of one (tokens, width) tensor per prompt, as ZImagePipeline makes them."""
    negative = [negative_prompt or ""] * len(prompts)
    return pipe.encode_prompt(
        prompt=list(prompts),  # a copy: the pipeline writes the templated prompts into the list
        device=pipe._execution_device,
        do_classifier_free_guidance=guided,
        negative_prompt=negative,
        max_sequence_length=length,
    )


def _timesteps(pipe: Any, scheduler: Any, steps: int, image_seq_len: int) -> list[torch.Tensor]:
    """ZImagePipeline's schedule: its default sigmas, shifted by ``mu`` for the image's token count."""
    from diffusers.pipelines.z_image.pipeline_z_image import (
        calculate_shift,
        get_default_z_image_sigmas,
        retrieve_timesteps,
    )

    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    sigmas = get_default_z_image_sigmas(steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, pipe._execution_device, sigmas=sigmas, mu=mu)
    return list(timesteps)


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_zimage_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along Z-Image's trajectory (guided when ``guidance_scale > 0``), feeding every
    transformer call to ``run.session``."""
    source, target, seed = run.source, run.target, run.seed
    transformer, device = pipe.transformer, pipe._execution_device
    guided, scale = settings.guided, settings.guidance_scale
    length = settings.max_sequence_length or ZIMAGE.max_sequence_length[0]
    src, _ = _encode(pipe, list(source), None, False, length)
    tgt, neg = _encode(pipe, list(target), settings.negative_prompt, guided, length)
    # ZImagePipeline.prepare_latents: float32, the latent size rounded to whole 2x2 patches
    shape = (
        transformer.in_channels,
        2 * (settings.height // (pipe.vae_scale_factor * 2)),
        2 * (settings.width // (pipe.vae_scale_factor * 2)),
    )
    latents = seeded_noise(shape, seed, len(source)).to(device=device, dtype=torch.float32)
    scheduler = copy.deepcopy(pipe.scheduler)
    timesteps = _timesteps(pipe, scheduler, settings.num_inference_steps, (shape[1] // 2) * (shape[2] // 2))
    scheduler.set_begin_index(0)

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        images = list(latents.to(transformer.dtype).unsqueeze(2).unbind(0))  # (C, 1, H, W) per row
        time = (TIMESTEPS - t.expand(layout.copies * layout.k)) / TIMESTEPS  # Z-Image's 0 is pure noise
        out = transformer(
            layout.entries(images, images, rows, images), time, layout.entries(tgt, src, rows, neg)
        )
        return torch.stack([row.float() for row in out[0]]).squeeze(2)

    follow_trajectory(
        run,
        latents,
        timesteps,
        level_of=lambda t: min(1.0, max(0.0, float(t) / TIMESTEPS)),
        call=call,
        # the pipeline steps with the negated prediction (its transformer predicts toward the image)
        advance=lambda prediction, t, latents: scheduler.step(-prediction, t, latents, return_dict=False)[0],
        guided=guided,
        guidance_scale=scale,
        guide=lambda uncond, cond: cond + scale * (cond - uncond),  # ZImagePipeline's CFG rule
    )


ADAPTER = DiffusersAdapter(
    run_trajectory=run_zimage_trajectory,
    timestep_scale=lambda pipe: 1.0,  # ZImagePipeline passes (1000 - t) / 1000: one minus the noise level
    timestep_reversed=True,
    patch_size=2,
    native_size=lambda pipe: NATIVE_SIZE,
    cfg_threshold=0.0,  # ZImagePipeline guides whenever guidance_scale > 0
)
