"""The diffusers pipeline as a ``FitHost`` of the one fit workflow (``act_core.workflow``): its modules, its
tokenizers, its sampling settings and, through the family's adapter, its sampler."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..families import ModelFamily
from ..fitting import fit_with_stats
from ..maps import ACTMap
from ..sampling import SamplingSettings, TrajectoryRun
from ..validation import (
    check_prompt_sets,
    check_sampling,
    check_size,
    warn_unknown_words,
)
from ..workflow import FirstStepFit, check_family_sampling, split_pairs, text_encoders_steered
from .adapter import DiffusersAdapter, load_adapter, pairs_per_call, text_encoder_token_masks

# Where a pipeline's __call__ has no usable default (never for diffusers' own pipelines).
FALLBACK_STEPS, FALLBACK_GUIDANCE = 50, 5.0


def call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of ``name`` in the pipeline class's own ``__call__`` (what a plain generation uses),
    skipping ACT's ``__call__(*args, **kwargs)``."""
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is None:
            continue
        try:
            parameter = inspect.signature(call).parameters.get(name)
        except (TypeError, ValueError):
            continue
        if parameter is not None and parameter.default not in (inspect.Parameter.empty, None):
            return parameter.default
    return fallback


def sampling_settings(
    pipe: Any,
    family: ModelFamily,
    adapter: DiffusersAdapter,
    steps: Any,
    guidance: Any,
    height: Any,
    width: Any,
    negative_prompt: Any,
    max_sequence_length: Any,
) -> SamplingSettings:
    """The settings a fit follows: what was passed, else the pipeline's own defaults, all checked."""
    steps = call_default(pipe, "num_inference_steps", FALLBACK_STEPS) if steps is None else steps
    if guidance is None:
        guidance = call_default(pipe, adapter.guidance_parameter, FALLBACK_GUIDANCE)
    steps, guidance = check_sampling(steps, guidance)
    if adapter.native_size is not None:
        native = adapter.native_size(pipe)
    else:
        native = getattr(pipe, "default_sample_size", 8) * pipe.vae_scale_factor
    multiple = pipe.vae_scale_factor * adapter.patch_size
    why = f"the VAE downsamples by {pipe.vae_scale_factor}"
    if adapter.patch_size > 1:
        why += f" and the transformer packs {adapter.patch_size}x{adapter.patch_size} latent patches"
    height, width = check_size(
        native if height is None else height, native if width is None else width, multiple, why
    )
    max_sequence_length = check_family_sampling(family, negative_prompt, max_sequence_length)
    return SamplingSettings(
        steps,
        guidance,
        height,
        width,
        negative_prompt,
        max_sequence_length,
        # QwenImagePipeline runs its true CFG only with a negative prompt: without one, no uncond rows
        cfg_batch=family.cfg_batch and (negative_prompt is not None or not adapter.cfg_needs_negative_prompt),
        cfg_threshold=adapter.cfg_threshold,
    )


class DiffusersFitHost:
    """One ``fit_act`` call's view of an ACT pipeline (see ``act_core.workflow.FitHost``)."""

    name = "diffusers"

    def __init__(self, pipe: Any, settings: SamplingSettings):
        self.pipe, self.family, self.settings = pipe, pipe.act_family, settings
        self.adapter = load_adapter(self.family)

    def part_modules(self, part: str) -> Mapping[str, nn.Module]:
        return self.pipe.act_modules([part])

    def has_part(self, part: str) -> bool:
        return getattr(self.pipe, part, None) is not None

    def dead_modules(self, part: str) -> tuple[str, ...]:
        config = getattr(getattr(self.pipe, part, None), "config", None)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        return self.family.dead_modules(part, layers, getattr(self.pipe, "text_encoder_2", None) is not None)

    def check_prompt_sets(self, source: list[str], target: list[str]) -> None:
        tokenizer = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer (Flux2Pipeline)
        if tokenizer is None:
            check_prompt_sets(source, target)
            return
        warn_unknown_words(tokenizer, source + target)

        def keys(prompts: list[str]) -> list[tuple[int, ...]]:
            ids = tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length).input_ids
            return [tuple(row) for row in ids]

        check_prompt_sets(
            source, target, keys(source), keys(target), f" (at {tokenizer.model_max_length} tokens)"
        )

    def fit_first_step(self, fit: FirstStepFit) -> ACTMap:
        uses_denoiser = any(name.startswith(f"{self.family.denoiser}.") for name in fit.modules)
        run_model = self.adapter.first_step_runner(
            self.pipe, self.settings, fit.seed, fit.statistics_steps, uses_denoiser
        )

        def batches(prompts: list[str]) -> list[tuple[int, Any]]:
            # Tokenize here, in the calling thread: tokenizers are not thread-safe, and lockstep fitting runs
            # the batches concurrently.
            return [
                (start, self.adapter.tokenize(self.pipe, chunk, self.settings))
                for start, chunk in split_pairs(prompts, fit.batch_size)
            ]

        strategy = fit.causal_strategy
        if fit.statistics_steps > 1 and fit.mode == "causal":
            strategy = "groupwise"
        with text_encoder_token_masks(self.pipe):
            act_map, _ = fit_with_stats(
                run_model,
                batches(fit.source),
                batches(fit.target),
                dict(fit.modules),
                mode=fit.mode,
                causal_strategy=strategy,
                max_lockstep_batches=fit.max_lockstep_batches,
                progress=fit.progress,
                **fit.estimator_options,
            )
        return act_map

    def pairs_per_call(self, num_pairs: int, rows_per_pair: int) -> int:
        return pairs_per_call(self.pipe, self.family, num_pairs, self.settings, rows_per_pair)

    def steer_text_encoders(self, text_map: ACTMap) -> contextlib.AbstractContextManager:
        return text_encoders_steered(self.pipe.act_modules(text_map.parts()), text_map)

    def sample(self, run: TrajectoryRun) -> None:
        self.adapter.run_trajectory(self.pipe, run, self.settings)

    def fitting(self) -> contextlib.AbstractContextManager:
        return self.pipe._act_fitting()

    def metadata(self, protocol: str, uses_denoiser: bool) -> dict:
        return {
            "model": type(self.pipe).__name__.removeprefix("ACT"),
            "sampling": self.settings.as_metadata(type(self.pipe.scheduler).__name__),
        }
