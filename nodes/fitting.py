"""Fit an ACT map on a ComfyUI MODEL / CLIP: the ComfyUI host of the one fit workflow (``act_core.workflow``).

* ``trajectory`` (the default presets): ComfyUI's own sampler (``sampler_name``, ``scheduler``, ``steps``,
  ``cfg``, as KSampler takes them) samples the prompt pairs. A guider evaluates, at every model call, the
  source conds, the negative, the *target* conds and the source conds once more (untransported) on the same
  latents; ComfyUI batches them as it batches cond and uncond, and ``act_core.trajectory.TrajectoryFit``
  records the hooked modules, fits one map per noise level and transports the source rows before the forward
  goes on. The latents advance with ``act_core.sampling.source_prediction`` of those rows (calibrated once
  per noise level), guided by ComfyUI's own CFG function. The target-side conds go first (ComfyUI batches and
  splits them as memory allows), then the source conds in calls that meet at every hooked module, so the
  fit is exact at any memory budget (``_FitGuider``).
* ``first_step`` (the paper's): the cond branch at the FIRST denoising step, guidance off. For every batch
  ComfyUI's sampler runs up to the denoiser call and a pre-hook captures its exact arguments; ``run_model``
  replays ``diffusion_model(*args, **kwargs)`` (lockstep threads run it concurrently).
* Text-encoder presets run the text encoders only.

Which family a MODEL is, and how its modules are named, is ``act_core.families`` data.
Prompt pair i (source i, target i; the shorter list repeats) gets the noise of seed ``seed + i``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from act_core._version import __version__
from act_core.errors import ACTInputError
from act_core.families import COMFY_CLASS_KEY, ModelFamily
from act_core.maps import ACTMap, part_of
from act_core.sampling import SamplingSettings, TrajectoryRun, call_chunks, source_prediction
from act_core.trajectory import TrajectoryFit
from act_core.validation import (
    check_prompt_sets,
    check_sampling,
    check_size,
    parse_prompt_lines,
    unknown_words,
)
from act_core.workflow import (
    FirstStepFit,
    FitOptions,
    fit_act_map,
    preset_modules,
    text_encoders_steered,
)

from .comfy_models import clip_modules, denoiser_modules, model_family, timestep_scale
from .common import COMFY_FAMILIES, FAMILY_DEFAULT_PRESET, parse_parts, transformer_options_of
from .conditioning import common_length, encode_prompts, hf_tokenizer, prompt_noise, stack_conds, token_keys
from .first_step import fit_first_step

log = logging.getLogger("ComfyUI-ACT")
SOURCE_COND, NEGATIVE_COND, TARGET_COND, PLAIN_COND = 0, 1, 2, 3  # indices in calc_cond_batch's conds
NodeProgress = Callable[[int, int], None]  # ComfyUI's bar: (done, total)


def family_preset(family: ModelFamily, preset_name: str) -> Any:
    """The preset ``preset_name`` of the MODEL's family ("default": the family's default), or an error that
    names the family's presets."""
    if preset_name == FAMILY_DEFAULT_PRESET:
        preset_name = family.default_preset
    if preset_name not in family.presets:
        others = [f.name.upper() for f in COMFY_FAMILIES if f is not family and preset_name in f.presets]
        raise ACTInputError(
            f"Preset {preset_name!r} is not a {family.name.upper()} preset"
            + (f" (it is for {others[0]} models)" if others else "")
            + f"; this MODEL is {family.name.upper()}: choose one of {', '.join(family.presets)} "
            f"(default {family.default_preset})."
        )
    return family.preset(preset_name)


# ------------------------------------------------------------------------------------------ trajectory
def source_chunks(pairs: int, pairs_per_call: int) -> list[range]:
    """The pairs of each source call of a step (all in one when they fit)."""
    return call_chunks(pairs, max(1, min(pairs, pairs_per_call)))


