"""Fit an ACT map on a ComfyUI MODEL / CLIP: the ComfyUI host of the one fit workflow (``act_core.workflow``).

* ``trajectory`` (the default presets): ComfyUI's own sampler (``sampler_name``, ``scheduler``, ``steps``,
  ``cfg``, as KSampler takes them) samples the prompt pairs. A guider evaluates, at every model call, the
  source conds, the negative, the *target* conds and the source conds once more (untransported) on the same
  latents; ComfyUI batches them as it batches cond and uncond, and ``act_core.trajectory.TrajectoryFit``
  records the hooked modules, fits one map per noise level and transports the source rows before the forward
  goes on. The latents advance with ``act_core.sampling.source_prediction`` of those rows (calibrated once
  per noise level), guided by ComfyUI's own CFG function. When ComfyUI splits the conds over several calls
  (memory), the session falls back to "lagged" fitting and says so.
* ``first_step`` (the paper's): the cond branch at the FIRST denoising step, guidance off. For every batch
  ComfyUI's sampler runs up to the denoiser call and a pre-hook captures its exact arguments; ``run_model``
  replays ``diffusion_model(*args, **kwargs)`` (lockstep threads run it concurrently).
* Text-encoder presets run the text encoders only.

Which family a MODEL is, and how its modules are named, is ``act_core.families`` data.
Prompt pair i (source i, target i; the shorter list repeats) gets the noise of seed ``seed + i``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from act_core._version import __version__
from act_core.errors import ACTError, ACTInputError
from act_core.families import ModelFamily
from act_core.fitting import fit_with_stats
from act_core.maps import ACTMap, part_of
from act_core.recording import token_mask_hooks
from act_core.sampling import SamplingSettings, TrajectoryRun, source_prediction
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

from .comfy_models import clip_modules, denoiser_modules, model_family
from .common import COMFY_FAMILIES, FAMILY_DEFAULT_PRESET, parse_parts, transformer_options_of

log = logging.getLogger("ComfyUI-ACT")
FIRST_STEP_SCHEDULER = "normal"  # first-step protocol: only sigma_max matters
FIRST_STEP_SAMPLER = "euler"
SOURCE_COND, NEGATIVE_COND, TARGET_COND, PLAIN_COND = 0, 1, 2, 3  # indices in calc_cond_batch's conds
# Rough live activation size of one denoiser forward at a lockstep rendezvous, per latent pixel and sample.
_ACTIVATION_ELEMENTS_PER_LATENT_PIXEL = 2500
NodeProgress = Callable[[int, int], None]  # ComfyUI's bar: (done, total)


class _Captured(Exception):
    """Raised from a pre-hook on the UNet to stop ComfyUI's sampler once the UNet inputs are known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured denoiser inputs")
        self.args, self.kwargs = args, kwargs


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


# ------------------------------------------------------------------------------------------ conditioning
def _encode_prompts(clip: Any, prompts: Sequence[str], check: Callable[[], None]) -> list[tuple]:
    out = []
    for prompt in prompts:
        check()
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        out.append((cond, pooled))
    return out


