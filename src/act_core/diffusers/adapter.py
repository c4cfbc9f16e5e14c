"""What a family's diffusers adapter gives (``DiffusersAdapter``), and the helpers every adapter shares.

Each family names its adapter module in ``ModelFamily.diffusers_adapter`` (``act_core.diffusers.sdxl``,
``.flux``, ``.sd3``); the module defines ``ADAPTER``. An adapter is the family's sampling loop on the
fitting rows (its denoiser call and scheduler step, handed to ``act_core.sampling.follow_trajectory``),
its tokenizers and, where the paper's first-step protocol applies, its first-step model run.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import memory
from ..errors import ACTInputError, ACTWarning
from ..families import ModelFamily
from ..recording import token_mask_hooks
from ..sampling import SamplingSettings, TrajectoryRun, follow_trajectory, seeded_noise

# diffusers' convention: text_encoder_N is tokenized by tokenizer_N.
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}

FirstStepRunner = Callable[[Any], None]


def no_first_step(pipe: Any, settings: SamplingSettings, seed: int, steps: int, use_denoiser: bool):
    """For families whose presets all fit along the trajectory."""
    raise ACTInputError(
        "This model family's presets fit along the sampling trajectory; there is no first-step or "
        "text-encoder-only protocol for it."
    )


def default_timestep_scale(pipe: Any) -> float:
    """The denoiser's ``timestep`` argument divided by this is the noise level in [0, 1]."""
    return float(pipe.scheduler.config.num_train_timesteps)


def tokenize(
    pipe: Any, prompts: list[str], settings: SamplingSettings | None = None
) -> dict[str, torch.Tensor]:
    """Token ids for each text encoder, padded to the tokenizer's max length as the pipeline does."""
    tokens = {}
    for part, tokenizer_name in TOKENIZERS.items():
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


@dataclass(frozen=True)
class DiffusersAdapter:
    """A family's sampling code for diffusers pipelines."""

    # (pipe, run, settings): sample the run's pairs, every denoiser call inside ``run.session.call``.
    run_trajectory: Callable[[Any, TrajectoryRun, SamplingSettings], None]
    # (pipe, settings, seed, statistics_steps, use_denoiser) -> run_model((first index, tokens)).
    first_step_runner: Callable[[Any, SamplingSettings, int, int, bool], FirstStepRunner] = no_first_step
    # (pipe, prompts, settings) -> {text-encoder part: token ids}, padded as the pipeline pads them.
    tokenize: Callable[[Any, list[str], SamplingSettings], dict[str, torch.Tensor]] = tokenize
    timestep_scale: Callable[[Any], float] = default_timestep_scale
    # Whether the denoiser's timestep runs the other way, from 0 at pure noise (Lumina2Pipeline and
    # ZImagePipeline pass 1 - sigma): the noise level is then 1 - timestep / timestep_scale.
    timestep_reversed: bool = False
    # Image sizes are multiples of vae_scale_factor * patch_size (FLUX and SD3 pack 2x2 latent patches).
    patch_size: int = 1
    # The pipeline's default image size in pixels, for pipelines without ``default_sample_size`` (a fit's
    # default size); None: ``default_sample_size * vae_scale_factor``.
    native_size: Callable[[Any], int] | None = None
    # The pipeline runs CFG when its guidance scale exceeds this: 1 in the usual convention, 0 for
    # ZImagePipeline, which guides ``cond + scale * (cond - uncond)``.
    cfg_threshold: float = 1.0
    # The pipeline ``__call__`` parameter that is the CFG scale a fit's ``guidance_scale`` stands for (its
    # default is the fit's default; the CLI's sweep passes ``--guidance`` under this name): QwenImagePipeline's
    # is ``true_cfg_scale`` (its ``guidance_scale`` feeds guidance-distilled transformers only).
    guidance_parameter: str = "guidance_scale"
    # Whether the pipeline runs CFG only when it is given a negative prompt (QwenImagePipeline's true CFG):
    # without one a fit follows the unguided trajectory, as the pipeline samples.
    cfg_needs_negative_prompt: bool = False


def call_guides(adapter: DiffusersAdapter, arguments: Mapping[str, Any]) -> bool:
    """Whether a pipeline call with these (bound, defaults applied) arguments runs CFG, by the adapter's
    guidance parameter and negative-prompt rule (for pipelines with no ``do_classifier_free_guidance``)."""
    scale = arguments.get(adapter.guidance_parameter)
    try:
        guided = scale is not None and float(scale) > adapter.cfg_threshold
    except (TypeError, ValueError):
        return False
    if adapter.cfg_needs_negative_prompt:
        guided = guided and any(
            arguments.get(name) is not None for name in ("negative_prompt", "negative_prompt_embeds")
        )
    return guided


def load_adapter(family: ModelFamily) -> DiffusersAdapter:
    """The family's diffusers adapter (imported on first use: the core never imports a family's adapter)."""
    family.check_host("diffusers")
    return importlib.import_module(str(family.diffusers_adapter)).ADAPTER


