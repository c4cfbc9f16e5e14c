"""Run a diffusers pipeline's own components to collect ACT statistics, for both protocols.

* ``run_trajectory``: the guided sampling loop the user generates with (the pipeline's scheduler,
  ``num_inference_steps``, ``guidance_scale``, size), on rows ``[uncond; target; source]`` that share
  their latents; the source rows come out of every UNet call already transported by
  ``act_core.trajectory.TrajectoryFit``, and (``trajectory="steered"``) their guided prediction
  advances the latents. Prompt pair i uses the noise of seed ``seed + i``.
* ``first_step_runner``: the paper's protocol (cond branch, guidance off, the first
  ``statistics_steps`` steps of the schedule), as a ``run_model(batch)`` for ``act_core.fitting``.

Everything here runs in the calling thread except ``first_step_runner``'s ``run_model``, which
lockstep fitting calls from worker threads (tokenizing happens before, in the calling thread).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ACTInputError
from ..families.sdxl import TEXT_ENCODER, TEXT_ENCODER_2
from ..recording import token_mask_hooks
from ..trajectory import TrajectoryFit, calibration_gain

# Rough live activation size of one UNet forward, per latent pixel and sample (SD/SDXL skip connections
# hold ~1700 channels at latent resolution), to decide how many rows one call can take.
ACTIVATION_ELEMENTS_PER_LATENT_PIXEL = 2500
Progress = Callable[[int, int, str], None]


@dataclass
class SamplingSettings:
    """The settings the user generates with, which fitting follows."""

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None = None
    max_sequence_length: int | None = None  # FLUX: the T5 length

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def as_metadata(self, scheduler: Any) -> dict:
        info = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
            "scheduler": type(scheduler).__name__,
        }
        if self.max_sequence_length is not None:
            info["max_sequence_length"] = self.max_sequence_length
        return info


def seeded_noise(shape: tuple[int, ...], seed: int, count: int) -> torch.Tensor:
    """``count`` noise tensors, number i from seed ``seed + i`` (independent of batching)."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]
    )