def _stack_conds(encoded: Sequence[tuple], length: int | None = None) -> list:
    """One conditioning entry for a batch of prompts (token lengths made equal by repetition, which leaves
    cross-attention unchanged: ComfyUI batches conds of different lengths the same way)."""
    lengths = [cond.shape[1] for cond, _ in encoded]
    common = length or math.lcm(*lengths)
    cond = torch.cat([c.repeat(1, common // c.shape[1], 1) for c, _ in encoded])
    extra = {}
    if all(p is not None for _, p in encoded):
        extra["pooled_output"] = torch.cat([p for _, p in encoded])
    return [[cond, extra]]


def _hf_tokenizer(clip: Any) -> Any:
    """The Hugging Face tokenizer behind ComfyUI's CLIP tokenizer (clip_l's, else clip_g's), if any."""
    for name in ("clip_l", "clip_g"):
        inner = getattr(getattr(clip, "tokenizer", None), name, None)
        if hasattr(getattr(inner, "tokenizer", None), "tokenize"):
            return inner.tokenizer
    return None


def _token_keys(clip: Any, prompts: Sequence[str]) -> list[tuple]:
    """What the text encoders see of each prompt (token ids of every encoder), to compare prompt sets."""
    keys = []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        keys.append(
            tuple(
                (name, tuple(t[0] for chunk in value for t in chunk))
                for name, value in sorted(tokens.items())
            )
        )
    return keys


# ------------------------------------------------------------------------------------------ trajectory
class _FitGuider:
    """Factory for a CFGGuider subclass (ComfyUI is imported lazily): at every model evaluation the source
    conds, the negative, the target conds and (``calibrate``) the source conds again, untransported, run on
    the same latents; the latents follow ``source_prediction`` of those rows, guided by ComfyUI's CFG."""

    @staticmethod
    def build(model: Any, session: TrajectoryFit, calibrate: bool, trajectory: str) -> Any:
        import comfy.samplers

        class FitGuider(comfy.samplers.CFGGuider):
            def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
                negative = None if math.isclose(self.cfg, 1.0) else self.conds.get("negative")
                conds = [self.conds["positive"], negative, self.conds["target"]]
                if calibrate:
                    conds.append(self.conds["positive"])  # PLAIN_COND: not transported
                out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
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
                    cond=conds[SOURCE_COND],
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
    """DIFFUSION_MODEL wrapper: one ``session.call`` per UNet call, with this call's rows and noise level."""

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


# ------------------------------------------------------------------------------------------ first step
def capture_denoiser_inputs(
    model: Any, conditioning: list, noise: torch.Tensor, latent: torch.Tensor, steps: int, seed: int
) -> tuple[tuple, dict]:
    """The arguments ComfyUI passes to the UNet at the first step (cfg 1: cond branch only)."""
    import comfy.sample

    diffusion_model = model.model.diffusion_model

    def hook(module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        comfy.sample.sample(
            model,
            noise,
            steps,
            1.0,
            FIRST_STEP_SAMPLER,
            FIRST_STEP_SCHEDULER,
            conditioning,
            conditioning,
            latent,
            denoise=1.0,
            last_step=1,
            disable_pbar=True,
            seed=seed,
        )
    except _Captured as captured:
        kwargs = dict(captured.kwargs)
        options = kwargs.get("transformer_options")
        if isinstance(options, dict):
            if any(c != 0 for c in options.get("cond_or_uncond") or [0]):
                raise ACTError(
                    "This MODEL runs the negative (uncond) branch even at cfg 1 (disable_cfg1_optimization is set "
                    "by a node before Fit ACT map); fit on the model without that option."
                ) from None
            kwargs["transformer_options"] = dict(options)
        return captured.args, kwargs
    finally:
        handle.remove()
    raise ACTError("ComfyUI's sampler never called the UNet; cannot collect ACT statistics for this model.")


def denoiser_batches(
    model: Any,
    clip: Any,
    prompts: Sequence[str],
    *,
    seed: int,
    width: int,
    height: int,
    steps: int,
    batch_size: int,
    check: Callable[[], None],
) -> list[tuple[tuple, dict]]:
    """Captured UNet inputs per batch of prompts; prompt i gets the noise of seed ``seed + i``."""
    import comfy.sample

    encoded = _encode_prompts(clip, prompts, check)
    batches = []
    for start in range(0, len(prompts), batch_size):
        check()
        chunk = encoded[start : start + batch_size]
        latent = torch.zeros((len(chunk), 4, height // 8, width // 8), dtype=torch.float32)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = torch.cat(
            [comfy.sample.prepare_noise(latent[:1], (seed + start + i) % (2**64)) for i in range(len(chunk))]
        )
        batches.append(
            capture_denoiser_inputs(model, _stack_conds(chunk), noise, latent, steps, seed + start)
        )
    return batches


def lockstep_ok(model: Any, num_samples: int, width: int, height: int) -> tuple[bool, str]:
    """Whether concurrent UNet forwards are safe and fit in memory here (see the module docstring)."""
    import comfy.model_management as mm

    if getattr(model.model, "model_lowvram", False):
        return False, "the UNet is only partially loaded (low VRAM), so its weights are cast per forward"
    if getattr(mm, "NUM_STREAMS", 1) > 1:
        return False, "ComfyUI's async weight offload streams are shared between threads"
    itemsize = torch.empty((), dtype=model.model_dtype()).element_size()
    need = num_samples * (width // 8) * (height // 8) * _ACTIVATION_ELEMENTS_PER_LATENT_PIXEL * itemsize
    free = mm.get_free_memory(model.load_device)
    if need > 0.8 * free:
        return (
            False,
            f"all {num_samples} forwards at once would need ~{need / 2**30:.1f} GiB (free: {free / 2**30:.1f})",
        )
    return True, ""


# ------------------------------------------------------------------------------------------ text encoders
def text_batches(clip: Any, prompts: Sequence[str], batch_size: int) -> list[dict]:
    """Token batches for ``encode_token_weights``: the first 77-token chunk of each prompt, weights 1.

    Prompt weights only rescale the encoder OUTPUT (after the forward), so they do not change the
    activations ACT records; dropping them avoids the extra empty-prompt row ComfyUI adds for them.
    """
    tokenized = [clip.tokenize(prompt) for prompt in prompts]
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = tokenized[start : start + batch_size]
        batches.append({key: [[(t[0], 1.0) for t in tokens[key][0]] for tokens in chunk] for key in chunk[0]})
    return batches


class _TokenMasks:
    """While fitting, pool text-encoder outputs over real tokens (start .. first end token), not padding."""

    def __init__(self, clip: Any):
        self.encoders = [
            getattr(clip.cond_stage_model, name)
            for name in ("clip_l", "clip_g")
            if getattr(clip.cond_stage_model, name, None) is not None
        ]
        self.handles: list = []

    @staticmethod
    def _mask(encoder: Any, args: tuple) -> torch.Tensor | None:
        tokens = args[0] if args else None
        end = getattr(encoder, "special_tokens", {}).get("end")
        if not (
            isinstance(tokens, list)
            and end is not None
            and all(isinstance(row, list) and all(isinstance(t, int) for t in row) for row in tokens)
        ):
            return None
        rows = []
        for row in tokens:
            stop = row.index(end) + 1 if end in row else len(row)
            rows.append([i < stop for i in range(len(row))])
        if len({len(r) for r in rows}) != 1:
            return None
        return torch.tensor(rows, dtype=torch.bool)

    def __enter__(self) -> _TokenMasks:
        for encoder in self.encoders:
            self.handles += token_mask_hooks(encoder, lambda args, kwargs, enc=encoder: self._mask(enc, args))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


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
        check_prompt_sets(source, target, _token_keys(self.clip, source), _token_keys(self.clip, target))
        words = unknown_words(_hf_tokenizer(self.clip), source + target)
        if words:
            log_and_warn(
                f"ACT fit: the tokenizer does not know {', '.join(words[:8])}: it splits them into characters, "
                "which the model never learned. Use words of the model's vocabulary."
            )

    # ---------------------------------------------------------------------------- fitting
    def fitting(self) -> contextlib.AbstractContextManager:
        return torch.inference_mode(self.inference)

    def pairs_per_call(self, num_pairs: int, rows_per_pair: int) -> int:
        return num_pairs  # ComfyUI batches the conds itself (calc_cond_batch, by free memory)

    def steer_text_encoders(self, text_map: ACTMap) -> contextlib.AbstractContextManager:
        return text_encoders_steered(clip_modules(self.clip, self.family), text_map)

    def sample(self, run: TrajectoryRun) -> None:
        import comfy.patcher_extension
        import comfy.sample
        import comfy.samplers

        model, clip, settings, pairs = self.model, self.clip, self.settings, len(run.source)
        encoded = _encode_prompts(clip, run.source + run.target, self.check)
        length = math.lcm(*[cond.shape[1] for cond, _ in encoded])
        positive = _stack_conds(encoded[:pairs], length)
        target_conds = _stack_conds(encoded[pairs:], length)
        negative = _stack_conds(_encode_prompts(clip, [settings.negative_prompt or ""], self.check) * pairs)
        latent = torch.zeros((pairs, 4, settings.height // 8, settings.width // 8), dtype=torch.float32)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = torch.cat(
            [comfy.sample.prepare_noise(latent[:1], (run.seed + i) % (2**64)) for i in range(pairs)]
        )
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
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
            "comfyui_act_fit",
            _session_wrapper(
                run.session,
                model.get_model_object("model_sampling"),
                self.check,
                self.family.comfy_timestep_scale,
            ),
        )
        guider = _FitGuider.build(patched, run.session, run.calibrate, run.trajectory)
        guider.set_conds(positive, negative)
        guider.inner_set_conds({"target": target_conds})
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

    def fit_first_step(self, fit: FirstStepFit) -> ACTMap:
        act_map, _ = _fit_first_step(self, fit)
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
        return {"model": f"ComfyUI {owner}", "sampling": sampling, "comfyui_act_version": __version__}


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
) -> ACTMap:
    """Fit an ACT map with the one fit workflow. Raises on interruption (nothing stays hooked)."""
    source = parse_prompt_lines(source_text, "source")
    target = parse_prompt_lines(target_text, "target")
    height, width = check_size(height, width)
    steps, cfg = check_sampling(steps, cfg)
    if not isinstance(negative_prompt, str):
        raise ACTInputError("negative_prompt must be text.")
    family = model_family(model)
    spec = family_preset(family, preset)
    settings = SamplingSettings(steps, cfg, height, width, negative_prompt, cfg_batch=family.cfg_batch)
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
        parts=parse_parts(parts, spec, family),
        method=method,
        support=None if support == "auto" else support,
        mode=None if mode == "preset" else mode,
        # ComfyUI batches the trajectory's conds itself; batch_size is the first-step engine's
        batch_size=batch_size if spec.protocol == "first_step" else None,
        seed=seed,
        causal_strategy=causal_strategy,
    )

    def report(done: int, total: int, what: str) -> None:
        host.check()
        if progress is not None:
            progress(done, total)

    return fit_act_map(host, source, target, options, report)


def _fit_first_step(host: ComfyFitHost, fit: FirstStepFit):
    """The first-step engine on this MODEL's denoiser (captured inputs replayed) or this CLIP's encoders."""
    import comfy.model_management as mm

    model, clip, settings, family = host.model, host.clip, host.settings, host.family
    uses_denoiser = any(part_of(name) == family.denoiser for name in fit.modules)
    strategy = fit.causal_strategy
    inference = host.inference
    if uses_denoiser:
        kwargs = {
            "seed": fit.seed,
            "width": settings.width,
            "height": settings.height,
            "steps": settings.num_inference_steps,
            "batch_size": fit.batch_size,
        }
        source_batches = denoiser_batches(model, clip, fit.source, check=host.check, **kwargs)
        target_batches = denoiser_batches(model, clip, fit.target, check=host.check, **kwargs)
        mm.load_models_gpu([model])
        diffusion_model = model.model.diffusion_model
        if fit.mode == "causal" and fit.causal_strategy == "auto":
            ok, why = lockstep_ok(model, len(fit.source) + len(fit.target), settings.width, settings.height)
            if not ok:
                log.info("ACT fit: group-wise causal fitting because %s.", why)
                strategy = "groupwise"

        def run_model(batch: tuple[tuple, dict]) -> None:
            args, kw = batch
            kw = dict(kw)
            if isinstance(kw.get("transformer_options"), dict):
                kw["transformer_options"] = dict(kw["transformer_options"])
            with torch.inference_mode(inference):
                diffusion_model(*args, **kw)

        masks = contextlib.nullcontext()
    else:
        source_batches = text_batches(clip, fit.source, fit.batch_size)
        target_batches = text_batches(clip, fit.target, fit.batch_size)
        encoder = clip.cond_stage_model
        encoder.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            encoder.set_clip_options({"layer": clip.layer_idx})
        clip.load_model()

        def run_model(batch: dict) -> None:
            with torch.inference_mode(inference):
                encoder.encode_token_weights(batch)

        masks = _TokenMasks(clip)

    def report(done: int, total: int, what: str) -> None:
        host.check()
        if fit.progress is not None:
            fit.progress(done, total, what)

    with masks:
        return fit_with_stats(
            run_model,
            source_batches,
            target_batches,
            dict(fit.modules),
            mode=fit.mode,
            causal_strategy=strategy,
            progress=report,
            **fit.estimator_options,
        )