def denoiser_of(pipe: Any, family: ModelFamily) -> torch.nn.Module:
    return getattr(pipe, family.denoiser)


def pairs_per_call(
    pipe: Any, family: ModelFamily, num_pairs: int, settings: SamplingSettings, rows: int
) -> int:
    """How many prompt pairs one denoiser call can take: all of them (exact) when memory allows, by the
    family's measured activation memory against the device's free memory (``act_core.memory``)."""
    device = pipe._execution_device
    denoiser = denoiser_of(pipe, family)
    itemsize = torch.empty((), dtype=denoiser.dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return num_pairs
    sizes = {
        "latent_pixels": memory.latent_pixels(settings.height, settings.width),
        "itemsize": itemsize,
        "free_bytes": free,
        "width": memory.denoiser_width(denoiser),
    }
    per_call = memory.pairs_per_call(family, rows_per_pair=rows, num_pairs=num_pairs, **sizes)
    held = memory.pairs_held_together(family, **sizes)
    if per_call < num_pairs and held < num_pairs:
        warnings.warn(
            f"ACT fitting: {num_pairs} prompt pairs do not fit in one {family.denoiser} call here, and a step split "
            f"over calls holds every pair's state at once (its source calls meet at each hooked module), which the "
            f"measured activation memory puts at about {held} pairs on this device at {settings.width}x"
            f"{settings.height}. The fit may run out of memory: use at most {held} prompt pairs (6 steer as well "
            "as 24 on every model measured), or a smaller size.",
            ACTWarning,
            stacklevel=2,
        )
    return per_call


def encode(pipe: Any, prompts: list[str], negative_prompt: str | None, guided: bool, **options):
    """(prompt embeds, pooled or None, negative embeds, negative pooled) as the pipeline computes them;
    ``options`` go to a pooled pipeline's ``encode_prompt`` (SD3: ``prompt_2``, ``max_sequence_length``...)."""
    device = pipe._execution_device
    negative = [negative_prompt] * len(prompts) if negative_prompt is not None else None
    if getattr(pipe, "text_encoder_2", None) is not None:
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=device, do_classifier_free_guidance=guided, negative_prompt=negative, **options
        )
        return embeds, pooled, negative_embeds, negative_pooled
    embeds, negative_embeds = pipe.encode_prompt(prompts, device, 1, guided, negative_prompt=negative)
    return embeds, None, negative_embeds, None


def follow_scheduler(
    run: TrajectoryRun,
    latents: torch.Tensor,
    timesteps: list,
    scheduler: Any,
    call: Callable,
    *,
    guided: bool,
    guidance_scale: float,
    timestep_scale: float = 1000.0,
    step_options: dict | None = None,
) -> torch.Tensor:
    """``follow_trajectory`` with a diffusers scheduler: the noise level is ``t / timestep_scale`` (clamped to
    [0, 1]) and the latents advance with ``scheduler.step``."""
    options = step_options or {}
    return follow_trajectory(
        run,
        latents,
        timesteps,
        level_of=lambda t: min(1.0, max(0.0, float(t) / timestep_scale)),
        call=call,
        advance=lambda prediction, t, x: scheduler.step(prediction, t, x, return_dict=False, **options)[0],
        guided=guided,
        guidance_scale=guidance_scale,
    )


def scheduler_step_options(scheduler: Any, seed: int) -> dict:
    """Stochastic samplers (ancestral, SDE) draw noise in ``step()``: seed it, so a fit is reproducible."""
    import inspect

    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator(device="cpu").manual_seed(seed)}
    return {}


def packed_latents(
    pipe: Any, settings: SamplingSettings, seed: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed noise latents, their image position ids) of FLUX-style transformers, which take 2x2 latent
    patches as tokens (FluxPipeline's and ChromaPipeline's ``_pack_latents``)."""
    transformer = pipe.transformer
    device, dtype = pipe._execution_device, transformer.dtype
    channels = transformer.config.in_channels // 4
    height = 2 * (settings.height // (pipe.vae_scale_factor * 2))
    width = 2 * (settings.width // (pipe.vae_scale_factor * 2))
    noise = seeded_noise((channels, height, width), seed, count).to(device=device, dtype=dtype)
    latents = pipe._pack_latents(noise, count, channels, height, width)
    return latents, pipe._prepare_latent_image_ids(count, height // 2, width // 2, device, dtype)


def shifted_flow_timesteps(pipe: Any, scheduler: Any, steps: int, image_seq_len: int) -> list[torch.Tensor]:
    """The schedule of FLUX-style pipelines: linear sigmas, shifted for the image size (``mu``)."""
    import numpy as np
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
        for part, tokenizer in TOKENIZERS.items():
            encoder = getattr(pipe, part, None)
            eos = getattr(getattr(pipe, tokenizer, None), "eos_token_id", None)
            if encoder is not None and eos is not None:
                handles += token_mask_hooks(encoder, mask_of(eos))
        yield
    finally:
        for handle in handles:
            handle.remove()
