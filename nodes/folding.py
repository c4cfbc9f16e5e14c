"""Fold a time-aware ACT map into one static map on a ComfyUI MODEL: the ComfyUI host of the one fold
workflow (``act_core.distill.fold_map``), behind the "Fold ACT map" node.

* **Recording.** ComfyUI's own sampler (``comfy.sample.sample``, as KSampler runs it: ``sampler_name``,
  ``scheduler``, ``steps``, ``cfg``, the negative prompt) samples the source prompts, prompt i on the noise
  of seed ``seed + i``, with the map applied as Apply ACT applies it (``applying.apply_map``: hooks on the
  cond rows, the bucket of each call's noise level). Torch hooks on the diffusion model record every call:
  its inputs, and from ``transformer_options["cond_or_uncond"]`` which rows are each prompt's cond and uncond
  predictions. The prompts go in calls of as many as ComfyUI's own memory estimate fits with both halves.
* **Target.** ComfyUI's CFG combines *denoised* predictions, ``uncond + cfg (cond - uncond)``; for one call
  (one sigma, one latent) denoised is an affine map of the diffusion model's raw output (EPS: ``x - sigma
  eps``), the same for both halves, so the guided combination of the raw outputs is the same target up to
  that affine map: the fold matches raw guided outputs, as the diffusers host does.
* **Split calls are refused.** When ComfyUI runs the prompts' and the negative prompt's rows in separate
  calls (its estimate said they do not fit together), a recorded call holds one half only; the fold needs
  both in one call (each Adam step runs them forward and backward together), so it stops and says so.
* **Fitting.** The recorded calls are replayed on the diffusion model with the static map's hooks, the
  MODEL loaded as it is (its own patches, no ACT hooks). ComfyUI runs nodes in inference mode, and weights
  loaded there are inference tensors, which autograd cannot save: while the fold runs, those are replaced
  by ordinary copies in the shared module (put back before ComfyUI samples again, and at the end).

Which family a MODEL is, and whether its maps fold, is ``act_core.families`` data.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from act_core.distill import FOLD_STEPS, DenoiserCall, fold_map, fold_prompts, recording, take_rows
from act_core.errors import ACTInputError, ACTWarning
from act_core.families import check_comfy_map
from act_core.lora import check_family_folds
from act_core.maps import ACTMap
from act_core.sampling import SamplingSettings, call_chunks
from act_core.validation import check_positive_int, parse_prompt_lines

from .applying import apply_map, map_family, noise_level
from .comfy_models import check_fits, denoiser_modules, timestep_scale
from .common import transformer_options_of
from .conditioning import encode_prompts, prompt_noise, stack_conds
from .fitting import checked_sampling, prompts_per_call

log = logging.getLogger("ComfyUI-ACT")
COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond values
Report = Callable[[str, int, int], None]  # (phase, done, total)


def split_calls_error(kinds: Sequence[int]) -> ACTInputError:
    if set(kinds) == {COND}:
        have = "only the prompts' rows"
    elif set(kinds) == {UNCOND}:
        have = "only the negative prompt's rows"
    else:
        have = f"the prompts' and the negative prompt's rows in chunks {kinds}"
    return ACTInputError(
        f"ComfyUI ran a model call with {have}: it split the prompts' and the negative prompt's rows into "
        "separate calls because its memory estimate said they do not fit together. The fold needs both halves "
        "in one call (each of its steps runs them forward and backward together): fold at a smaller width and "
        "height, or on a machine with more free memory."
    )


class ComfyFoldHost:
    """A MODEL / CLIP, a map to fold and the sampler settings as a ``FoldHost`` (``act_core.distill``)."""

    name = "comfyui"

    def __init__(
        self,
        model: Any,
        clip: Any,
        act_map: ACTMap,
        settings: SamplingSettings,
        *,
        sampler_name: str,
        scheduler: str,
        check: Callable[[], None] = lambda: None,
        report: Report | None = None,
    ):
        if model is None:
            raise ACTInputError("Connect the MODEL the map was fitted on.")
        if clip is None:
            raise ACTInputError("Connect the CLIP of the model: it reads the source prompts.")
        self.family = map_family(act_map)
        check_comfy_map(act_map.metadata, model.model.diffusion_model)
        self._modules = denoiser_modules(model, self.family)  # another family's MODEL: refused, naming both
        if self.family.denoiser in act_map.parts():  # other parts: the fold's own check says what to do
            check_fits(act_map.restrict(parts=[self.family.denoiser]), self._modules, "this MODEL")
        self.model, self.clip, self.settings = model, clip, settings
        self.denoiser: nn.Module = model.model.diffusion_model
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.guided = settings.cfg_batch and not math.isclose(settings.guidance_scale, 1.0)
        sampling = model.get_model_object("model_sampling")
        self._sampling, self._scale = sampling, timestep_scale(self.family, sampling)
        self.check, self.report = check, report or (lambda phase, done, total: None)
        self._encoded: dict[str, tuple] = {}
        self._copies: dict[tuple[nn.Module, str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def modules(self) -> Mapping[str, nn.Module]:
        return self._modules

    # ---------------------------------------------------------------------------- recording
    def _describe(self, args: tuple, kwargs: dict) -> DenoiserCall:
        """One diffusion-model call: its cond and uncond chunks (``cond_or_uncond``) and noise level."""
        self.check()
        batch = int(args[0].shape[0])
        options = transformer_options_of(args, kwargs)
        kinds = list(options.get("cond_or_uncond") or [COND])
        size = batch // len(kinds)
        chunks = {kind: [k for k, c in enumerate(kinds) if c == kind] for kind in (COND, UNCOND)}
        if len(chunks[COND]) != 1 or len(chunks[UNCOND]) != (1 if self.guided else 0) or batch % len(kinds):
            raise split_calls_error(kinds)

        def rows(kind: int) -> torch.Tensor:
            first = chunks[kind][0] * size
            return torch.arange(first, first + size)

        sigmas = options.get("sigmas")
        level = (
            None
            if sigmas is None
            else noise_level(self._sampling, float(torch.as_tensor(sigmas).max()), self._scale)
        )
        uncond = rows(UNCOND) if self.guided else None
        return DenoiserCall(args, kwargs, level, batch, rows(COND), uncond, self.settings.guidance_scale)

    def _conds(self, prompts: Sequence[str]) -> list[tuple]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._encoded]
        with torch.no_grad():  # outside inference mode here: no graph through the text encoders
            self._encoded.update(zip(missing, encode_prompts(self.clip, missing, self.check), strict=True))
        return [self._encoded[p] for p in prompts]

    def record(
        self, act_map: ACTMap, strength: float, prompts: Sequence[str], seed: int
    ) -> list[DenoiserCall]:
        """ComfyUI's sampler on ``prompts`` with ``act_map`` applied as Apply ACT applies it (hooks)."""
        import comfy.model_management as mm
        import comfy.sample

        settings, model = self.settings, self.model
        self._put_back()  # ComfyUI loads and patches the weights it knows
        encoded = self._conds(prompts)
        negative = self._conds([settings.negative_prompt or ""])
        teacher, _, _ = apply_map(model, None, act_map, strength, force_hooks=True)
        per_call = prompts_per_call(model, settings, len(prompts), 2 if self.guided else 1)
        chunks = call_chunks(len(prompts), per_call)
        total = len(chunks) * settings.num_inference_steps
        try:
            with torch.no_grad(), recording(self.denoiser, self._describe) as calls:
                for c, chunk in enumerate(chunks):
                    latent = torch.zeros(
                        (len(chunk), 4, settings.height // 8, settings.width // 8), dtype=torch.float32
                    )
                    latent = comfy.sample.fix_empty_latent_channels(model, latent)

                    def callback(step, x0, x, steps, c=c):
                        self.report("recording", c * steps + step + 1, total)

                    comfy.sample.sample(
                        teacher,
                        prompt_noise(latent, seed + chunk.start, len(chunk)),
                        settings.num_inference_steps,
                        settings.guidance_scale,
                        self.sampler_name,
                        self.scheduler,
                        stack_conds([encoded[i] for i in chunk]),
                        stack_conds(negative * len(chunk)),
                        latent,
                        denoise=1.0,
                        callback=callback,
                        disable_pbar=True,
                        seed=seed + chunk.start,
                    )
        finally:
            teacher.eject_model()  # the teacher's hooks off the shared modules now, not at the next load
            mm.load_models_gpu([model])  # the MODEL as it is: its own patches, no ACT
        self._own_copies()
        return calls

    def run(self, call: DenoiserCall, rows: torch.Tensor | None) -> torch.Tensor:
        args, kwargs = call.args, call.kwargs
        if rows is not None:
            args, kwargs = take_rows(args, rows, call.batch), take_rows(kwargs, rows, call.batch)
            options = kwargs.get("transformer_options")
            sigmas = options.get("sigmas") if isinstance(options, dict) else None
            if isinstance(sigmas, torch.Tensor) and sigmas.ndim:  # one per row of a chunk
                size = len(rows) // len(options.get("cond_or_uncond") or [COND])
                kwargs["transformer_options"] = {**options, "sigmas": sigmas[:size]}
        return self.denoiser(*args, **kwargs)

    # ---------------------------------------------------------------------------- grad-ready weights
    def _own_copies(self) -> None:
        """Ordinary copies in place of the diffusion model's inference tensors (made in ComfyUI's inference
        mode: autograd cannot save them for the backward pass)."""
        for module in self.denoiser.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(module, kind)
                for name, value in list(table.items()):
                    if value is None:
                        continue
                    key = (module, kind, name)
                    if key in self._copies and self._copies[key][0] is value:
                        table[name] = self._copies[key][1]
                    elif value.is_inference():
                        copy = value.detach().clone()
                        if kind == "_parameters":
                            copy = nn.Parameter(copy, requires_grad=False)
                        self._copies[key] = (value, copy)
                        table[name] = copy

    def _put_back(self) -> None:
        """ComfyUI's own tensors back where the copies were."""
        for (module, kind, name), (value, copy) in self._copies.items():
            table = getattr(module, kind)
            if table.get(name) is copy:
                table[name] = value

    @contextlib.contextmanager
    def fitting(self) -> Iterator[None]:
        try:
            with torch.inference_mode(False):
                yield
        finally:
            self._put_back()
            self._copies.clear()

    def metadata(self) -> dict:
        settings = self.settings
        return {
            "host": self.name,
            "sampling": {
                "width": settings.width,
                "height": settings.height,
                "steps": settings.num_inference_steps,
                "cfg": settings.guidance_scale,
                "sampler_name": self.sampler_name,
                "scheduler": self.scheduler,
                "negative_prompt": settings.negative_prompt or "",
            },
        }


# The Fit node's sampling metadata (``ComfyFitHost.metadata``) against the Fold node's inputs.
_COMPARED = ("width", "height", "steps", "cfg", "sampler_name", "scheduler", "negative_prompt")


def warn_other_settings(act_map: ACTMap, sampling: Mapping[str, Any]) -> None:
    """Warn when the fold samples with other settings than the Fit node fitted the map with."""
    fitted = act_map.metadata.get("sampling") or {}
    if act_map.metadata.get("host") != "comfyui":
        return
    differ = [
        f"{key} {fitted[key]!r} (here {sampling[key]!r})"
        for key in _COMPARED
        if key in fitted and fitted[key] != sampling[key]
    ]
    if differ:
        message = (
            "ACT fold: the map was fitted with other sampler settings: "
            + ", ".join(differ)
            + ". The fold matches the map along the generations it samples, so give it the Fit node's settings."
        )
        log.warning(message)
        warnings.warn(message, ACTWarning, stacklevel=3)


def fold_node_map(
    model: Any,
    clip: Any,
    act_map: Any,
    source_text: str,
    *,
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = 20,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    negative_prompt: str = "",
    fold_steps: int = FOLD_STEPS,
    report: Report | None = None,
    **options: Any,
) -> ACTMap:
    """The static, foldable map that steers like ``act_map``'s hooks (``act_core.distill.fold_map`` with the
    ComfyUI host). ``report(phase, done, total)``: "recording" over the sampling steps, then "fitting" over
    the Adam steps. ``options`` go to ``fold_map`` (lr, prompts_per_call, ...). Raises on interruption (the
    model is left as it was)."""
    import comfy.model_management as mm

    if not isinstance(act_map, ACTMap):
        raise ACTInputError("act_map must be an ACT map (from 'Fit ACT map' or 'Load ACT map').")
    given = parse_prompt_lines(source_text, "source") if str(source_text or "").strip() else None
    prompts = fold_prompts(act_map, given)  # empty: the prompts the map was fitted on (fits record them)
    settings = checked_sampling(width, height, steps, cfg, negative_prompt, map_family(act_map).cfg_batch)
    check_positive_int(fold_steps, "fold_steps")
    report = report or (lambda phase, done, total: None)
    host = ComfyFoldHost(
        model,
        clip,
        act_map,
        settings,
        sampler_name=sampler_name,
        scheduler=scheduler,
        check=mm.throw_exception_if_processing_interrupted,
        report=report,
    )
    check_family_folds(act_map)  # families whose maps never fold (FLUX, SD3...): refused, saying why
    warn_other_settings(act_map, host.metadata()["sampling"])

    def progress(step: int, total: int, loss: float) -> None:
        mm.throw_exception_if_processing_interrupted()
        report("fitting", step, total)

    return fold_map(host, act_map, prompts, steps=fold_steps, seed=seed, progress=progress, **options)


def fold_summary(act_map: ACTMap) -> str:
    """The folded map's summary with how the fold went (its ``distilled`` metadata)."""
    info = act_map.metadata.get("distilled") or {}
    if not info:
        return act_map.summary()
    kept = (
        " (the fit did not improve on its start, which is returned)" if info.get("kept_initial_map") else ""
    )
    return (
        f"{act_map.summary()}\nFolded from a map of {info.get('from_buckets')} noise levels on "
        f"{info.get('num_prompts')} prompts ({info.get('states')} model calls, {info.get('steps')} steps, "
        f"{info.get('seconds', 0):.0f} s): it misses {info.get('loss_final', float('nan')):.3f} of the map's "
        f"squared change of the model's predictions, from {info.get('loss_initial', float('nan')):.3f} at "
        f"its start{kept}."
    )
