"""FLUX.1 in diffusers: the family's sampling adapter (``act_core.families.flux`` holds its data).

FLUX.1 runs no CFG batch (dev embeds its guidance scale, schnell none), so a fitting call has rows
``[target; source; plain source]`` on shared packed latents, the flow-matching scheduler with the pipeline's
own shift, and the transformer gets ``timestep = sigma`` (the noise level itself).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ACTInputError
from ..families.flux import FLUX, TEXT_ENCODER, TEXT_ENCODER_2
from ..sampling import CallRows, SamplingSettings, TrajectoryRun
from .adapter import DiffusersAdapter, follow_scheduler, packed_latents, shifted_flow_timesteps


def _flux_encode(pipe: Any, prompts: list[str], max_sequence_length: int):
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=pipe._execution_device, max_sequence_length=max_sequence_length
    )
    return embeds, pooled, text_ids


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_flux_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along FLUX's (guidance-embedded) trajectory, feeding every transformer call to
    ``run.session``."""
    source, target, seed = run.source, run.target, run.seed
    n = len(source)
    transformer, device, dtype = pipe.transformer, pipe._execution_device, pipe.transformer.dtype
    length = settings.max_sequence_length or FLUX.max_sequence_length[0]
    src, src_pooled, text_ids = _flux_encode(pipe, list(source), length)
    tgt, tgt_pooled, _ = _flux_encode(pipe, list(target), length)
    latents, image_ids = packed_latents(pipe, settings, seed, n)
    scheduler = copy.deepcopy(pipe.scheduler)
    timesteps = shifted_flow_timesteps(pipe, scheduler, settings.num_inference_steps, latents.shape[1])
    scheduler.set_begin_index(0)

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        copies = layout.copies
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full(
                [copies * layout.k], settings.guidance_scale, device=device, dtype=torch.float32
            )
        return transformer(
            hidden_states=torch.cat([latents[rows]] * copies),
            timestep=(t.expand(copies * layout.k) / 1000).to(dtype),
            guidance=guidance,
            pooled_projections=layout.stack(tgt_pooled, src_pooled, rows),
            encoder_hidden_states=layout.stack(tgt, src, rows),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    # FLUX runs no CFG batch (dev embeds its guidance scale)
    follow_scheduler(
        run, latents, timesteps, scheduler, call, guided=False, guidance_scale=settings.guidance_scale
    )


def flux_tokenize(pipe: Any, prompts: list[str], settings: SamplingSettings) -> dict[str, torch.Tensor]:
    """Token ids for CLIP (its own length) and T5 (``max_sequence_length``), as FluxPipeline pads them."""
    tokens = {}
    for part, tokenizer_name, length in (
        (TEXT_ENCODER, "tokenizer", None),
        (TEXT_ENCODER_2, "tokenizer_2", settings.max_sequence_length or FLUX.max_sequence_length[0]),
    ):
        tokenizer = getattr(pipe, tokenizer_name, None)
        if getattr(pipe, part, None) is not None and tokenizer is not None:
            tokens[part] = tokenizer(
                prompts,
                padding="max_length",
                max_length=length or tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
    return tokens


def flux_text_runner(
    pipe: Any, settings: SamplingSettings, seed: int, statistics_steps: int, use_denoiser: bool
) -> Callable[[tuple[int, dict[str, torch.Tensor]]], None]:
    """``run_model((first_index, tokens))`` for text-encoder presets: CLIP's pooled vector and T5's tokens."""
    if use_denoiser:
        raise ACTInputError(
            "FLUX presets fit along the sampling trajectory; there is no first-step FLUX protocol."
        )

    @torch.no_grad()  # grad mode is per thread: the lockstep workers need it set here
    def run_model(batch: tuple[int, dict[str, torch.Tensor]]) -> None:
        _, tokens = batch
        device = pipe._execution_device
        if TEXT_ENCODER in tokens:
            pipe.text_encoder(tokens[TEXT_ENCODER].to(device), output_hidden_states=False)
        if TEXT_ENCODER_2 in tokens:
            pipe.text_encoder_2(tokens[TEXT_ENCODER_2].to(device), output_hidden_states=False)

    return run_model


ADAPTER = DiffusersAdapter(
    run_trajectory=run_flux_trajectory,
    tokenize=flux_tokenize,
    first_step_runner=flux_text_runner,
    timestep_scale=lambda pipe: 1.0,  # FluxPipeline passes timestep / 1000: the noise level itself
    patch_size=2,
)
