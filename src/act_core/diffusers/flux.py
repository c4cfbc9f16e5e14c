"""FLUX.1 in diffusers: ``act_pipeline(FluxPipeline...)`` gets the same verbs as SDXL.

What differs from SDXL is data (``act_core.families.flux``: parts, presets, the blocks' output streams)
and the sampler loop the fit follows (``run_flux_trajectory``): FLUX.1 runs no CFG batch (dev embeds its
guidance scale, schnell none), so a fitting call has rows ``[target; source; plain source]`` on shared
packed latents, the flow-matching scheduler with the pipeline's own shift, and the transformer gets
``timestep = sigma`` (the noise level itself).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..families.flux import FLUX, TEXT_ENCODER, TEXT_ENCODER_2, component_modules
from ..trajectory import TrajectoryFit
from .fitting import CallRows, Progress, SamplingSettings, follow_trajectory, seeded_noise
from .pipeline import ACTPipelineMixin


def _flux_encode(pipe: Any, prompts: list[str], max_sequence_length: int):
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=pipe._execution_device, max_sequence_length=max_sequence_length
    )
    return embeds, pooled, text_ids


def _timesteps(pipe: Any, scheduler: Any, steps: int, image_seq_len: int) -> list[torch.Tensor]:
    """The pipeline's own schedule: linear sigmas, shifted for the image size as FluxPipeline does."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, pipe._execution_device, sigmas=sigmas, mu=mu)
    return list(timesteps)


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_flux_trajectory(
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
    """Sample the pairs along FLUX's (guidance-embedded) trajectory, feeding every transformer call to ``session``."""
    n = len(source)
    transformer, device, dtype = pipe.transformer, pipe._execution_device, pipe.transformer.dtype
    length = settings.max_sequence_length or 512
    src, src_pooled, text_ids = _flux_encode(pipe, list(source), length)
    tgt, tgt_pooled, _ = _flux_encode(pipe, list(target), length)
    channels = transformer.config.in_channels // 4
    height = 2 * (settings.height // (pipe.vae_scale_factor * 2))
    width = 2 * (settings.width // (pipe.vae_scale_factor * 2))
    noise = seeded_noise((channels, height, width), seed, n).to(device=device, dtype=dtype)
    latents = pipe._pack_latents(noise, n, channels, height, width)
    image_ids = pipe._prepare_latent_image_ids(n, height // 2, width // 2, device, dtype)
    scheduler = copy.deepcopy(pipe.scheduler)
    timesteps = _timesteps(pipe, scheduler, settings.num_inference_steps, latents.shape[1])
    scheduler.set_begin_index(0)
    chunks = [range(start, min(n, start + pairs_in_call)) for start in range(0, n, pairs_in_call)]

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

    follow_trajectory(
        session,
        latents,
        timesteps,
        chunks,
        level_of=lambda t: min(1.0, max(0.0, float(t) / 1000)),
        call=call,
        advance=lambda prediction, t, latents: scheduler.step(prediction, t, latents, return_dict=False)[0],
        guided=False,  # FLUX runs no CFG batch (dev embeds its guidance scale)
        calibrate=calibrate,
        trajectory=trajectory,
        guidance_scale=settings.guidance_scale,
        progress=progress,
        check_interrupt=check_interrupt,
    )


def flux_tokenize(pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
    """Token ids for CLIP (its own length) and T5 (``max_sequence_length``), as FluxPipeline pads them."""
    tokens = {}
    for part, tokenizer_name, length in (
        (TEXT_ENCODER, "tokenizer", None),
        (TEXT_ENCODER_2, "tokenizer_2", max_sequence_length),
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


def flux_text_runner(pipe: Any) -> Callable[[tuple[int, dict[str, torch.Tensor]]], None]:
    """``run_model((first_index, tokens))`` for text-encoder presets: CLIP's pooled vector and T5's tokens."""

    @torch.no_grad()  # grad mode is per thread: the lockstep workers need it set here
    def run_model(batch: tuple[int, dict[str, torch.Tensor]]) -> None:
        _, tokens = batch
        device = pipe._execution_device
        if TEXT_ENCODER in tokens:
            pipe.text_encoder(tokens[TEXT_ENCODER].to(device), output_hidden_states=False)
        if TEXT_ENCODER_2 in tokens:
            pipe.text_encoder_2(tokens[TEXT_ENCODER_2].to(device), output_hidden_states=False)

    return run_model


class ACTSequenceLengthMixin(ACTPipelineMixin):
    """For pipelines with a T5 encoder (FLUX, SD3): ``fit_act(max_sequence_length=...)`` takes the T5 length
    you sample with (FluxPipeline's default 512, StableDiffusion3Pipeline's 256) into the fit's settings."""

    _act_max_sequence_length: int | None = None

    def fit_act(self, source_prompts, target_prompts, *, max_sequence_length: int | None = None, **options):
        """``ACTPipelineMixin.fit_act`` with the T5 ``max_sequence_length`` you sample with."""
        from ..validation import check_positive_int

        if max_sequence_length is not None:
            check_positive_int(max_sequence_length, "max_sequence_length")
        previous, self._act_max_sequence_length = self._act_max_sequence_length, max_sequence_length
        try:
            return super().fit_act(source_prompts, target_prompts, **options)
        finally:
            self._act_max_sequence_length = previous

    def _act_sampling(self, steps, guidance, height, width, negative_prompt) -> SamplingSettings:
        settings = super()._act_sampling(steps, guidance, height, width, negative_prompt)
        settings.max_sequence_length = self._act_max_sequence_length
        return settings


class ACTFluxPipelineMixin(ACTSequenceLengthMixin):
    """Adds ACT to a diffusers ``FluxPipeline`` (FLUX.1-dev / schnell): the SDXL verbs, FLUX's data.
    ``guidance_scale`` is FLUX.1-dev's embedded guidance (no CFG batch)."""

    act_family = FLUX

    def _act_component_modules(self, part: str, component: nn.Module) -> dict[str, nn.Module]:
        return component_modules(part, component)

    def _act_excluded(self, part: str) -> tuple[str, ...]:
        return ()

    def _act_timestep_scale(self) -> float:
        return 1.0  # FluxPipeline passes timestep / 1000: the noise level itself

    def _act_first_step_runner(
        self, settings: SamplingSettings, seed: int, statistics_steps: int, use_denoiser: bool
    ):
        if use_denoiser:
            from ..errors import ACTInputError

            raise ACTInputError(
                "FLUX presets fit along the sampling trajectory; there is no first-step FLUX protocol."
            )
        return flux_text_runner(self)

    def _act_tokenize(self, prompts: list[str]) -> Any:
        return flux_tokenize(self, prompts, self._act_max_sequence_length or 512)

    def _act_run_trajectory(
        self, session: TrajectoryFit, source: list[str], target: list[str], settings, **options
    ):
        run_flux_trajectory(self, session, source, target, settings, **options)

    def _act_rows_per_pair(self, settings: SamplingSettings, calibrate: bool) -> int:
        return CallRows(1, guided=False, calibrate=calibrate).copies  # no CFG batch
