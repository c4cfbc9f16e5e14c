"""diffusers integration: ``pipe.fit_act(...)``, ``pipe.enable_act(...)``, ``pipe.fuse_act()`` and friends.

Use the ready classes or wrap an existing pipeline without reloading weights::

    from act_core.diffusers import act_pipeline
    pipe = act_pipeline(StableDiffusionXLPipeline.from_pretrained(path))   # shares the modules
    act_map = pipe.fit_act(sources, targets, num_inference_steps=25, guidance_scale=5.0)
    pipe.enable_act(act_map, strength=1.0)
    image = pipe("a dog", num_inference_steps=25, guidance_scale=5.0).images[0]

Fitting follows the sampling settings you generate with (``num_inference_steps``, ``guidance_scale``,
``height``, ``width``, the pipeline's own scheduler): the default preset records its statistics along
that guided trajectory and keeps one map per noise level (``act_core.trajectory``).

Hooks are plain ``torch`` forward hooks (public API, order-independent removal, work on transformers
modules too), not ``diffusers.hooks``: removing the last diffusers hook resets ``module.forward``, which
would silently drop an accelerate offload hook added after ACT. Hook state lives on the modules (as
FreeU and LoRA do), so pipelines made with ``from_pipe`` see and can disable the same ACT.

State and threads: every verb takes a lock kept on the UNet (shared by ``from_pipe`` pipelines), so
concurrent enable/fuse/disable calls serialise; ``fit_act`` refuses to run while ACT is enabled or
fused, and a second ``fit_act`` on the same modules is refused while one runs. What a generation
sets per UNet call (CFG rows, noise level, step window) is per thread, so concurrent generations
through shared modules do not mix their batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..applying import (
    ACTHandle,
    Strength,
    active_fold,
    active_handle,
    apply_act,
    fold_act,
    remove_act,
    resolve_strengths,
    unfold_act,
)
from ..errors import ACTError, ACTInputError, ACTWarning
from ..estimators import DEFAULT_SHRINKAGE, MAX_OMEGA, ModuleEstimator
from ..families.sdxl import (
    SDXL,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    component_modules,
    dead_text_encoder_paths,
)
from ..fitting import fit_with_stats
from ..maps import ACTMap
from ..presets import CFG_ROWS, Preset
from ..progress import Progress
from ..trajectory import TRAJECTORIES, TrajectoryFit
from ..validation import (
    check_balance,
    check_positive_int,
    check_prompt_sets,
    check_prompts,
    check_sampling,
    check_size,
    check_window,
    fit_metadata,
    warn_unknown_words,
)
from .fitting import (
    CallRows,
    SamplingSettings,
    first_step_runner,
    pairs_per_call,
    run_trajectory,
    text_encoder_token_masks,
    tokenize,
)

_ACTIVE_PIPELINE: contextvars.ContextVar[Any] = contextvars.ContextVar("act_active_pipeline", default=None)
_GATE_ATTR = "_act_step_gate"
_STATE_ATTR = "_act_state"
_STATE_LOCK = threading.Lock()
# Schedulers and tokenizers keep per-call state (step index, padding settings): two generations that share
# one (the same pipeline, or pipelines made with from_pipe) cannot run at the same time.
_STATEFUL_PARTS = ("scheduler", "tokenizer", "tokenizer_2")
_BUSY_LOCK = threading.Lock()
_BUSY: set[int] = set()


@contextlib.contextmanager
def _claim_stateful_parts(pipe: Any) -> Iterator[None]:
    """Refuse, with the fix, a generation whose scheduler or tokenizer another generation is using."""
    parts = {id(obj): name for name in _STATEFUL_PARTS if (obj := getattr(pipe, name, None)) is not None}
    with _BUSY_LOCK:
        taken = [name for key, name in parts.items() if key in _BUSY]
        if taken:
            raise ACTError(
                f"Another generation is running with this pipeline's {', '.join(taken)} (diffusers keeps "
                "per-call state in them), so this concurrent call would corrupt both. Give each thread its "
                "own pipeline: act_pipeline(type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler), "
                "tokenizer=copy.deepcopy(pipe.tokenizer), tokenizer_2=copy.deepcopy(pipe.tokenizer_2))); the "
                "models (and the ACT map on them) stay shared."
            )
        _BUSY.update(parts)
    try:
        yield
    finally:
        with _BUSY_LOCK:
            _BUSY.difference_update(parts)


class _ModelState:
    """Lock and flags of one set of shared modules (kept on the UNet, so ``from_pipe`` pipelines share it)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.fitting = False
        self.resume: tuple | None = None  # what fuse_act replaced: (map, strengths, gate options)


