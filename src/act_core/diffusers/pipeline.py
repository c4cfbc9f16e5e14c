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
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from ..calibration import DEFAULT_CALIBRATION
from ..errors import ACTError, ACTInputError, ACTWarning
from ..estimators import DEFAULT_SHRINKAGE, MAX_OMEGA
from ..families import ModelFamily
from ..maps import ACTMap
from ..presets import CFG_ROWS, Preset
from ..progress import Progress
from ..validation import check_window
from ..workflow import FitOptions, fit_act_map, preset_modules
from .adapter import call_guides, load_adapter
from .host import DiffusersFitHost, sampling_settings

_ACTIVE_PIPELINE: contextvars.ContextVar[Any] = contextvars.ContextVar("act_active_pipeline", default=None)
_GATE_ATTR = "_act_step_gate"
_STATE_ATTR = "_act_state"
_STATE_LOCK = threading.Lock()
# Schedulers and tokenizers keep per-call state (step index, padding settings): two generations that share
# one (the same pipeline, or pipelines made with from_pipe) cannot run at the same time.
STATEFUL_PARTS = ("scheduler", "tokenizer", "tokenizer_2")
_BUSY_LOCK = threading.Lock()
_BUSY: set[int] = set()


@contextlib.contextmanager
def _claim_stateful_parts(pipe: Any) -> Iterator[None]:
    """Refuse, with the fix, a generation whose scheduler or tokenizer another generation is using."""
    parts = {id(obj): name for name in STATEFUL_PARTS if (obj := getattr(pipe, name, None)) is not None}
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
    """Lock and flags of one set of shared modules (kept on the denoiser, so ``from_pipe`` pipelines share it)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.fitting = False
        self.resume: tuple | None = None  # what fuse_act replaced: (map, strengths, gate options)


class DenoiserStepGate:
    """A denoiser forward pre-hook: tells the hooks this call's noise level, CFG rows and step window.

    Denoising progress is read off the timestep, ``1 - t / timestep_scale`` (0 at pure noise; SDXL's UNet
    gets t in [0, 1000), FLUX's transformer t / 1000 from its pipeline; with ``timestep_reversed``, Lumina 2's
    and Z-Image's 1 - t / 1000, the noise level is ``1 - t / timestep_scale``), the same convention as
    ComfyUI's start/end percent, so no step counter has to be threaded through.
    All of it is per thread (``ACTHandle.set_call``).
    """

    def __init__(
        self,
        handle: ACTHandle,
        start: float,
        end: float,
        cfg_rows: str,
        timestep_scale: float,
        part: str,
        cfg_calls: str = "batch",
        timestep_reversed: bool = False,
    ):
        self.handle, self.start, self.end = handle, start, end
        self.cfg_rows, self.timestep_scale, self.part = cfg_rows, timestep_scale, part
        self.cfg_calls, self.timestep_reversed = cfg_calls, timestep_reversed
        self.removable = None

    @property
    def options(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "cfg_rows": self.cfg_rows}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
        level, in_window = None, True
        if timestep is not None:
            level = float(torch.as_tensor(timestep).flatten()[0]) / self.timestep_scale
            if self.timestep_reversed:
                level = 1.0 - level
            progress = 1.0 - level
            in_window = self.start - 1e-6 <= progress <= self.end + 1e-6
        rows = None
        if self.cfg_rows == "cond":
            generation = _ACTIVE_PIPELINE.get()
            if generation is None:
                raise ACTError(
                    f"ACT is enabled on this {self.part} with cfg_rows='cond', but it is being called outside an ACT "
                    "pipeline (for example by a pipeline made with from_pipe from an ACT pipeline), so ACT cannot "
                    "tell which rows are the prompt's. Call it through act_pipeline(pipe), or enable the map with "
                    "cfg_rows='all'."
                )
            if generation.guided():
                if self.cfg_calls == "separate":
                    # The prompt's call comes first at each timestep, the negative prompt's after it.
                    in_window = in_window and generation.first_call_at(level)
                else:
                    # a batch tensor, or a list of one tensor per row (ZImagePipeline)
                    batch = len(sample) if isinstance(sample, (list, tuple)) else sample.shape[0]
                    # diffusers orders a CFG batch as [uncond; cond]; ZImagePipeline as [cond; uncond]
                    cond_first = self.cfg_calls == "batch_cond_first"
                    rows = slice(0, batch // 2) if cond_first else slice(batch // 2, batch)
        self.handle.set_call([self.part], rows=rows, noise_level=level, in_window=in_window)


class _Generation:
    """One generation's view for the gate: whether it guides, and (separate CFG calls) which call of the
    current timestep this is."""

    def __init__(self, pipe: Any, cfg_batch: bool | None):
        self.pipe, self.cfg_batch = pipe, cfg_batch
        self.level: float | None = None
        self.calls = 0

    def guided(self) -> bool:
        if self.cfg_batch is not None:
            return self.cfg_batch
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def first_call_at(self, level: float | None) -> bool:
        if level != self.level:
            self.level, self.calls = level, 0
        self.calls += 1
        return self.calls == 1


class ACTPipelineMixin:
    """Adds ACT to a diffusers pipeline of any supported family; ``act_pipeline`` sets ``act_family``."""

    act_family: ModelFamily

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
            modules.update(self.act_family.diffusers_modules(part, components[part]))
        return modules

    def act_preset_modules(
        self, preset: str | Preset | None = None, parts: Sequence[str] | None = None
    ) -> dict[str, nn.Module]:
        """The modules a preset hooks (optionally only some of its parts), in registration order."""
        spec = self.act_family.preset(preset or self.act_family.default_preset)
        return preset_modules(DiffusersFitHost(self, None), spec, parts)

    # ------------------------------------------------------------------------------ fitting
    def fit_act(
        self,
        source_prompts: Sequence[str],
        target_prompts: Sequence[str],
        *,
        less_prompts: Sequence[str] | None = None,
        preset: str | Preset | None = None,
        parts: Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        max_sequence_length: int | None = None,
        method: str | None = None,
        support: str | None = None,
        mode: str | None = None,
        protocol: str | None = None,
        trajectory: str = "steered",
        statistic: str | None = None,
        calibrate: bool | None = None,
        calibration: str = DEFAULT_CALIBRATION,
        batch_size: int | None = None,
        max_pairs_per_call: int | None = None,
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
        ``height``, ``width``, ``negative_prompt``, and on FLUX / SD3 the T5 ``max_sequence_length``;
        defaults: this pipeline's own). The family's default preset (SDXL ``unet_norms``, FLUX and SD3
        ``pooled_text_and_blocks``: protocol ``"trajectory"``) samples the prompt pairs along that trajectory
        with the pipeline's scheduler, records every hooked module on the prompt's rows at every step, and
        fits one map per noise level, exact causal in one pass; the map then applies at any step count.
        Prompt pair i (source i, target i; the shorter list repeats) gets the noise of seed ``seed + i``.
        With ``less_prompts`` the map is two-sided: lambda -1 moves toward the less prompts, +1 toward the
        target prompts (a second fit; ``act_map.less`` holds that side).

        Protocol ``"first_step"`` (preset ``unet_norms_first_step``, the paper's) uses the cond branch of
        the first ``statistics_steps`` steps, guidance off. Text-encoder-only presets run no denoiser.
        ``calibration``: how each step's maps are scaled so that lambda = 1 moves the prediction as far as the
        target prompt does (``"norm"``, default) or by the least-squares gain (``"projection"``, the earlier
        default, which under-reaches by the cosine between the two moves).
        ``max_pairs_per_call``: at most this many prompt pairs per denoiser call (default: as many as fit in
        memory). A step that does not fit in one call runs the target-side rows first, then the source rows
        in calls that meet at every hooked module: the maps equal the one-call fit's, for the same denoiser
        work. ``batch_size``: the first-step engine's batches (and max_pairs_per_call's default, for
        compatibility). ``progress`` shows a tqdm bar (True), nothing
        (False), or calls your ``progress(done, total, what)``.
        """
        settings = sampling_settings(
            self,
            self.act_family,
            load_adapter(self.act_family),
            num_inference_steps,
            guidance_scale,
            height,
            width,
            negative_prompt,
            max_sequence_length,
        )
        options = FitOptions(
            preset=preset,
            parts=parts,
            protocol=protocol,
            method=method,
            support=support,
            mode=mode,
            trajectory=trajectory,
            statistic=statistic,
            calibrate=calibrate,
            calibration=calibration,
            batch_size=batch_size,
            max_pairs_per_call=max_pairs_per_call,
            seed=seed,
            statistics_steps=statistics_steps,
            causal_strategy=causal_strategy,
            max_lockstep_batches=max_lockstep_batches,
            shrinkage=shrinkage,
            max_omega=max_omega,
        )
        report = _progress_callback(progress, "Fitting ACT map")
        host = DiffusersFitHost(self, settings)
        return fit_act_map(host, source_prompts, target_prompts, options, report, less_prompts)

    @contextlib.contextmanager
    def _act_fitting(self) -> Iterator[None]:
        """Fit on the plain model only, and one fit at a time on shared modules."""
        state = self._act_state()
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
                adapter = load_adapter(self.act_family)
                gate = DenoiserStepGate(
                    handle,
                    start,
                    end,
                    cfg_rows,
                    adapter.timestep_scale(self),
                    denoiser,
                    self.act_family.cfg_calls,
                    adapter.timestep_reversed,
                )
                gate.removable = self._act_denoiser.register_forward_pre_hook(gate, with_kwargs=True)
                self._act_denoiser.__dict__[_GATE_ATTR] = gate
            return handle

    def set_act_strength(self, strength: Strength) -> None:
        """Change lambda of the enabled map without re-hooking (a number or per part)."""
        with self._act_state().lock:
            modules = self.act_modules()
            handle = active_handle(modules)
            if handle is None and active_fold(modules) is not None:
                raise ACTInputError(
                    "The ACT map is fused into the weights, which have no live strength; call "
                    "fuse_act(strength=...) to fuse it at another strength, or unfuse_act() to get the hooks back."
                )
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

    def act_generation(self, cfg_batch: bool | None = None) -> contextlib.AbstractContextManager:
        """Denoiser calls made in this block belong to a generation of this pipeline (``active_pipeline``), for
        code that calls the denoiser itself (``act_core.distill``, benchmarks of one step)."""
        return active_pipeline(self, cfg_batch)

    def fold_act(
        self,
        act_map: ACTMap,
        source_prompts: Sequence[str] | None = None,
        *,
        progress: bool | Callable = True,
        **options: Any,
    ) -> ACTMap:
        """A static map that folds and steers like ``act_map``'s hooks: one per-channel (omega, beta) per module,
        on every row at every step, fitted end to end so the guided predictions match those of the time-aware,
        cond-rows map along its own generations of ``source_prompts`` (default: the prompts it was fitted on,
        which fits record in the map). ``fuse_act`` and ``act export-lora`` take the result (``act_core.distill.fold_map`` with this
        pipeline as its host, ``act_core.diffusers.folding``; ``options``: its steps, learning rate, sampling
        settings). Families whose maps fold: SDXL / SD 1.x / 2.x.
        """
        from ..lora import check_family_folds
        from .folding import fold_to_static

        check_family_folds(act_map)
        bar = _progress_callback(progress, "Folding ACT map") if progress else None
        report = (lambda step, steps, loss: bar(step, steps, f"loss {loss:.3f}")) if bar else None
        return fold_to_static(self, act_map, source_prompts, progress=report, **options)

    def fuse_act(
        self,
        act_map: ACTMap | None = None,
        strength: Strength | None = None,
        *,
        source_prompts: Sequence[str] | None = None,
        fold_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Fold a foldable map into the weights (zero cost per step); ``unfuse_act`` restores them.

        Without arguments it fuses the enabled map at its current strengths (its hooks are removed and
        come back on ``unfuse_act``). One-bucket, unbounded, per-element maps fold. The default's time-aware
        map folds through ``fold_act`` first (the static map that steers like its hooks, fitted along the
        generations of the prompts the map was fitted on, which it records, or of ``source_prompts``; tens of
        seconds on small models, a progress bar shows it), then fuses. Weights act on every row of a CFG batch and
        at every step, so a start/end window cannot be fused, and a map that steers the cond rows only gives a
        different image fused (a warning says so). ``fold_options`` go to ``fold_act``.
        """
        if (
            act_map is not None
            and act_map.buckets is not None
            and act_map.less is None
            and self.act_family.folds
        ):
            act_map = self.fold_act(act_map, source_prompts, **dict(fold_options or {}))
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
        # Lets the denoiser gate ask this pipeline whether the batch is a CFG batch.
        with _claim_stateful_parts(self), active_pipeline(self, self._act_call_guides(args, kwargs)):
            return super().__call__(*args, **kwargs)

    def _act_call_guides(self, args: tuple, kwargs: dict) -> bool | None:
        """Whether this call runs CFG, for pipelines that do not say so (no ``do_classifier_free_guidance``,
        as QwenImagePipeline): read off the call's arguments by the family's adapter; None: ask the pipeline."""
        if not self.act_family.cfg_batch or hasattr(type(self), "do_classifier_free_guidance"):
            return None
        try:
            bound = inspect.signature(super().__call__).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return None  # the pipeline's own __call__ raises on these arguments
        bound.apply_defaults()
        return call_guides(load_adapter(self.act_family), bound.arguments)


@contextlib.contextmanager
def active_pipeline(pipe: Any, cfg_batch: bool | None = None) -> Iterator[None]:
    """Denoiser calls made in this block belong to a generation of ``pipe`` (what its ``__call__`` sets), so
    maps that steer the prompt's rows know which rows those are. ``cfg_batch``: whether each batch is
    ``[uncond; cond]`` (default: the pipeline's own ``do_classifier_free_guidance``). For code that calls
    the denoiser itself, such as a benchmark of one step."""
    token = _ACTIVE_PIPELINE.set(_Generation(pipe, cfg_batch))
    try:
        yield
    finally:
        _ACTIVE_PIPELINE.reset(token)


def _progress_callback(progress: bool | Callable[[int, int, str], None], description: str):
    if callable(progress):
        return progress
    return Progress(description) if progress else None
