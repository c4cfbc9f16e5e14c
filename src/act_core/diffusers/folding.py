"""The diffusers pipeline as a ``FoldHost`` of the one fold workflow (``act_core.distill``): its sampler with
the time-aware map enabled records the states, its denoiser runs them, and the map's own sampling settings
(its metadata) are the generation's unless overridden.

Pipelines whose denoiser call holds the CFG batch (``cfg_calls`` ``"batch"``: SDXL / SD 1.x / SD3,
``"batch_cond_first"``: Z-Image) or that run without CFG are hosts; pipelines that run the prompt's and the
negative prompt's calls separately (Chroma, Lumina 2, Qwen-Image) would need the two calls of a step paired,
and are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..distill import DenoiserCall, cfg_rows, fold_map, recording, run_call
from ..errors import ACTInputError
from ..maps import ACTMap
from .adapter import load_adapter
from .host import sampling_settings


def _layout(family: Any, guided: bool) -> str:
    """Where the prompt's rows sit in a denoiser call: "all" (no CFG), "uncond_first" or "cond_first"."""
    if not guided or not family.cfg_batch:
        return "all"
    if family.cfg_calls == "batch":
        return "uncond_first"
    if family.cfg_calls == "batch_cond_first":
        return "cond_first"
    raise ACTInputError(
        f"{family.display_name}'s pipeline runs the prompt's and the negative prompt's denoiser calls "
        "separately; the fold needs both halves of a step in one call (pairing the two calls is not "
        "implemented)."
    )


class DiffusersFoldHost:
    """An ACT pipeline and the generation the fold follows (see ``act_core.distill.FoldHost``)."""

    name = "diffusers"

    def __init__(
        self,
        pipe: Any,
        act_map: ACTMap,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        max_sequence_length: int | None = None,
    ):
        if pipe.act_map is not None:
            raise ACTInputError("An ACT map is enabled or fused on this pipeline; call disable_act() first.")
        self.pipe, self.family = pipe, pipe.act_family
        self.denoiser: nn.Module = getattr(pipe, self.family.denoiser)
        self.adapter = load_adapter(self.family)
        overrides = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "negative_prompt": negative_prompt,
            "max_sequence_length": max_sequence_length,
        }
        fitted = dict(act_map.metadata.get("sampling") or {})
        pick = {key: value if value is not None else fitted.get(key) for key, value in overrides.items()}
        settings = sampling_settings(
            pipe,
            self.family,
            self.adapter,
            pick["num_inference_steps"],
            pick["guidance_scale"],
            pick["height"],
            pick["width"],
            pick["negative_prompt"],
            pick["max_sequence_length"],
        )
        self.generation = {
            "num_inference_steps": settings.num_inference_steps,
            self.adapter.guidance_parameter: settings.guidance_scale,
            "height": settings.height,
            "width": settings.width,
        }
        if settings.negative_prompt is not None:
            self.generation["negative_prompt"] = settings.negative_prompt
        if settings.max_sequence_length is not None:
            self.generation["max_sequence_length"] = settings.max_sequence_length
        # ZImagePipeline guides cond + s (cond - uncond): the usual scale is s + 1
        self.scale = settings.guidance_scale + (1.0 - self.adapter.cfg_threshold)
        self.layout = _layout(self.family, settings.guided)

    def modules(self) -> Mapping[str, nn.Module]:
        return self.pipe.act_modules([self.family.denoiser])

    def _noise_level(self, args: tuple, kwargs: dict) -> float | None:
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
        if timestep is None:
            return None
        level = float(torch.as_tensor(timestep).flatten()[0]) / self.adapter.timestep_scale(self.pipe)
        return 1.0 - level if self.adapter.timestep_reversed else level

    def _describe(self, args: tuple, kwargs: dict) -> DenoiserCall:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
        batch = len(sample) if isinstance(sample, (list, tuple)) else int(sample.shape[0])
        prompts = batch if self.layout == "all" else batch // 2
        cond, uncond = cfg_rows(prompts, self.layout)
        return DenoiserCall(args, kwargs, self._noise_level(args, kwargs), batch, cond, uncond, self.scale)

    def record(
        self, act_map: ACTMap, strength: float, prompts: Sequence[str], seed: int
    ) -> list[DenoiserCall]:
        """The pipeline's own generation of ``prompts`` (latents only) with ``act_map`` enabled."""
        try:
            self.pipe.enable_act(act_map, strength)  # its own cfg_rows
            generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
            with recording(self.denoiser, self._describe) as calls, torch.no_grad():
                self.pipe(list(prompts), generator=generators, output_type="latent", **self.generation)
        finally:
            self.pipe.disable_act()
        return calls

    def run(self, call: DenoiserCall, rows: torch.Tensor | None) -> torch.Tensor:
        return run_call(self.denoiser, call, rows)

    def fitting(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def metadata(self) -> dict:
        return {
            "host": self.name,
            "sampling": {**self.generation, "scheduler": type(self.pipe.scheduler).__name__},
        }


def fold_to_static(
    pipe: Any,
    act_map: ACTMap,
    source_prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
    **options: Any,
) -> ACTMap:
    """``act_core.distill.fold_map`` on this pipeline: a static, foldable map that steers like ``act_map``'s
    hooks along the pipeline's own generations of ``source_prompts``. Sampling settings default to the ones
    ``act_map`` was fitted with (its metadata), then the pipeline's; ``options`` are ``fold_map``'s (steps,
    lr, strength, seed, progress...)."""
    host = DiffusersFoldHost(
        pipe,
        act_map,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length,
    )
    return fold_map(host, act_map, source_prompts, **options)