class _FitGuider:
    """Factory for a CFGGuider subclass (ComfyUI is imported lazily). At every model evaluation: the negative,
    the target conds and (``calibrate``) the source conds again, untransported, through ComfyUI's
    ``calc_cond_batch`` (batched and split as ComfyUI sees fit: nothing there is transported); then the source
    conds, in calls that meet at every hooked module (``TrajectoryFit.run_together``), so each module's map
    is fitted on every pair's rows before any source row goes on: exact at any memory budget. The latents
    follow ``source_prediction`` of those rows, guided by ComfyUI's CFG."""

    @staticmethod
    def build(
        model: Any,
        session: TrajectoryFit,
        calibrate: bool,
        trajectory: str,
        chunks: list[range],
        pairs: int | None = None,
    ) -> Any:
        """``chunks``: the pairs of each call (conds ``source_chunk_<c>``, ``target_chunk_<c>`` and
        ``negative_chunk_<c>`` when there are several); ``pairs``: the number of prompt pairs when each pair has conds of its own (``source_<i>`` and
        ``target_<i>``, evaluated on its own latent, one call each); None: one stacked cond per prompt set."""
        import comfy.samplers

        class FitGuider(comfy.samplers.CFGGuider):
            def evaluate(self, x, timestep, model_options, negative):
                """calc_cond_batch's outputs for [source, negative, target, (plain)], all pairs."""
                guided = negative is not None
                if pairs is not None:
                    groups = [
                        (slice(i, i + 1), self.conds[f"source_{i}"], self.conds[f"target_{i}"], negative)
                        for i in range(pairs)
                    ]
                elif len(chunks) == 1:
                    groups = [(slice(None), self.conds["positive"], self.conds["target"], negative)]
                else:
                    groups = [
                        (
                            slice(chunk.start, chunk.stop),
                            self.conds[f"source_chunk_{c}"],
                            self.conds[f"target_chunk_{c}"],
                            self.conds[f"negative_chunk_{c}"] if guided else None,
                        )
                        for c, chunk in enumerate(chunks)
                    ]
                others = []
                for rows, source, target, uncond in groups:  # never transported: ComfyUI batches as it likes
                    conds = [None, uncond, target] + ([source] if calibrate else [])
                    others.append(
                        comfy.samplers.calc_cond_batch(
                            self.inner_model, conds, x[rows], timestep[rows], model_options
                        )
                    )

                def source_call(rows, source):
                    conds = [source, None, None] + ([None] if calibrate else [])
                    return comfy.samplers.calc_cond_batch(
                        self.inner_model, conds, x[rows], timestep[rows], model_options
                    )[SOURCE_COND]

                steered = session.run_together(
                    [functools.partial(source_call, rows, source) for rows, source, _, _ in groups]
                )
                outs = [torch.cat([out[k] for out in others]) for k in range(len(others[0]))]
                outs[SOURCE_COND] = torch.cat(steered)
                return outs

            def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
                negative = None if math.isclose(self.cfg, 1.0) else self.conds.get("negative")
                out = self.evaluate(x, timestep, model_options, negative)
                steered = source_prediction(
                    session,
                    out[TARGET_COND],
                    out[SOURCE_COND],
                    out[PLAIN_COND] if calibrate else None,
                    trajectory=trajectory,
                )
                return comfy.samplers.cfg_function(
                    self.inner_model,
                    steered,
                    out[NEGATIVE_COND],
                    self.cfg,
                    x,
                    timestep,
                    model_options=model_options,
                    cond=self.conds["positive"],
                    uncond=negative,
                )

        return FitGuider(model)


def _rows_of(cond_or_uncond: Sequence[int], batch: int, index: int) -> torch.Tensor | None:
    """Rows of the chunks that belong to cond ``index`` (ComfyUI concatenates equal-size chunks)."""
    chunks = len(cond_or_uncond)
    if not chunks or batch % chunks:
        return None
    size = batch // chunks
    rows = [k for k, c in enumerate(cond_or_uncond) if c == index]
    if not rows:
        return None
    return torch.cat([torch.arange(k * size, (k + 1) * size) for k in rows])


