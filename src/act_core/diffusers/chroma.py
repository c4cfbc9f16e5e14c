"""Chroma in diffusers: the family's sampling adapter (``act_core.families.chroma`` holds its data).

ChromaPipeline samples with real CFG as two transformer calls a step (the prompt's, then the negative
prompt's); fitting puts both in one call, rows ``[uncond; target; source; plain source]`` on shared packed
latents (the same predictions: each row attends only to its own tokens), so the session sees the whole
step at once. Every row carries its own T5 attention mask (Chroma masks the padding after the first pad
token), stacked like the embeddings. The flow-matching schedule is the pipeline's (linear sigmas, shifted
for the image size), and the transformer gets ``timestep = sigma`` (the noise level itself), as in FLUX.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ACTInputError
from ..families.chroma import CHROMA, TEXT_ENCODER
from ..sampling import CallRows, SamplingSettings, TrajectoryRun
from .adapter import DiffusersAdapter, follow_scheduler, packed_latents, shifted_flow_timesteps


def _length(settings: SamplingSettings) -> int:
    return settings.max_sequence_length or CHROMA.max_sequence_length[0]


def _encode(pipe: Any, prompts: list[str], negative_prompt: str | None, guided: bool, length: int):
    """(embeds, mask, negative embeds, negative mask) as ChromaPipeline.encode_prompt makes them."""
    embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
        prompt=prompts,
        negative_prompt=negative_prompt,
        device=pipe._execution_device,
        do_classifier_free_guidance=guided,
        max_sequence_length=length,
    )
    return embeds, mask, negative, negative_mask


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_chroma_trajectory(pipe: Any, run: TrajectoryRun, settings: SamplingSettings) -> None:
    """Sample the run's pairs along Chroma's guided trajectory, feeding every transformer call to
    ``run.session``."""
    source, target, seed = run.source, run.target, run.seed
    n = len(source)
    transformer, device, dtype = pipe.transformer, pipe._execution_device, pipe.transformer.dtype
    guided, length = settings.guided, _length(settings)
    src, src_mask, _, _ = _encode(pipe, list(source), None, False, length)
    tgt, tgt_mask, neg, neg_mask = _encode(pipe, list(target), settings.negative_prompt, guided, length)
    text_ids = torch.zeros(src.shape[1], 3, device=device, dtype=dtype)
    latents, image_ids = packed_latents(pipe, settings, seed, n)
    image_tokens = latents.shape[1]
    scheduler = copy.deepcopy(pipe.scheduler)
    timesteps = shifted_flow_timesteps(pipe, scheduler, settings.num_inference_steps, image_tokens)
    scheduler.set_begin_index(0)

    def call(latents: torch.Tensor, t: torch.Tensor, rows: list[int], layout: CallRows) -> torch.Tensor:
        batch = layout.copies * layout.k
        # The text masks extended over the image tokens, as ChromaPipeline._prepare_attention_mask does.
        mask = pipe._prepare_attention_mask(
            batch, image_tokens, dtype, layout.stack(tgt_mask, src_mask, rows, neg_mask)
        )
        return transformer(
            hidden_states=torch.cat([latents[rows]] * layout.copies),
            timestep=t.expand(batch).to(dtype) / 1000,
            encoder_hidden_states=layout.stack(tgt, src, rows, neg),
            txt_ids=text_ids,
            img_ids=image_ids,
            attention_mask=mask,
            return_dict=False,
        )[0]

    follow_scheduler(
        run, latents, timesteps, scheduler, call, guided=guided, guidance_scale=settings.guidance_scale
    )


def chroma_tokenize(pipe: Any, prompts: list[str], settings: SamplingSettings) -> dict[str, torch.Tensor]:
    """T5's token ids, padded to ``max_sequence_length`` as ChromaPipeline pads them."""
    if getattr(pipe, TEXT_ENCODER, None) is None or getattr(pipe, "tokenizer", None) is None:
        return {}
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=_length(settings), truncation=True, return_tensors="pt"
    ).input_ids
    return {TEXT_ENCODER: ids}


def _t5_mask(ids: torch.Tensor, eos: int | None) -> torch.Tensor:
    """The tokenizer's attention mask of right-padded ids: every token up to and including the first EOS."""
    if eos is None:
        return torch.ones_like(ids)
    is_eos = (ids == eos).long()
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).long()


def chroma_text_runner(
    pipe: Any, settings: SamplingSettings, seed: int, statistics_steps: int, use_denoiser: bool
) -> Callable[[tuple[int, dict[str, torch.Tensor]]], None]:
    """``run_model((first_index, tokens))`` for text-encoder presets: T5 with its attention mask, as
    ChromaPipeline runs it (unlike FLUX's)."""
    if use_denoiser:
        raise ACTInputError(
            "Chroma presets fit along the sampling trajectory; there is no first-step Chroma protocol."
        )
    eos = getattr(getattr(pipe, "tokenizer", None), "eos_token_id", None)

    @torch.no_grad()  # grad mode is per thread: the lockstep workers need it set here
    def run_model(batch: tuple[int, dict[str, torch.Tensor]]) -> None:
        _, tokens = batch
        if TEXT_ENCODER in tokens:
            device = pipe._execution_device
            ids = tokens[TEXT_ENCODER]
            pipe.text_encoder(
                ids.to(device), attention_mask=_t5_mask(ids, eos).to(device), output_hidden_states=False
            )

    return run_model


ADAPTER = DiffusersAdapter(
    run_trajectory=run_chroma_trajectory,
    tokenize=chroma_tokenize,
    first_step_runner=chroma_text_runner,
    timestep_scale=lambda pipe: 1.0,  # ChromaPipeline passes timestep / 1000: the noise level itself
    patch_size=2,
)
