"""A static map that folds, fitted end to end against a time-aware map's hooks (issue 22).

The default map is time-aware (one (omega, beta) per noise level) and its hooks steer the cond rows of a CFG
batch only; weights (``fuse_act``, LoRA files) are static and act on every row. ``fold_to_static`` fits one
per-channel (omega, beta) per hooked module, applied to **every** row at every step, so that the denoiser's
*guided* prediction with it matches the guided prediction of the time-aware map's hooks (LinEAS-style: one
least-squares fit over all modules jointly, through the frozen denoiser):

1. **States.** The source prompts are generated with the pipeline's own sampler with the time-aware map
   enabled (its cond rows, at ``strength``); every denoiser call (its inputs, its output) is recorded. The
   guided prediction of each call is the teacher's target.
2. **Reference.** The same calls are run on the plain model, so the loss reads as a share of the teacher's
   own move: ``|student - teacher|^2 / |plain - teacher|^2`` (1 = the plain model, 0 = the hooks exactly),
   per noise level by default (the teacher moves the prediction some 70 times further at the last step than
   at the first, so a pooled squared error would leave the structure-forming steps unfitted).
3. **Fit.** From an initial static map (``collapse_map`` of the time-aware one: omega and beta averaged over
   the noise levels, scaled around the identity by the gain with the lowest loss; moving both CFG halves by
   a delta moves the guided output by about the delta, moving the cond half by about guidance x the delta),
   Adam on omega and beta only (the denoiser's weights frozen), on minibatches of recorded calls and
   prompts. Optionally (``rounds``) the static map's own generations add their states (DAgger).

The result is a one-bucket, unbounded, per-element map with ``cfg_rows="all"``: it folds (``fuse_act``,
``act export-lora``) and its hooks give the image its fused weights give. Its metadata (``distilled``)
says how it was made and the loss before and after.

Works for diffusers ACT pipelines whose denoiser call holds the CFG batch (``cfg_calls`` ``"batch"``:
SDXL / SD 1.x / SD3, ``"batch_cond_first"``: Z-Image) or runs without CFG; pipelines that run the prompt's
and the negative prompt's calls separately (Chroma, Lumina 2, Qwen-Image) would need the two calls of a step
paired, and are refused. Whether the result folds is the family's: FLUX / SD3 maps do not (their norms have
no affine weights).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ACTInputError, ACTWarning
from .maps import APPLY_PER_ELEMENT, ACTMap, ModuleMap
from .recording import channel_axis, hook_module, read_output, write_output


@dataclass
class DenoiserCall:
    """One recorded denoiser call: its inputs, its noise level, and the guided predictions at it."""

    args: tuple
    kwargs: dict
    level: float | None
    batch: int  # rows of the call (2 x prompts in a CFG batch)
    teacher: torch.Tensor | None = None  # guided prediction with the time-aware map's hooks, (prompts, ...)
    plain: torch.Tensor | None = None  # guided prediction of the plain model
    norm: float = 1.0  # what the squared error of one row is divided by in the loss


# ----------------------------------------------------------------------------------- initial maps
def level_weights(act_map: ACTMap, max_level: float | None = None) -> torch.Tensor:
    """(K,) weights over the map's buckets (in its own order): uniform, over the levels <= ``max_level`` only
    when given (the later, less noisy steps)."""
    if act_map.buckets is None:
        raise ACTInputError("This map has no noise-level buckets; it is already static.")
    levels = torch.tensor(act_map.buckets, dtype=torch.float32)
    keep = torch.ones_like(levels) if max_level is None else (levels <= max_level + 1e-6).float()
    if keep.sum() == 0:
        raise ACTInputError(f"No bucket of the map is at a noise level <= {max_level}.")
    return keep / keep.sum()


def collapse_map(act_map: ACTMap, gain: float = 1.0, max_level: float | None = None) -> ACTMap:
    """One bucket: omega and beta averaged over the noise levels (``level_weights``), then scaled around the
    identity by ``gain`` (omega -> 1 + gain (omega - 1), beta -> gain beta); unbounded, per element, every
    CFG row. Modules without buckets (text encoders) are kept as they are."""
    weights = level_weights(act_map, max_level).view(-1, 1)
    modules = {}
    for name, m in act_map.modules.items():
        omega, beta = (
            ((weights * m.omega).sum(0), (weights * m.beta).sum(0)) if m.bucketed else (m.omega, m.beta)
        )
        modules[name] = _unbounded(1.0 + gain * (omega - 1.0), gain * beta)
    metadata = {**act_map.metadata, "cfg_rows": "all", "collapsed": {"gain": gain, "max_level": max_level}}
    return ACTMap(modules, metadata, None)


def _unbounded(omega: torch.Tensor, beta: torch.Tensor) -> ModuleMap:
    inf = torch.full_like(omega, float("inf"))
    return ModuleMap(omega.detach(), beta.detach(), -inf, inf, APPLY_PER_ELEMENT)


# ----------------------------------------------------------------------------------- CFG layout
def _layout(pipe: Any, guided: bool) -> str:
    """Where the prompt's rows sit in a denoiser call: "all" (no CFG), "uncond_first" or "cond_first"."""
    family = pipe.act_family
    if not guided or not family.cfg_batch:
        return "all"
    if family.cfg_calls == "batch":
        return "uncond_first"
    if family.cfg_calls == "batch_cond_first":
        return "cond_first"
    raise ACTInputError(
        f"{family.display_name}'s pipeline runs the prompt's and the negative prompt's denoiser calls "
        "separately; fold_to_static needs both halves of a step in one call (pairing the two calls is not "
        "implemented)."
    )