def _session_wrapper(
    session: TrajectoryFit, model_sampling: Any, check: Callable[[], None], timestep_scale: float
) -> Callable:
    """APPLY_MODEL wrapper (every ComfyUI model runs it, not every one a DIFFUSION_MODEL wrapper): one
    ``session.call`` per denoiser call, with this call's rows and noise level."""

    def wrapper(executor, *args, **kwargs):
        check()
        options = transformer_options_of(args, kwargs)
        order = list((options or {}).get("cond_or_uncond") or [])
        batch = args[0].shape[0]
        sigma = torch.as_tensor((options or {}).get("sigmas")).flatten()[0]
        level = float(model_sampling.timestep(sigma)) / timestep_scale
        level = min(1.0, max(0.0, level))
        source, target = _rows_of(order, batch, SOURCE_COND), _rows_of(order, batch, TARGET_COND)
        if source is None and target is None:
            return executor(*args, **kwargs)
        with session.call(level, source=source, target=target):
            return executor(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------ the host
class ComfyFitHost:
    """A MODEL / CLIP and the Fit node's sampler settings as a ``FitHost`` (``act_core.workflow``)."""

    name = "comfyui"

    def __init__(
        self,
        model: Any,
        clip: Any,
        settings: SamplingSettings,
        *,
        sampler_name: str,
        scheduler: str,
        inference: bool,
    ):
        self.model, self.clip, self.settings = model, clip, settings
        self.family = model_family(model)
        self.family.check_host("comfyui")
        self.sampler_name, self.scheduler, self.inference = sampler_name, scheduler, inference

    @staticmethod
    def check() -> None:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()

    # ---------------------------------------------------------------------------- modules
    def part_modules(self, part: str) -> Mapping[str, nn.Module]:
        if part == self.family.denoiser:
            if self.model is None:
                raise ACTInputError(f"The preset hooks the {part}: connect a MODEL.")
            return denoiser_modules(self.model, self.family)
        if self.clip is None:
            raise ACTInputError(f"The preset hooks the text encoder {part}: connect a CLIP.")
        modules = {n: m for n, m in clip_modules(self.clip, self.family).items() if part_of(n) == part}
        if not modules:
            raise ACTInputError(
                f"This CLIP has no {part} (ComfyUI's {self.family.comfy_clip_parts.get(part, part)}); the preset "
                "needs one. Use the model's own CLIP or set 'parts'."
            )
        return modules

    def has_part(self, part: str) -> bool:
        encoder = self.family.comfy_clip_parts.get(part)
        if self.clip is None or encoder is None:
            return True  # unknown here: part_modules says what is missing
        return getattr(self.clip.cond_stage_model, encoder, None) is not None

    def dead_modules(self, part: str) -> tuple[str, ...]:
        encoders = self.family.comfy_clip_parts
        if self.clip is None or part not in encoders:
            return ()
        encoder = getattr(self.clip.cond_stage_model, encoders[part], None)
        layers = int(getattr(encoder, "num_layers", 0) or 0)
        second = encoders.get("text_encoder_2")
        has_second = second is not None and getattr(self.clip.cond_stage_model, second, None) is not None
        return self.family.dead_modules(part, layers, has_second)

    def check_prompt_sets(self, source: list[str], target: list[str]) -> None:
        if self.clip is None:
            return
        check_prompt_sets(source, target, token_keys(self.clip, source), token_keys(self.clip, target))
        words = unknown_words(hf_tokenizer(self.clip), source + target)
        if words:
            log_and_warn(
                f"ACT fit: the tokenizer does not know {', '.join(words[:8])}: it splits them into characters, "
                "which the model never learned. Use words of the model's vocabulary."
            )

    # ---------------------------------------------------------------------------- fitting
    def fitting(self) -> contextlib.AbstractContextManager:
        return torch.inference_mode(self.inference)

    def pairs_per_call(self, num_pairs: int, rows_per_pair: int) -> int:
        """Source pairs per call: as many as ComfyUI's own estimate fits (``prompts_per_call``); the other rows
        are ComfyUI's to batch."""
        if not self.family.comfy_batched_prompts:
            return 1  # each pair on its own conds, in calls of its own (ModelFamily.comfy_batched_prompts)
        return prompts_per_call(self.model, self.settings, num_pairs)

    def steer_text_encoders(self, text_map: ACTMap) -> contextlib.AbstractContextManager:
        return text_encoders_steered(clip_modules(self.clip, self.family), text_map)

    def sample(self, run: TrajectoryRun) -> None:
        import comfy.patcher_extension
        import comfy.sample
        import comfy.samplers

        model, clip, settings, pairs = self.model, self.clip, self.settings, len(run.source)
        chunks = source_chunks(pairs, run.pairs_per_call)
        if self.family.comfy_batched_prompts:
            encoded = encode_prompts(clip, run.source + run.target, self.check)
            length, exact = common_length([cond.shape[1] for cond, _ in encoded])
            if not exact:
                log_and_warn(
                    "ACT fit: the prompts have token lengths "
                    f"{sorted({cond.shape[1] for cond, _ in encoded})}, too many different ones to batch exactly, "
                    f"so each was repeated up to {length} tokens; models with joint attention see slightly "
                    "other prompts. Prompts of equal token length fit exactly."
                )
            positive = stack_conds(encoded[:pairs], length)
            conds = {"target": stack_conds(encoded[pairs:], length)}
            unguided = encode_prompts(clip, [settings.negative_prompt or ""], self.check)
            negative = stack_conds(unguided * pairs)
            if len(chunks) > 1:  # the calls of a split step take the conds of their pairs
                for c, chunk in enumerate(chunks):
                    conds[f"source_chunk_{c}"] = stack_conds([encoded[i] for i in chunk], length)
                    conds[f"target_chunk_{c}"] = stack_conds([encoded[pairs + i] for i in chunk], length)
                    conds[f"negative_chunk_{c}"] = stack_conds(unguided * len(chunk))
        else:  # each pair on its own conds, as CLIPTextEncode makes them
            conds = {
                f"{side}_{i}": self.conditioning(prompt)
                for side, prompts in (("source", run.source), ("target", run.target))
                for i, prompt in enumerate(prompts)
            }
            positive, negative = conds["source_0"], self.conditioning(settings.negative_prompt or "")
        latent = torch.zeros((pairs, 4, settings.height // 8, settings.width // 8), dtype=torch.float32)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = prompt_noise(latent, run.seed, pairs)
        sampler = comfy.samplers.KSampler(
            model,
            steps=settings.num_inference_steps,
            device=model.load_device,
            sampler=self.sampler_name,
            scheduler=self.scheduler,
            denoise=1.0,
        )
        patched = model.clone()
        patched.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL,
            "comfyui_act_fit",
            _session_wrapper(
                run.session,
                model.get_model_object("model_sampling"),
                self.check,
                timestep_scale(self.family, model.get_model_object("model_sampling")),
            ),
        )
        guider = _FitGuider.build(
            patched,
            run.session,
            run.calibrate,
            run.trajectory,
            chunks,
            pairs=None if self.family.comfy_batched_prompts else pairs,
        )
        guider.set_conds(positive, negative)
        guider.inner_set_conds(conds)
        guider.set_cfg(settings.guidance_scale)

        def callback(step, x0, x, total_steps):
            run.progress(step + 1, total_steps, f"step {step + 1}/{total_steps}")

        guider.sample(
            noise,
            latent,
            comfy.samplers.sampler_object(self.sampler_name),
            sampler.sigmas,
            callback=callback,
            disable_pbar=True,
            seed=run.seed,
        )
        self.check()

    def conditioning(self, prompt: str) -> list:
        """One prompt's conditioning as CLIPTextEncode makes it (with the text encoder's attention mask, from
        which Lumina 2's model reads its token count)."""
        self.check()
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))

    def fit_first_step(self, fit: FirstStepFit) -> ACTMap:
        act_map, _ = fit_first_step(self, fit)
        return act_map

    def metadata(self, protocol: str, uses_denoiser: bool) -> dict:
        settings = self.settings
        sampling = {"width": settings.width, "height": settings.height, "steps": settings.num_inference_steps}
        if protocol == "trajectory":
            sampling.update(
                {
                    "cfg": settings.guidance_scale,
                    "sampler_name": self.sampler_name,
                    "scheduler": self.scheduler,
                    "negative_prompt": settings.negative_prompt or "",
                }
            )
        owner = (
            type(self.model.model).__name__ if uses_denoiser else type(self.clip.cond_stage_model).__name__
        )
        info = {"model": f"ComfyUI {owner}", "sampling": sampling, "comfyui_act_version": __version__}
        if (
            uses_denoiser
        ):  # the diffusion model's class (a structural-fallback map applies to that class only)
            info[COMFY_CLASS_KEY] = type(self.model.model.diffusion_model).__name__
        return info