class _UNetStepGate:
    """A UNet forward pre-hook: tells the hooks this call's noise level, CFG rows and step window.

    Denoising progress is read off the timestep, ``1 - t / timestep_scale`` (0 at pure noise; SDXL's UNet
    gets t in [0, 1000), FLUX's transformer t / 1000 from its pipeline), the same convention as ComfyUI's
    start/end percent, so no step counter has to be threaded through.
    All of it is per thread (``ACTHandle.set_call``).
    """

    def __init__(
        self,
        handle: ACTHandle,
        start: float,
        end: float,
        cfg_rows: str,
        timestep_scale: float,
        part: str = UNET,
    ):
        self.handle, self.start, self.end = handle, start, end
        self.cfg_rows, self.timestep_scale, self.part = cfg_rows, timestep_scale, part
        self.removable = None

    @property
    def options(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "cfg_rows": self.cfg_rows}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        level, in_window = None, True
        if timestep is not None:
            level = float(torch.as_tensor(timestep).flatten()[0]) / self.timestep_scale
            progress = 1.0 - level
            in_window = self.start - 1e-6 <= progress <= self.end + 1e-6
        rows = None
        if self.cfg_rows == "cond":
            pipe = _ACTIVE_PIPELINE.get()
            if pipe is None:
                raise ACTError(
                    "ACT is enabled on this UNet with cfg_rows='cond', but the UNet is being called outside an ACT "
                    "pipeline (for example by a pipeline made with from_pipe from an ACT pipeline), so ACT cannot "
                    "tell which rows are the prompt's. Call it through act_pipeline(pipe), or enable the map with "
                    "cfg_rows='all'."
                )
            if getattr(pipe, "do_classifier_free_guidance", False):
                batch = sample.shape[0]
                rows = slice(batch // 2, batch)  # diffusers orders a CFG batch as [uncond; cond]
        self.handle.set_call([self.part], rows=rows, noise_level=level, in_window=in_window)


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of ``name`` in the pipeline's ``__call__`` (what a plain generation would use)."""
    try:
        parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if parameter is None or parameter.default is inspect.Parameter.empty or parameter.default is None:
        return fallback
    return parameter.default


class ACTPipelineMixin:
    """Adds ACT to a diffusers Stable Diffusion XL (or 1.5) pipeline."""

    act_family = SDXL

    # ------------------------------------------------------------------------------ family specifics
    # (SDXL here; ACTFluxPipelineMixin overrides them)
    def _act_component_modules(self, part: str, component: nn.Module) -> dict[str, nn.Module]:
        return component_modules(part, component)

    def _act_excluded(self, part: str) -> tuple[str, ...]:
        """Module paths of ``part`` that cannot affect the image (never hooked)."""
        if part == TEXT_ENCODER and getattr(self, TEXT_ENCODER_2, None) is not None:
            return dead_text_encoder_paths(part, self.text_encoder.config.num_hidden_layers)
        return ()

    def _act_timestep_scale(self) -> float:
        """What the denoiser's ``timestep`` argument is divided by to give the noise level in [0, 1]."""
        return float(self.scheduler.config.num_train_timesteps)

    def _act_first_step_runner(
        self, settings: SamplingSettings, seed: int, statistics_steps: int, use_denoiser: bool
    ):
        return first_step_runner(self, settings, seed, statistics_steps, use_denoiser)

    def _act_tokenize(self, prompts: list[str]) -> Any:
        return tokenize(self, prompts)

    def _act_run_trajectory(
        self, session: TrajectoryFit, source: list[str], target: list[str], settings, **options
    ):
        run_trajectory(self, session, source, target, settings, **options)

    def _act_rows_per_pair(self, settings: SamplingSettings, calibrate: bool) -> int:
        return CallRows(1, settings.guided, calibrate).copies

    # ------------------------------------------------------------------------------ model parts
    @property
    def _act_denoiser(self) -> nn.Module | None:
        return getattr(self, self.act_family.denoiser, None)

    def _act_components(self) -> dict[str, nn.Module]:
        return {
            part: getattr(self, part)
            for part in self.act_family.parts
            if getattr(self, part, None) is not None
        }

    def _act_state(self) -> _ModelState:
        owner = self._act_denoiser or next(iter(self._act_components().values()))
        with _STATE_LOCK:
            state = getattr(owner, _STATE_ATTR, None)
            if state is None:
                state = _ModelState()
                owner.__dict__[_STATE_ATTR] = state  # a plain attribute, not a submodule or buffer
            return state

    def act_modules(self, parts: Sequence[str] | None = None) -> dict[str, nn.Module]:
        """Every submodule of the given parts (default: all), keyed by canonical name."""
        components = self._act_components()
        parts = list(components) if parts is None else list(parts)
        missing = [part for part in parts if part not in components]
        if missing:
            raise ACTInputError(
                f"This pipeline has no {missing} (it has {list(components)}); the map was made for another "
                "kind of pipeline. Use act_map.restrict(parts=[...]) to keep the parts it has."
            )
        modules: dict[str, nn.Module] = {}
        for part in parts:
            modules.update(self._act_component_modules(part, components[part]))
        return modules

    def act_preset_modules(
        self, preset: str | Preset | None = None, parts: Sequence[str] | None = None
    ) -> dict[str, nn.Module]:
        """The modules a preset hooks (optionally only some of its parts), in registration order."""
        spec = self.act_family.preset(preset or self.act_family.default_preset)
        parts = spec.parts if parts is None else tuple(parts)
        selected = {}
        for part in parts:
            if part not in spec.patterns:
                raise ACTInputError(f"Preset {spec.name!r} hooks {spec.parts}, not {part!r}.")
            selected.update(spec.select(part, self.act_modules([part]), self._act_excluded(part)))
        if not selected:
            raise ACTInputError(f"Preset {spec.name!r} matched no module of this pipeline's {parts}.")
        return selected

    # ------------------------------------------------------------------------------ fitting
    def fit_act(
        self,
        source_prompts: Sequence[str],
        target_prompts: Sequence[str],
        *,
        preset: str | Preset | None = None,
        parts: Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        method: str | None = None,
        support: str | None = None,
        mode: str | None = None,
        protocol: str | None = None,
        trajectory: str = "steered",
        statistic: str | None = None,
        calibrate: bool | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        statistics_steps: int = 1,
        causal_strategy: str = "auto",
        max_lockstep_batches: int = 64,
        shrinkage: float = DEFAULT_SHRINKAGE,
        max_omega: float = MAX_OMEGA,
        progress: bool | Callable[[int, int, str], None] = True,
    ) -> ACTMap:
        """Fit a map that moves generations for ``source_prompts`` toward ``target_prompts``.

        Pass the sampling settings you generate with (``num_inference_steps``, ``guidance_scale``,
        ``height``, ``width``, ``negative_prompt``; defaults: this pipeline's own). The default preset
        (``unet_norms``, protocol ``"trajectory"``) samples the prompt pairs along that guided trajectory
        with the pipeline's scheduler, records every UNet norm on the cond rows at every step, and fits
        one map per noise level, exact causal in one pass; the map then applies at any step count.
        Prompt pair i (source i, target i; the shorter list repeats) gets the noise of seed ``seed + i``.

        Protocol ``"first_step"`` (preset ``unet_norms_first_step``, the paper's) uses the cond branch of
        the first ``statistics_steps`` steps, guidance off. Text-encoder-only presets run no UNet at all.
        ``batch_size``: prompt pairs per UNet call (default: all that fit in memory, which is exact; fewer
        fall back to "lagged" fitting, with a warning). ``progress`` shows a tqdm bar (True), nothing
        (False), or calls your ``progress(done, total, what)``.
        """
        source_prompts = check_prompts(source_prompts, "source")
        target_prompts = check_prompts(target_prompts, "target")
        check_balance(source_prompts, target_prompts)
        spec = self.act_family.preset(preset or self.act_family.default_preset)
        protocol = protocol or spec.protocol
        if protocol not in ("trajectory", "first_step"):
            raise ACTInputError(f"protocol must be 'trajectory' or 'first_step', got {protocol!r}.")
        if trajectory not in TRAJECTORIES:
            raise ACTInputError(f"trajectory must be one of {TRAJECTORIES}, got {trajectory!r}.")
        settings = self._act_sampling(num_inference_steps, guidance_scale, height, width, negative_prompt)
        check_positive_int(statistics_steps, "statistics_steps")
        if statistics_steps > settings.num_inference_steps:
            raise ACTInputError("statistics_steps must be at most num_inference_steps.")
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        self._act_check_distinct(source_prompts, target_prompts)
        modules = self.act_preset_modules(spec, parts)
        denoiser = self.act_family.denoiser
        unet_modules = {n: m for n, m in modules.items() if n.startswith(f"{denoiser}.")}
        text_modules = {n: m for n, m in modules.items() if n not in unet_modules}
        estimator_options = {
            "method": method or spec.method,
            "support": support or spec.support,
            "apply_mode": spec.apply_mode,
            "shrinkage": shrinkage,
            "max_omega": max_omega,
        }
        mode = mode or spec.mode
        report = _progress_callback(progress, "Fitting ACT map")
        state = self._act_state()
        with self._act_fitting(state):
            if protocol == "first_step" or not unet_modules:
                act_map = self._act_fit_first_step(
                    source_prompts,
                    target_prompts,
                    modules,
                    settings,
                    estimator_options,
                    mode=mode,
                    batch_size=batch_size or 8,
                    seed=seed,
                    statistics_steps=statistics_steps,
                    causal_strategy=causal_strategy,
                    max_lockstep_batches=max_lockstep_batches,
                    progress=report,
                )
            else:
                act_map = self._act_fit_trajectory(
                    source_prompts,
                    target_prompts,
                    unet_modules,
                    text_modules,
                    settings,
                    estimator_options,
                    mode=mode,
                    trajectory=trajectory,
                    statistic=statistic or spec.statistic,
                    calibrate=spec.calibrate if calibrate is None else calibrate,
                    batch_size=batch_size,
                    seed=seed,
                    progress=report,
                )
        uses_unet = bool(unet_modules)
        cfg_rows = spec.cfg_rows if uses_unet else "all"
        sampling = settings.as_metadata(self.scheduler)
        if protocol == "first_step" and uses_unet:
            sampling["statistics_steps"] = statistics_steps
            sampling["guidance"] = "off (cond branch)"
        if protocol == "trajectory" and uses_unet:
            sampling["trajectory"] = trajectory
        metadata = fit_metadata(
            family=self.act_family.name,
            preset=spec.name,
            protocol=protocol if uses_unet else "text_encoders_only",
            source=source_prompts,
            target=target_prompts,
            seed=seed,
            model=type(self).__name__.removeprefix("ACT"),
            host="diffusers",
            sampling=sampling,
            cfg_rows=cfg_rows,
        )
        return act_map.with_metadata(metadata)

    def _act_sampling(self, steps, guidance, height, width, negative_prompt) -> SamplingSettings:
        steps = _call_default(self, "num_inference_steps", 50) if steps is None else steps
        guidance = _call_default(self, "guidance_scale", 5.0) if guidance is None else guidance
        steps, guidance = check_sampling(steps, guidance)
        native = getattr(self, "default_sample_size", 8) * self.vae_scale_factor
        height, width = check_size(height or native, width or native, self.vae_scale_factor)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ACTInputError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}.")
        return SamplingSettings(steps, guidance, height, width, negative_prompt)

    def _act_check_distinct(self, source: list[str], target: list[str]) -> None:
        """Refuse prompt sets that are identical to the text encoders (e.g. equal after truncation)."""
        tokenizer = getattr(self, "tokenizer", None) or getattr(self, "tokenizer_2", None)
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

    @contextlib.contextmanager
    def _act_fitting(self, state: _ModelState) -> Iterator[None]:
        """Fit on the plain model only, and one fit at a time on shared modules."""
        with state.lock:
            if state.fitting:
                raise ACTError(
                    "Another fit_act is running on this model's modules (pipelines made with from_pipe share "
                    "them); wait for it to finish, or fit on a separate copy of the model."
                )
            if self.act_map is not None:
                raise ACTInputError(
                    "ACT is enabled or fused on this pipeline, so fit_act would record the steered model. Call "
                    "disable_act() first (it also unfuses), then fit."
                )
            state.fitting = True
        try:
            yield
        finally:
            with state.lock:
                state.fitting = False

    def _act_fit_first_step(
        self,
        source: list[str],
        target: list[str],
        modules: dict[str, nn.Module],
        settings: SamplingSettings,
        estimator_options: dict,
        *,
        mode: str,
        batch_size: int,
        seed: int,
        statistics_steps: int,
        causal_strategy: str,
        max_lockstep_batches: int,
        progress: Callable | None,
    ) -> ACTMap:
        use_unet = any(name.startswith(f"{self.act_family.denoiser}.") for name in modules)
        run_model = self._act_first_step_runner(settings, seed, statistics_steps, use_unet)

        def batches(prompts: list[str]) -> list[tuple[int, dict[str, torch.Tensor]]]:
            # Tokenize here, in the calling thread: tokenizers are not thread-safe, and lockstep
            # fitting runs the batches concurrently.
            return [
                (start, self._act_tokenize(prompts[start : start + batch_size]))
                for start in range(0, len(prompts), batch_size)
            ]

        with text_encoder_token_masks(self):
            act_map, _ = fit_with_stats(
                run_model,
                batches(source),
                batches(target),
                modules,
                mode=mode,
                causal_strategy="groupwise" if statistics_steps > 1 and mode == "causal" else causal_strategy,
                max_lockstep_batches=max_lockstep_batches,
                progress=progress,
                **estimator_options,
            )
        return act_map

    def _act_fit_trajectory(
        self,
        source: list[str],
        target: list[str],
        unet_modules: dict[str, nn.Module],
        text_modules: dict[str, nn.Module],
        settings: SamplingSettings,
        estimator_options: dict,
        *,
        mode: str,
        trajectory: str,
        statistic: str,
        calibrate: bool,
        batch_size: int | None,
        seed: int,
        progress: Callable | None,
    ) -> ACTMap:
        """Text-encoder modules first (first-step engine, no UNet), then the UNet along the trajectory
        with those maps applied to the source prompts (causal across parts)."""
        text_map = None
        if text_modules:
            text_map = self._act_fit_first_step(
                source,
                target,
                text_modules,
                settings,
                estimator_options,
                mode=mode,
                batch_size=batch_size or 8,
                seed=seed,
                statistics_steps=1,
                causal_strategy="auto",
                max_lockstep_batches=64,
                progress=None,
            )
        pairs = max(len(source), len(target))
        source_pairs = [source[i % len(source)] for i in range(pairs)]
        target_pairs = [target[i % len(target)] for i in range(pairs)]
        rows_per_pair = self._act_rows_per_pair(settings, calibrate)
        per_call = batch_size or pairs_per_call(self, pairs, settings, rows_per_pair)
        estimate = ModuleEstimator(
            estimator_options["method"],
            estimator_options["support"],
            estimator_options["apply_mode"],
            shrinkage=estimator_options["shrinkage"],
            max_omega=estimator_options["max_omega"],
        )
        session = TrajectoryFit(unet_modules, estimate, num_pairs=pairs, mode=mode, statistic=statistic)
        text_handle = apply_act(self.act_modules(text_map.parts()), text_map, 1.0) if text_map else None
        try:
            with session:
                self._act_run_trajectory(
                    session,
                    source_pairs,
                    target_pairs,
                    settings,
                    seed=seed,
                    trajectory=trajectory,
                    pairs_in_call=per_call,
                    progress=progress or (lambda done, total, what: None),
                    calibrate=calibrate,
                )
        finally:
            if text_handle is not None:
                text_handle.remove()
        estimate.check_not_identical(len(session.maps))
        unet_map = session.result(
            {
                **estimate.metadata(),
                "num_source": pairs,
                "num_target": pairs,
                "pairs_per_call": per_call,
                "calibration_gains": [round(session.gains[k], 4) for k in sorted(session.gains)] or None,
            }
        )
        if session.stats.strategy == "lagged":
            warnings.warn(
                f"ACT fitting split each step's {pairs} prompt pairs into UNet calls of {per_call} (memory), so "
                "the source rows were steered with the previous step's maps while a step was recorded "
                "('lagged': approximately causal). Pass a larger batch_size if memory allows, for exact fitting.",
                ACTWarning,
                stacklevel=3,
            )
        if text_map is None:
            return unet_map
        return ACTMap({**text_map.modules, **unet_map.modules}, unet_map.metadata, unet_map.buckets)

    # ------------------------------------------------------------------------------ applying
    @property
    def act_map(self) -> ACTMap | None:
        """The map currently hooked or fused into this pipeline's modules, if any."""
        modules = self.act_modules()
        handle = active_handle(modules)
        if handle is not None:
            return handle.act_map
        fold = active_fold(modules)
        return fold.act_map if fold is not None else None

    def enable_act(
        self,
        act_map: ACTMap | str | os.PathLike,
        strength: Strength = 1.0,
        *,
        start: float = 0.0,
        end: float = 1.0,
        cfg_rows: str | None = None,
    ) -> ACTHandle:
        """Hook a map (or a ``.safetensors`` map file) into the pipeline; replaces any enabled map.

        ``strength`` is lambda: a number, or per part (``{"unet": 1.0, "text_encoder": 0.5}``).
        ``start``/``end`` bound the fraction of denoising during which UNet maps act (0 = first step).
        ``cfg_rows``: which rows of a CFG batch UNet maps steer; default the map's own (``"cond"``, the
        prompt's half, for maps fitted on it; ``"all"`` for foldable maps, as fused weights do).
        """
        if not isinstance(act_map, ACTMap):
            act_map = ACTMap.load(act_map)
        start, end = check_window(start, end)
        cfg_rows = cfg_rows or act_map.metadata.get("cfg_rows", "cond")
        if cfg_rows not in CFG_ROWS:
            raise ACTInputError(f"cfg_rows must be one of {CFG_ROWS}, got {cfg_rows!r}.")
        resolve_strengths(strength, act_map.parts())
        state = self._act_state()
        with state.lock:
            if state.fitting:
                raise ACTError("fit_act is running on this model; enable the map when it has finished.")
            if active_fold(self.act_modules()) is not None:
                raise ACTInputError(
                    "An ACT map is fused into the weights; call unfuse_act() (or disable_act()) before enabling a map."
                )
            self._act_remove_hooks()
            handle = apply_act(self.act_modules(act_map.parts()), act_map, strength)
            denoiser = self.act_family.denoiser
            if denoiser in act_map.parts():
                gate = _UNetStepGate(handle, start, end, cfg_rows, self._act_timestep_scale(), denoiser)
                gate.removable = self._act_denoiser.register_forward_pre_hook(gate, with_kwargs=True)
                self._act_denoiser.__dict__[_GATE_ATTR] = gate
            return handle

    def set_act_strength(self, strength: Strength) -> None:
        """Change lambda of the enabled map without re-hooking (a number or per part)."""
        with self._act_state().lock:
            handle = active_handle(self.act_modules())
            if handle is None:
                raise ACTInputError("No ACT map is enabled; call enable_act(map) first.")
            handle.set_strength(strength)

    def disable_act(self) -> None:
        """Back to exactly the plain pipeline: remove every hook and unfuse any fused map."""
        state = self._act_state()
        with state.lock:
            self._act_remove_hooks()
            unfold_act(self.act_modules())
            state.resume = None

    def _act_remove_hooks(self) -> None:
        remove_act(self.act_modules())
        denoiser = self._act_denoiser
        gate = denoiser.__dict__.pop(_GATE_ATTR, None) if denoiser is not None else None
        if gate is not None:
            gate.removable.remove()

    def fuse_act(self, act_map: ACTMap | None = None, strength: Strength | None = None) -> None:
        """Fold a foldable map into the weights (zero cost per step); ``unfuse_act`` restores them.

        Without arguments it fuses the enabled map at its current strengths (its hooks are removed and
        come back on ``unfuse_act``). Only one-bucket, unbounded, per-element maps fold (preset
        ``unet_norms_foldable``, or ``text_encoder_norms`` with unbounded support). Weights act on every row
        of a CFG batch and at every step, so a start/end window cannot be fused, and a map that steers the
        cond rows only gives a different image fused (a warning says so).
        """
        state = self._act_state()
        with state.lock:
            if state.fitting:
                raise ACTError("fit_act is running on this model; fuse when it has finished.")
            modules = self.act_modules()
            handle = active_handle(modules)
            resume = None
            if handle is not None:
                gate = getattr(self._act_denoiser, _GATE_ATTR, None)
                resume = (
                    handle.act_map,
                    {p: c.strength for p, c in handle.controls.items()},
                    gate.options if gate else {},
                )
                if act_map is None:
                    act_map = handle.act_map
                    strength = resume[1] if strength is None else strength
                if gate is not None and (gate.start > 0.0 or gate.end < 1.0) and act_map is resume[0]:
                    raise ACTInputError(
                        "This map is enabled with a start/end window, which weights cannot follow; use hooks."
                    )
            if act_map is None:
                raise ACTInputError("No map to fuse: pass one, or enable_act(map) first.")
            strength = 1.0 if strength is None else strength
            resolve_strengths(strength, act_map.parts())
            self._act_remove_hooks()
            try:
                fold_act(self.act_modules(act_map.parts()), act_map, strength)
            except BaseException:
                if resume is not None:
                    self.enable_act(resume[0], resume[1], **resume[2])
                raise
            state.resume = resume
            if (  # said once the map is folded: a map fold_act refuses gets only its error
                self.act_family.denoiser in act_map.parts()
                and act_map.metadata.get("cfg_rows", "cond") == "cond"
            ):
                warnings.warn(
                    "This map steers the cond rows of a CFG batch when hooked; fused weights steer every row, so "
                    "the fused image differs from the hooked one. Fit with preset 'unet_norms_foldable' for a map "
                    "whose hooks and weights agree.",
                    ACTWarning,
                    stacklevel=2,
                )

    def unfuse_act(self) -> None:
        """Restore the weights bit for bit; re-enables the hooks that ``fuse_act`` replaced."""
        state = self._act_state()
        with state.lock:
            if not unfold_act(self.act_modules()):
                return
            resume, state.resume = state.resume, None
            if resume is not None:
                act_map, strengths, options = resume
                self.enable_act(act_map, strengths, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Lets the UNet gate ask this pipeline whether the batch is a CFG batch.
        with _claim_stateful_parts(self):
            token = _ACTIVE_PIPELINE.set(self)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                _ACTIVE_PIPELINE.reset(token)


def _progress_callback(progress: bool | Callable[[int, int, str], None], description: str):
    if callable(progress):
        return progress
    return Progress(description) if progress else None


def act_pipeline(pipe: Any) -> Any:
    """An ACT-enabled pipeline sharing ``pipe``'s modules (no weights reloaded, dtype kept).

    Built with diffusers' ``from_pipe`` on a subclass that adds ``ACTPipelineMixin`` to ``pipe``'s class.
    The scheduler and tokenizers are copied (they keep per-call state, so two pipelines sharing one
    cannot generate at the same time); the models are shared.
    """
    cls = type(pipe)
    if isinstance(pipe, ACTPipelineMixin):
        return pipe
    mixin = ACTPipelineMixin
    transformer_class = type(getattr(pipe, "transformer", None)).__name__
    if "Flux" in transformer_class:
        from .flux import ACTFluxPipelineMixin

        mixin = ACTFluxPipelineMixin
    elif transformer_class == "SD3Transformer2DModel":
        from .sd3 import ACTSD3PipelineMixin

        mixin = ACTSD3PipelineMixin
    elif getattr(pipe, "unet", None) is None:
        raise ACTInputError(
            f"{cls.__name__} is not a supported pipeline: ACT knows SDXL / SD 1.x (a UNet), FLUX.1 (a "
            "FluxTransformer2DModel) and SD3 (an SD3Transformer2DModel)."
        )
    act_cls = type(f"ACT{cls.__name__}", (mixin, cls), {"__module__": __name__})
    # from_pipe casts every model to ``dtype``, here a no-op; diffusers' modeling_utils then warns about
    # fp32 modules on every such cast, even when there are none ("...kept in float32: []"), so mute it.
    modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = modeling_logger.level
    modeling_logger.setLevel(logging.ERROR)
    try:
        own = {
            name: copy.deepcopy(obj)
            for name in _STATEFUL_PARTS
            if (obj := getattr(pipe, name, None)) is not None
        }
        wrapped = act_cls.from_pipe(pipe, dtype=pipe.dtype, **own)
    finally:
        modeling_logger.setLevel(level)
    if hasattr(pipe, "_progress_bar_config"):  # from_pipe does not carry it over
        wrapped.set_progress_bar_config(**pipe._progress_bar_config)
    return wrapped