def _guided(output: torch.Tensor, layout: str, scale: float) -> torch.Tensor:
    """The guided prediction ``uncond + scale (cond - uncond)`` of a call's output, one row per prompt."""
    output = output.float()
    if layout == "all":
        return output
    half = output.shape[0] // 2
    first, second = output[:half], output[half:]
    uncond, cond = (first, second) if layout == "uncond_first" else (second, first)
    return uncond + scale * (cond - uncond)


def _rows(layout: str, prompts: torch.Tensor, batch: int) -> torch.Tensor:
    """The call's rows of the prompts ``prompts`` (both CFG halves)."""
    if layout == "all":
        return prompts
    return torch.cat([prompts, prompts + batch // 2])


def _take(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` (a call argument) restricted to ``rows``: tensors (and per-row lists) of ``batch`` rows are
    indexed, everything else (the timestep, sizes, flags) is kept."""
    if isinstance(value, torch.Tensor):
        return (
            value.index_select(0, rows.to(value.device)) if value.ndim and value.shape[0] == batch else value
        )
    if isinstance(value, dict):
        return {key: _take(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == batch and all(isinstance(item, torch.Tensor) for item in value):
            return type(value)(value[int(i)] for i in rows)
        return type(value)(_take(item, rows, batch) for item in value)
    return value


def _output(result: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's return value (a tuple, a dataclass with ``sample``, a tensor)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        return result[0]
    return result.sample


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


# ----------------------------------------------------------------------------------- recording
def _noise_level(pipe: Any, args: tuple, kwargs: dict) -> float | None:
    from .diffusers.adapter import load_adapter

    timestep = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
    if timestep is None:
        return None
    adapter = load_adapter(pipe.act_family)
    level = float(torch.as_tensor(timestep).flatten()[0]) / adapter.timestep_scale(pipe)
    return 1.0 - level if adapter.timestep_reversed else level


def record_calls(
    pipe: Any, prompts: Sequence[str], generation: dict, layout: str, scale: float, seed: int
) -> list[DenoiserCall]:
    """Generate ``prompts`` (prompt i with seed ``seed + i``) and record every denoiser call: its inputs (the
    sample cloned, the rest by reference: the pipeline passes the same embeddings at every step) and the
    guided prediction of its output, with whatever map the pipeline has enabled."""
    denoiser = getattr(pipe, pipe.act_family.denoiser)
    calls: list[DenoiserCall] = []

    def before(module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
        batch = len(sample) if isinstance(sample, (list, tuple)) else int(sample.shape[0])
        args = _detached(args)
        if args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(), *args[1:])
        calls.append(DenoiserCall(args, _detached(dict(kwargs)), _noise_level(pipe, args, kwargs), batch))

    def after(module: Any, args: tuple, kwargs: dict, result: Any) -> None:
        calls[-1].teacher = _guided(_output(result).detach(), layout, scale)

    handles = [
        denoiser.register_forward_pre_hook(before, with_kwargs=True),
        denoiser.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        with torch.no_grad():
            pipe(list(prompts), generator=generators, output_type="latent", **generation)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _generation_settings(pipe: Any, act_map: ACTMap, overrides: dict) -> tuple[dict, float, bool]:
    """(pipeline arguments, CFG scale, guided) of the generation the map was fitted with (its metadata's
    sampling settings), ``overrides`` winning; the pipeline's defaults fill the rest."""
    from .diffusers.adapter import load_adapter
    from .diffusers.host import sampling_settings

    fitted = dict(act_map.metadata.get("sampling") or {})
    pick = {
        key: overrides.get(key) if overrides.get(key) is not None else fitted.get(key) for key in overrides
    }
    adapter = load_adapter(pipe.act_family)
    settings = sampling_settings(
        pipe,
        pipe.act_family,
        adapter,
        pick["num_inference_steps"],
        pick["guidance_scale"],
        pick["height"],
        pick["width"],
        pick["negative_prompt"],
        pick["max_sequence_length"],
    )
    generation = {
        "num_inference_steps": settings.num_inference_steps,
        adapter.guidance_parameter: settings.guidance_scale,
        "height": settings.height,
        "width": settings.width,
    }
    if settings.negative_prompt is not None:
        generation["negative_prompt"] = settings.negative_prompt
    if settings.max_sequence_length is not None:
        generation["max_sequence_length"] = settings.max_sequence_length
    # ZImagePipeline guides cond + s (cond - uncond): the usual scale is s + 1
    scale = settings.guidance_scale + (1.0 - adapter.cfg_threshold)
    return generation, scale, settings.guided


# ----------------------------------------------------------------------------------- the fit
class _StaticHooks:
    """Differentiable ``x * omega + beta`` on every row of the mapped modules' outputs (float32 parameters)."""

    def __init__(self, modules: dict[str, Any], init: ACTMap, device: torch.device):
        self.params = {
            name: (
                m.omega.to(device).clone().requires_grad_(True),
                m.beta.to(device).clone().requires_grad_(True),
            )
            for name, m in init.modules.items()
        }
        self.modules = {name: modules[name] for name in init.modules}
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        entry = self.modules[name]
        omega, beta = self.params[name]

        def hook(module: Any, args: Any, output: Any) -> Any:
            x = read_output(entry, output)
            view = [1] * x.ndim
            view[channel_axis(x.ndim)] = -1
            y = x.float() * omega.view(view) + beta.view(view)
            return write_output(entry, output, y.to(x.dtype))

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = [
            hook_module(entry).register_forward_hook(self._hook(name)) for name, entry in self.modules.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.params.values() for t in pair]

    def act_map(self, metadata: dict) -> ACTMap:
        return ACTMap(
            {name: _unbounded(o.detach().cpu(), b.detach().cpu()) for name, (o, b) in self.params.items()},
            metadata,
        )


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """The module's parameters without gradients for the duration (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _run(denoiser: Any, call: DenoiserCall, rows: torch.Tensor | None) -> torch.Tensor:
    args, kwargs = call.args, call.kwargs
    if rows is not None:
        args, kwargs = _take(args, rows, call.batch), _take(kwargs, rows, call.batch)
    return _output(denoiser(*args, **kwargs))


def relative_error(
    denoiser: Any, hooks: _StaticHooks, calls: list[DenoiserCall], layout: str, scale: float
) -> dict[str, float]:
    """How far the static map's guided predictions are from the teacher's, as a share of the teacher's own
    move from the plain model (no gradients): ``"pooled"``, ``sum |student - teacher|^2 / sum |plain -
    teacher|^2`` over every state, and ``"per_level"``, that ratio per denoiser call averaged over the calls
    (every noise level counts the same; the teacher moves the prediction far more at the last steps)."""
    num = den = per_level = 0.0
    with torch.no_grad(), hooks.active():
        for call in calls:
            student = _guided(_run(denoiser, call, None), layout, scale)
            error = float((student - call.teacher).pow(2).sum())
            move = float((call.plain - call.teacher).pow(2).sum())
            num, den = num + error, den + move
            per_level += error / max(move, 1e-30)
    return {"pooled": num / max(den, 1e-30), "per_level": per_level / len(calls)}


def _set_norms(
    calls: list[DenoiserCall], weighting: str, reference: list[DenoiserCall] | None = None
) -> None:
    """Each call's loss normaliser: the teacher's move per row at the call (``per_level``), or its mean over
    the ``reference`` calls (default: these)."""
    moves = [float((c.plain - c.teacher).pow(2).sum()) / c.teacher.shape[0] for c in calls]
    if weighting == "pooled":
        ref = reference or calls
        pooled = sum(float((c.plain - c.teacher).pow(2).sum()) for c in ref) / sum(
            c.teacher.shape[0] for c in ref
        )
        moves = [pooled] * len(calls)
    for call, move in zip(calls, moves, strict=True):
        call.norm = max(move, 1e-30)


def _plain_outputs(denoiser: Any, calls: list[DenoiserCall], layout: str, scale: float) -> None:
    with torch.no_grad():
        for call in calls:
            call.plain = _guided(_run(denoiser, call, None), layout, scale)


def _own_states(
    pipe: Any,
    act_map: ACTMap,
    hooks: _StaticHooks,
    strength: float,
    prompts: Sequence[str],
    generation: dict,
    layout: str,
    scale: float,
    seed: int,
) -> list[DenoiserCall]:
    """The denoiser calls of the static map's own generation of ``prompts`` (hooked on every row at
    ``strength``), with the teacher's (``act_map`` hooked at ``strength``) and the plain guided predictions
    at them (DAgger: the states the static map will meet)."""
    denoiser = getattr(pipe, pipe.act_family.denoiser)
    static = hooks.act_map({"cfg_rows": "all"})
    try:
        pipe.enable_act(static, strength, cfg_rows="all")
        calls = record_calls(pipe, prompts, generation, layout, scale, seed)
        pipe.enable_act(act_map, strength)
        with torch.no_grad(), pipe.act_generation(layout != "all"):
            for call in calls:
                call.teacher = _guided(_run(denoiser, call, None), layout, scale)
    finally:
        pipe.disable_act()
    _plain_outputs(denoiser, calls, layout, scale)
    return calls


def _lr_factor(steps: int, step: int) -> float:
    """Adam's step size as a share of ``lr`` at ``step``: a linear warm-up over the first tenth of the steps
    (Adam's first steps move every omega and beta by about ``lr`` at once), then a cosine to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


WEIGHTINGS = ("per_level", "pooled")
# The gains ``collapse_map`` is tried at for the starting map (the best by the loss is taken).
INIT_GAINS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def fold_to_static(
    pipe: Any,
    act_map: ACTMap,
    source_prompts: Sequence[str],
    *,
    strength: float = 1.0,
    init: ACTMap | None = None,
    init_gain: float | None = None,
    init_max_level: float | None = None,
    steps: int = 200,
    lr: float = 0.02,
    calls_per_step: int = 2,
    prompts_per_call: int = 8,
    weighting: str = "per_level",
    rounds: int = 1,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> ACTMap:
    """One static, foldable map (one bucket, unbounded, per element, ``cfg_rows="all"``) whose guided
    predictions match those of ``act_map``'s hooks at ``strength`` along their own generations of
    ``source_prompts`` (see the module docstring).

    ``init``: the starting map (one bucket); default ``collapse_map(act_map, init_gain, init_max_level)``,
    without ``init_gain`` at the gain of ``INIT_GAINS`` with the lowest loss. Adam's step size warms up
    to ``lr`` over the first tenth of the steps, then follows a cosine to 0. ``steps`` Adam steps of ``calls_per_step`` recorded denoiser calls with
    ``prompts_per_call`` of their prompts each. ``weighting``: the loss of each state as a share of the
    teacher's move at its noise level (``"per_level"``: early, structure-forming steps count as much as late
    ones) or the plain squared error of the guided predictions (``"pooled"``: dominated by the last steps,
    where the teacher moves the prediction most). ``rounds`` > 1: after each round of ``steps``, the static
    map generates the prompts itself and its states (with the teacher's predictions there) join the fit
    (DAgger). Sampling settings default to the ones ``act_map`` was fitted
    with (its metadata), then the pipeline's. ``progress(step, steps, loss)`` after every step.
    """
    if pipe.act_map is not None:
        raise ACTInputError("An ACT map is enabled or fused on this pipeline; call disable_act() first.")
    if act_map.less is not None:
        raise ACTInputError("This map is two-sided; distil one side (act_map.side('more') or side('less')).")
    denoiser_part = pipe.act_family.denoiser
    unknown = [name for name in act_map.modules if not name.startswith(f"{denoiser_part}.")]
    if unknown:
        raise ACTInputError(
            f"fold_to_static distils the {denoiser_part}'s modules; this map also has {unknown[:3]} (use "
            f"act_map.restrict(parts=['{denoiser_part}']))."
        )
    if weighting not in WEIGHTINGS:
        raise ACTInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if rounds < 1 or steps < 0:
        raise ACTInputError(f"rounds must be >= 1 and steps >= 0, got {rounds} and {steps}.")
    if not source_prompts:
        raise ACTInputError("fold_to_static needs source prompts to generate the states it fits on.")
    start = time.perf_counter()
    generation, scale, guided = _generation_settings(
        pipe,
        act_map,
        {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "negative_prompt": negative_prompt,
            "max_sequence_length": max_sequence_length,
        },
    )
    layout = _layout(pipe, guided)
    if init is not None and (init.buckets is not None or set(init.modules) != set(act_map.modules)):
        raise ACTInputError("init must be a one-bucket map over the same modules as act_map.")
    denoiser = getattr(pipe, denoiser_part)
    modules = pipe.act_modules([denoiser_part])
    try:
        pipe.enable_act(act_map, strength)  # the teacher: its own cfg_rows (the cond rows)
        calls = record_calls(pipe, source_prompts, generation, layout, scale, seed)
    finally:
        pipe.disable_act()
    _plain_outputs(denoiser, calls, layout, scale)
    recorded = time.perf_counter() - start
    device = calls[0].teacher.device
    searched, search_start = None, time.perf_counter()
    if init is None and init_gain is None:
        with _frozen(denoiser):
            searched = {
                gain: relative_error(
                    denoiser,
                    _StaticHooks(modules, collapse_map(act_map, gain, init_max_level), device),
                    calls,
                    layout,
                    scale,
                )[weighting]
                for gain in INIT_GAINS
            }
        init_gain = min(searched, key=searched.get)
    searching = time.perf_counter() - search_start
    if init is None:
        init = collapse_map(act_map, init_gain, init_max_level)
    hooks = _StaticHooks(modules, init, device)
    _set_norms(calls, weighting)
    rng = random.Random(seed)
    pool = list(calls)
    with _frozen(denoiser):
        loss_initial = relative_error(denoiser, hooks, calls, layout, scale)
        for round_index in range(rounds):
            if round_index:  # the static map's own states, with the teacher's predictions there
                own = _own_states(
                    pipe, act_map, hooks, strength, source_prompts, generation, layout, scale, seed
                )
                _set_norms(own, weighting, calls)
                pool += own
            optimizer = torch.optim.Adam(hooks.tensors(), lr=lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_lr_factor, steps))
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                with hooks.active():
                    for call in rng.sample(pool, min(calls_per_step, len(pool))):
                        prompts = call.teacher.shape[0]
                        picked = torch.tensor(
                            sorted(rng.sample(range(prompts), min(prompts_per_call, prompts)))
                        )
                        student = _guided(
                            _run(denoiser, call, _rows(layout, picked, call.batch)), layout, scale
                        )
                        target = call.teacher.index_select(0, picked.to(device))
                        loss = (student - target).pow(2).sum() / (call.norm * len(picked) * calls_per_step)
                        loss.backward()
                        total += float(loss.detach())
                optimizer.step()
                schedule.step()
                if progress is not None:
                    progress(round_index * steps + step + 1, rounds * steps, total)
        loss_final = relative_error(denoiser, hooks, calls, layout, scale)
    kept_init = not loss_final[weighting] <= loss_initial[weighting]  # NaN included
    returned = loss_initial if kept_init else loss_final
    if kept_init:  # the fit diverged (too large an lr for this model): the starting map is the better one
        hooks = _StaticHooks(modules, init, device)
        warnings.warn(
            f"fold_to_static: the fit ended with a higher loss ({loss_final[weighting]:.3g}) than its starting map "
            f"({loss_initial[weighting]:.3g}); the starting map is returned. Try a smaller lr (now {lr}).",
            ACTWarning,
            stacklevel=2,
        )
    seconds = time.perf_counter() - start
    metadata = {
        key: value
        for key, value in act_map.metadata.items()
        if key not in ("calibration_gains", "collapsed", "distilled")
    }
    metadata.update(
        cfg_rows="all",
        protocol="static_fit",
        distilled={
            "from_protocol": act_map.metadata.get("protocol"),
            "from_buckets": None if act_map.buckets is None else len(act_map.buckets),
            "strength": strength,
            "states": len(calls),
            "num_prompts": len(source_prompts),
            "seed": seed,
            "init": init.metadata.get("collapsed", "given"),
            "init_search": searched,
            "steps": steps,
            "rounds": rounds,
            "lr": lr,
            "calls_per_step": calls_per_step,
            "prompts_per_call": prompts_per_call,
            "weighting": weighting,
            # |static - hooks|^2 / |plain - hooks|^2 of the guided predictions (relative_error), the weighting's
            "loss_initial": round(loss_initial[weighting], 6),
            "loss_final": round(returned[weighting], 6),  # of the map returned
            "loss_fitted": round(loss_final[weighting], 6),
            "kept_initial_map": kept_init,
            "relative_error_initial": {k: round(v, 6) for k, v in loss_initial.items()},
            "relative_error_final": {k: round(v, 6) for k, v in returned.items()},
            "seconds_recording": round(recorded, 2),
            "seconds_search": round(searching, 2),
            "seconds": round(seconds, 2),
        },
    )
    return hooks.act_map(metadata)