def prompts_per_call(model: Any, settings: SamplingSettings, count: int, rows_per_prompt: int = 1) -> int:
    """How many of ``count`` prompts, ``rows_per_prompt`` rows each, one model call takes: as many as
    ComfyUI's own estimate (``memory_required``, with the 1.5 margin ``calc_cond_batch`` uses) fits in free
    memory, at least one."""
    import comfy.model_management as mm

    base = model.model
    channels = int(getattr(getattr(base, "latent_format", None), "latent_channels", 4) or 4)
    shape = [channels, settings.height // 8, settings.width // 8]
    # the model is loaded by the sampler after this plan: what it will take is not free then
    free = mm.get_free_memory(model.load_device)
    if model.load_device != torch.device("cpu"):
        free -= max(0, model.model_size() - model.loaded_size())
    fits = [
        k for k in range(1, count + 1) if base.memory_required([k * rows_per_prompt, *shape]) * 1.5 < free
    ]
    return max(fits, default=1)


def check_pairs_per_call(value: Any) -> int | None:
    """The node's max_pairs_per_call as FitOptions takes it: None for 0 (auto)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ACTInputError(f"max_pairs_per_call must be a whole number >= 0 (0: automatic); got {value!r}.")
    return value or None


def log_and_warn(message: str) -> None:
    """A fit warning in the server log and as a Python warning (the Fit node shows it in its summary)."""
    import warnings

    from act_core.errors import ACTWarning

    log.warning(message)
    warnings.warn(message, ACTWarning, stacklevel=3)


def comfy_preset_modules(
    model: Any, clip: Any, preset_name: str, parts_text: str
) -> tuple[dict, tuple[str, ...]]:
    """The modules a preset hooks on this MODEL/CLIP (canonical names), and the parts used."""
    family = model_family(model)
    spec = family_preset(family, preset_name)
    parts = parse_parts(parts_text, spec, family)
    host = ComfyFitHost(
        model,
        clip,
        SamplingSettings(1, 1.0, 64, 64),
        sampler_name="euler",
        scheduler="normal",
        inference=False,
    )
    return preset_modules(host, spec, parts), parts


# ------------------------------------------------------------------------------------------ fit


def checked_sampling(
    width: int, height: int, steps: int, cfg: float, negative_prompt: str, cfg_batch: bool
) -> SamplingSettings:
    """The sampler inputs the Fit and Fold nodes share (as KSampler takes them), checked in one place."""
    height, width = check_size(height, width)
    steps, cfg = check_sampling(steps, cfg)
    if not isinstance(negative_prompt, str):
        raise ACTInputError("negative_prompt must be text.")
    return SamplingSettings(steps, cfg, height, width, negative_prompt, cfg_batch=cfg_batch)


def fit_map(
    model: Any,
    clip: Any,
    source_text: str,
    target_text: str,
    *,
    preset: str = FAMILY_DEFAULT_PRESET,
    parts: str = "",
    method: str = "linear",
    support: str = "auto",
    mode: str = "preset",
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = 20,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    negative_prompt: str = "",
    batch_size: int = 4,
    causal_strategy: str = "auto",
    progress: NodeProgress | None = None,
    less_text: str = "",
    max_pairs_per_call: int = 0,
) -> ACTMap:
    """Fit an ACT map with the one fit workflow. Raises on interruption (nothing stays hooked).

    ``less_text`` (prompts, one per line; empty: none) makes the map two-sided: strength -1 moves toward
    these prompts, +1 toward the target prompts. ``max_pairs_per_call`` (0: ComfyUI's memory estimate) bounds
    the prompt pairs of one model call; the map is the same at any value."""
    source = parse_prompt_lines(source_text, "source")
    target = parse_prompt_lines(target_text, "target")
    less = parse_prompt_lines(less_text, "less") if isinstance(less_text, str) and less_text.strip() else None
    family = model_family(model)
    spec = family_preset(family, preset)
    settings = checked_sampling(width, height, steps, cfg, negative_prompt, family.cfg_batch)
    host = ComfyFitHost(
        model,
        clip,
        settings,
        sampler_name=sampler_name,
        scheduler=scheduler,
        inference=torch.is_inference_mode_enabled(),
    )
    options = FitOptions(
        preset=spec,
        # blank: the preset whole, on the parts this model has (an SD 1.x CLIP has no clip_g)
        parts=parse_parts(parts, spec, family) if (parts or "").strip() else None,
        method=method,
        support=None if support == "auto" else support,
        mode=None if mode == "preset" else mode,
        # ComfyUI batches the trajectory's conds itself; batch_size is the first-step engine's
        batch_size=batch_size if spec.protocol == "first_step" else None,
        max_pairs_per_call=check_pairs_per_call(max_pairs_per_call),
        seed=seed,
        causal_strategy=causal_strategy,
    )

    def report(done: int, total: int, what: str) -> None:
        host.check()
        if progress is not None:
            progress(done, total)

    return fit_act_map(host, source, target, options, report, less)