def pairs_per_call(pipe: Any, num_pairs: int, settings: SamplingSettings, rows_per_pair: int) -> int:
    """How many prompt pairs one UNet call can take: all of them (exact) when memory allows."""
    device = pipe._execution_device
    latent_pixels = (settings.height // pipe.vae_scale_factor) * (settings.width // pipe.vae_scale_factor)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    itemsize = torch.empty((), dtype=denoiser.dtype).element_size()
    per_pair = rows_per_pair * latent_pixels * ACTIVATION_ELEMENTS_PER_LATENT_PIXEL * itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return num_pairs
    return max(1, min(num_pairs, int(0.5 * free // max(1, per_pair))))


@dataclass(frozen=True)
class CallRows:
    """Where one fitting call's rows sit: ``[uncond (guided only); target; source; plain source (calibrate
    only)]``, ``k`` pairs each. Every host's trajectory runner lays its calls out this way."""

    k: int
    guided: bool
    calibrate: bool

    @property
    def offset(self) -> int:
        return self.k if self.guided else 0

    @property
    def copies(self) -> int:
        """How many rows each pair has in the call."""
        return (1 if self.guided else 0) + 2 + (1 if self.calibrate else 0)

    @property
    def target(self) -> slice:
        return slice(self.offset, self.offset + self.k)

    @property
    def source(self) -> slice:
        return slice(self.offset + self.k, self.offset + 2 * self.k)

    @property
    def plain(self) -> slice:
        return slice(self.offset + 2 * self.k, None)

    def stack(
        self,
        target: torch.Tensor,
        source: torch.Tensor,
        rows: list[int],
        negative: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One conditioning tensor (embeddings, pooled vectors) for this call's rows, in the layout above."""
        parts = ([negative[rows]] if self.guided else []) + [target[rows], source[rows]]
        return torch.cat(parts + ([source[rows]] if self.calibrate else []))


def step_prediction(
    calls: Sequence[tuple[CallRows, torch.Tensor]],
    session: TrajectoryFit,
    level: float,
    *,
    trajectory: str,
    calibrate: bool,
    guidance_scale: float,
) -> torch.Tensor:
    """The prediction that advances the latents, from every call of one step: the step's maps calibrated by one
    gain from all calls (``calibration_gain``), then the steered (or target) rows, guided where CFG runs."""
    gain = 1.0
    if calibrate:
        gain = calibration_gain(
            *(
                torch.cat([output[getattr(rows, name)] for rows, output in calls])
                for name in ("target", "source", "plain")
            )
        )
        session.scale_step(level, gain)
    chosen_rows = []
    for rows, output in calls:
        if trajectory == "steered":
            chosen = output[rows.source]
            if calibrate:
                plain = output[rows.plain]
                chosen = plain + gain * (chosen - plain)
        else:
            chosen = output[rows.target]
        if rows.guided:
            uncond = output[: rows.k]
            chosen = uncond + guidance_scale * (chosen - uncond)
        chosen_rows.append(chosen)
    return torch.cat(chosen_rows)


def follow_trajectory(
    session: TrajectoryFit,
    latents: torch.Tensor,
    timesteps: Sequence[torch.Tensor],
    chunks: Sequence[range],
    *,
    level_of: Callable[[torch.Tensor], float],
    call: Callable[[torch.Tensor, torch.Tensor, list[int], CallRows], torch.Tensor],
    advance: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    guided: bool,
    calibrate: bool,
    trajectory: str,
    guidance_scale: float,
    progress: Progress,
    check_interrupt: Callable[[], None],
) -> torch.Tensor:
    """The sampling loop every host's fit follows: at each step, every chunk of pairs in one denoiser call
    (``call(latents, t, rows, layout)`` with the ``CallRows`` layout) that ``session`` fits and transports,
    then ``advance(prediction, t, latents)`` with the step's prediction (``step_prediction``)."""
    total, done = len(timesteps) * len(chunks), 0
    for step, t in enumerate(timesteps):
        level = level_of(t)
        calls = []
        for chunk in chunks:
            check_interrupt()
            rows = list(chunk)
            layout = CallRows(len(rows), guided, calibrate)
            with session.call(level, source=layout.source, target=layout.target):
                output = call(latents, t, rows, layout)
            calls.append((layout, output))
            done += 1
            progress(done, total, f"step {step + 1}/{len(timesteps)}")
        prediction = step_prediction(
            calls, session, level, trajectory=trajectory, calibrate=calibrate, guidance_scale=guidance_scale
        )
        latents = advance(prediction, t, latents)
    return latents


def encode(pipe: Any, prompts: list[str], negative_prompt: str | None, guided: bool, **options):
    """(prompt embeds, pooled or None, negative embeds, negative pooled) as the pipeline computes them;
    ``options`` go to a pooled pipeline's ``encode_prompt`` (SD3: ``prompt_2``, ``max_sequence_length``...)."""
    device = pipe._execution_device
    negative = [negative_prompt] * len(prompts) if negative_prompt is not None else None
    if getattr(pipe, TEXT_ENCODER_2, None) is not None:
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=device, do_classifier_free_guidance=guided, negative_prompt=negative, **options
        )
        return embeds, pooled, negative_embeds, negative_pooled
    embeds, negative_embeds = pipe.encode_prompt(prompts, device, 1, guided, negative_prompt=negative)
    return embeds, None, negative_embeds, None


@torch.no_grad()  # no autograd graph along the trajectory: memory would grow with every step
def run_trajectory(
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
    """Sample ``len(source)`` pairs along the guided trajectory, feeding every UNet call to ``session``."""
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
    # Stochastic samplers (ancestral, SDE) draw noise in step(): seed it, so a fit is reproducible.
    step_options = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_options["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    chunks = [range(start, min(n, start + pairs_in_call)) for start in range(0, n, pairs_in_call)]

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

    follow_trajectory(
        session,
        latents,
        list(scheduler.timesteps),
        chunks,
        level_of=lambda t: min(1.0, max(0.0, float(t) / train_steps)),
        call=call,
        advance=lambda prediction, t, latents: scheduler.step(
            prediction, t, latents, return_dict=False, **step_options
        )[0],
        guided=guided,
        calibrate=calibrate,
        trajectory=trajectory,
        guidance_scale=settings.guidance_scale,
        progress=progress,
        check_interrupt=check_interrupt,
    )


# ------------------------------------------------------------------------------------------ first step
def tokenize(pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids for each text encoder, padded to the tokenizer's max length as the pipeline does."""
    tokens = {}
    for part, tokenizer_name in ((TEXT_ENCODER, "tokenizer"), (TEXT_ENCODER_2, "tokenizer_2")):
        tokenizer = getattr(pipe, tokenizer_name, None)
        if getattr(pipe, part, None) is not None and tokenizer is not None:
            tokens[part] = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
    return tokens


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
    pipe: Any, settings: SamplingSettings, seed: int, statistics_steps: int, use_unet: bool
) -> Callable[[tuple[int, dict[str, torch.Tensor]]], None]:
    """``run_model((first_index, tokens))``: encode, then the first denoising steps on seeded noise."""

    @torch.no_grad()  # grad mode is per thread: the lockstep workers need it set here
    def run_model(batch: tuple[int, dict[str, torch.Tensor]]) -> None:
        first_index, tokens = batch
        embeds, added = _encode_tokens(pipe, tokens, settings.height, settings.width)
        if not use_unet:
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


# ------------------------------------------------------------------------------------------ token masks
@contextlib.contextmanager
def text_encoder_token_masks(pipe: Any) -> Iterator[None]:
    """While fitting text-encoder modules, pool their outputs over real tokens (BOS..first EOS).

    A pre-hook on each text encoder derives the mask from its input ids and holds it for the duration
    of that encoder's forward (per thread: lockstep fitting runs batches concurrently).
    """

    def mask_of(eos: int):
        def mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
            ids = args[0] if args else kwargs.get("input_ids")
            if not isinstance(ids, torch.Tensor):
                return None
            is_eos = (ids == eos).int()
            return (is_eos.cumsum(dim=1) - is_eos) == 0  # up to and including the first EOS

        return mask

    handles: list = []
    try:
        for part, tokenizer in ((TEXT_ENCODER, "tokenizer"), (TEXT_ENCODER_2, "tokenizer_2")):
            encoder = getattr(pipe, part, None)
            eos = getattr(getattr(pipe, tokenizer, None), "eos_token_id", None)
            if encoder is not None and eos is not None:
                handles += token_mask_hooks(encoder, mask_of(eos))
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_guidance(settings: SamplingSettings) -> None:
    if settings.num_inference_steps < 1:
        raise ACTInputError(f"num_inference_steps must be at least 1, got {settings.num_inference_steps}.")
    if not settings.guidance_scale >= 0:
        raise ACTInputError(f"guidance_scale must be >= 0, got {settings.guidance_scale}.")
