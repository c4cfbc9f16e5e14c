"""A static map that folds, fitted end to end against a time-aware map's hooks (issue 22): the fold workflow,
written once for every host (the diffusers pipeline, ComfyUI's Fold node).

The default map is time-aware (one (omega, beta) per noise level) and its hooks steer the cond rows of a CFG
batch only; weights (``fuse_act``, LoRA files, ComfyUI weight patches) are static and act on every row.
``fold_map`` fits one per-channel (omega, beta) per hooked module, applied to **every** row at every step, so
that the denoiser's *guided* prediction with it matches the guided prediction of the time-aware map's hooks
(LinEAS-style: one least-squares fit over all modules jointly, through the frozen denoiser):

1. **States.** The host generates the source prompts with its own sampler and the time-aware map applied
   as it applies maps (its cond rows, at ``strength``), and records every denoiser call: its inputs, which
   rows are each prompt's cond and uncond predictions, the guidance scale, and the guided prediction of its
   output, the teacher's target (``FoldHost.record``).
2. **Reference.** The same calls are run on the plain model, so the loss reads as a share of the teacher's
   own move: ``|student - teacher|^2 / |plain - teacher|^2`` (1 = the plain model, 0 = the hooks exactly),
   per noise level by default (the teacher moves the prediction some 70 times further at the last step than
   at the first, so a pooled squared error would leave the structure-forming steps unfitted).
3. **Fit.** From an initial static map (``collapse_map`` of the time-aware one: omega and beta averaged over
   the noise levels, scaled around the identity by the gain of ``INIT_GAINS`` with the lowest loss; moving
   both CFG halves by a delta moves the guided output by about the delta, moving the cond half by about
   guidance x the delta), Adam on omega and beta only (the denoiser's weights frozen), on minibatches of
   recorded calls and prompts. Optionally (``rounds``) the static map's own generations add their states,
   with the teacher's predictions there (DAgger). A fit that ends worse than its start returns the start.

The result is a one-bucket, unbounded, per-element map with ``cfg_rows="all"``: it folds (``fuse_act``,
``act export-lora``, ComfyUI's Export node) and its hooks give the image its fused weights give. Its metadata
(``distilled``) says how it was made and the loss before and after.

A host (``FoldHost``) gives the denoiser and its modules, records its own sampler's calls, and runs a call on
some of its rows; everything else is decided here. The hosts: ``act_core.diffusers.folding`` (pipelines whose
denoiser call holds the CFG batch, or runs without CFG; its ``fold_to_static`` is the entry) and the
ComfyUI node pack's ``nodes/folding.py``. Whether a map folds at all is its family's (``ModelFamily.folds``:
FLUX / SD3 maps do not, their norms have no affine weights).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .applying import apply_act
from .errors import ACTInputError, ACTWarning
from .families import ModelFamily
from .maps import APPLY_PER_ELEMENT, ACTMap, ModuleMap
from .recording import channel_axis, hook_module, read_output, write_output


@dataclass
class DenoiserCall:
    """One recorded denoiser call: its inputs, its noise level, where each prompt's rows are, and the guided
    predictions at it.

    The guided prediction of prompt i is ``out[uncond[i]] + scale (out[cond[i]] - out[uncond[i]])`` of the
    call's raw output ``out`` (``out[cond[i]]`` where the call has no uncond rows).
    """

    args: tuple
    kwargs: dict
    level: float | None
    batch: int  # rows of the call (2 x prompts in a CFG batch)
    cond: torch.Tensor  # (prompts,) the row of each prompt's cond (or only) prediction
    uncond: torch.Tensor | None = None  # (prompts,) the row of each prompt's uncond prediction; None: no CFG
    scale: float = 1.0  # the guidance scale of the combination above
    teacher: torch.Tensor | None = None  # guided prediction with the time-aware map's hooks, (prompts, ...)
    plain: torch.Tensor | None = None  # guided prediction of the plain model
    norm: float = 1.0  # what the squared error of one row is divided by in the loss

    @property
    def prompts(self) -> int:
        return int(self.cond.shape[0])

    def rows(self, prompts: torch.Tensor) -> torch.Tensor:
        """The call's rows of ``prompts`` (both CFG halves), in the call's own order."""
        picked = [self.cond[prompts]] + ([] if self.uncond is None else [self.uncond[prompts]])
        return torch.cat(picked).sort().values

    def guided(self, output: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """The guided prediction, one row per prompt, of ``output``: the call's raw output on all its rows, or
        (``prompts``) on ``rows(prompts)``."""
        output = output.float()
        cond, uncond = self.cond, self.uncond
        if prompts is not None:
            rows = self.rows(prompts)
            cond = torch.searchsorted(rows, cond[prompts])
            uncond = None if uncond is None else torch.searchsorted(rows, uncond[prompts])
        cond_out = output.index_select(0, cond.to(output.device))
        if uncond is None:
            return cond_out
        uncond_out = output.index_select(0, uncond.to(output.device))
        return uncond_out + self.scale * (cond_out - uncond_out)


def cfg_rows(prompts: int, layout: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond rows, uncond rows) of a call on ``prompts`` prompts laid out as ``"all"`` (no CFG batch),
    ``"uncond_first"`` ([uncond; cond]) or ``"cond_first"`` ([cond; uncond])."""
    first, second = torch.arange(prompts), torch.arange(prompts, 2 * prompts)
    if layout == "all":
        return first, None
    return (second, first) if layout == "uncond_first" else (first, second)


class FoldHost(Protocol):
    """A host's adapter to the fold workflow."""

    name: str  # "diffusers", "comfyui"
    family: ModelFamily
    denoiser: nn.Module  # the module every recorded call runs (frozen while fitting)

    def modules(self) -> Mapping[str, nn.Module]:
        """The denoiser's modules under their canonical map names (the map picks among them)."""

    def record(
        self, act_map: ACTMap, strength: float, prompts: Sequence[str], seed: int
    ) -> list[DenoiserCall]:
        """Generate ``prompts`` (prompt i with the noise of seed ``seed + i``) with the host's own sampler and
        ``act_map`` applied at ``strength`` as the host applies maps (its own ``cfg_rows``), recording every
        denoiser call (``recording``) with its rows, noise level, guidance scale and teacher."""

    def run(self, call: DenoiserCall, rows: torch.Tensor | None) -> Any:
        """The denoiser's raw output for ``call`` restricted to ``rows`` (None: all of them), with whatever
        hooks are on its modules (``take_rows``, ``run_call``)."""

    def fitting(self) -> contextlib.AbstractContextManager:
        """Held for the whole fold (grad mode, the host's own state)."""

    def metadata(self) -> dict:
        """The host's part of the folded map's ``distilled`` metadata: ``host`` and ``sampling``."""


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


# ----------------------------------------------------------------------------------- calls
def take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` (a call argument) restricted to ``rows``: tensors (and per-row lists) of ``batch`` rows are
    indexed, everything else (the timestep, sizes, flags) is kept; containers are copied."""
    if isinstance(value, torch.Tensor):
        return (
            value.index_select(0, rows.to(value.device)) if value.ndim and value.shape[0] == batch else value
        )
    if isinstance(value, dict):
        return {key: take_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == batch and all(isinstance(item, torch.Tensor) for item in value):
            return type(value)(value[int(i)] for i in rows)
        return type(value)(take_rows(item, rows, batch) for item in value)
    return value


def denoiser_output(result: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's return value (a tuple, a dataclass with ``sample``, a tensor)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        return result[0]
    return result.sample


def run_call(denoiser: Any, call: DenoiserCall, rows: torch.Tensor | None) -> torch.Tensor:
    """``denoiser`` on the call's inputs (restricted to ``rows``): ``FoldHost.run`` where nothing else is
    needed."""
    args, kwargs = call.args, call.kwargs
    if rows is not None:
        args, kwargs = take_rows(args, rows, call.batch), take_rows(kwargs, rows, call.batch)
    return denoiser_output(denoiser(*args, **kwargs))


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


@contextlib.contextmanager
def recording(
    denoiser: nn.Module, describe: Callable[[tuple, dict], DenoiserCall]
) -> Iterator[list[DenoiserCall]]:
    """Every call of ``denoiser`` in the block, in order: ``describe(args, kwargs)`` (the inputs detached,
    containers copied, the sample cloned, tensors otherwise by reference: samplers pass the same embeddings at
    every step) makes its ``DenoiserCall``, and the guided prediction of its output becomes the teacher."""
    calls: list[DenoiserCall] = []

    def before(module: Any, args: tuple, kwargs: dict) -> None:
        args = _detached(args)
        if args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(), *args[1:])
        calls.append(describe(args, _detached(dict(kwargs))))

    def after(module: Any, args: tuple, kwargs: dict, result: Any) -> None:
        calls[-1].teacher = calls[-1].guided(denoiser_output(result).detach())

    handles = [
        denoiser.register_forward_pre_hook(before, with_kwargs=True),
        denoiser.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


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


def relative_error(host: FoldHost, hooks: _StaticHooks, calls: list[DenoiserCall]) -> dict[str, float]:
    """How far the static map's guided predictions are from the teacher's, as a share of the teacher's own
    move from the plain model (no gradients): ``"pooled"``, ``sum |student - teacher|^2 / sum |plain -
    teacher|^2`` over every state, and ``"per_level"``, that ratio per denoiser call averaged over the calls
    (every noise level counts the same; the teacher moves the prediction far more at the last steps)."""
    num = den = per_level = 0.0
    with torch.no_grad(), hooks.active():
        for call in calls:
            student = call.guided(host.run(call, None))
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


def _plain_outputs(host: FoldHost, calls: list[DenoiserCall]) -> None:
    with torch.no_grad():
        for call in calls:
            call.plain = call.guided(host.run(call, None))


def _own_states(
    host: FoldHost,
    act_map: ACTMap,
    hooks: _StaticHooks,
    strength: float,
    prompts: Sequence[str],
    seed: int,
) -> list[DenoiserCall]:
    """The denoiser calls of the static map's own generation of ``prompts`` (hooked on every row at
    ``strength``), with the teacher's (``act_map`` hooked at ``strength`` on its own rows, at each call's
    noise level) and the plain guided predictions at them (DAgger: the states the static map will meet)."""
    static = hooks.act_map({**act_map.metadata, "cfg_rows": "all"})
    calls = host.record(static, strength, prompts, seed)
    part = host.family.denoiser
    steers_cond = act_map.metadata.get("cfg_rows", "cond") == "cond"
    handle = apply_act(host.modules(), act_map, strength)
    try:
        with torch.no_grad():
            for call in calls:
                handle.set_call([part], rows=call.cond if steers_cond else None, noise_level=call.level)
                call.teacher = call.guided(host.run(call, None))
    finally:
        handle.remove()
    _plain_outputs(host, calls)
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
# Adam steps of a fold (measured on the shipped models: docs/protocol.md, "A slider that folds").
FOLD_STEPS = 200


def check_foldable_teacher(act_map: ACTMap, family: ModelFamily, init: ACTMap | None = None) -> None:
    """Refuse, naming the fix, a map the fold cannot take: two-sided, with modules outside the denoiser, or
    already static (without an ``init``)."""
    if act_map.less is not None:
        raise ACTInputError(
            "This map is two-sided (lambda < 0 steers toward its 'less' prompts), and a static map holds one "
            "side: fold one side (act_map.side('more') or side('less')), or fit a one-sided map (no less prompts)."
        )
    part = family.denoiser
    unknown = [name for name in act_map.modules if not name.startswith(f"{part}.")]
    if unknown:
        raise ACTInputError(
            f"The fold distils the {part}'s modules; this map also has {unknown[:3]} (use "
            f"act_map.restrict(parts=['{part}']), or fit with the default preset)."
        )
    if act_map.buckets is None and init is None:
        raise ACTInputError(
            "This ACT map is already static (one map at every noise level): there is nothing to fold. The fold "
            "takes the time-aware maps of the default preset; a static map exports or fuses as it is when it "
            f"steers every row and element (preset {family.foldable_preset!r})."
        )


def fold_prompts(act_map: ACTMap, source_prompts: Sequence[str] | None = None) -> list[str]:
    """The prompts a fold generates its states from: the ones given, else the ones the map was fitted on (fits
    record them in ``source_prompts``); one rule for every host and front end."""
    if source_prompts is None:
        source_prompts = act_map.metadata.get("source_prompts")
        if not source_prompts:
            raise ACTInputError(
                "This ACT map does not record the prompts it was fitted on (maps fitted before they were recorded, "
                "or made another way, keep only a digest): pass them (source_prompts=, --source PROMPTS.txt, the "
                "Fold node's source prompts)."
            )
    prompts = [str(prompt) for prompt in source_prompts]
    if not prompts or not all(prompt.strip() for prompt in prompts):
        raise ACTInputError(
            "The fold needs source prompts (the map's own, none blank) to generate the states it fits on."
        )
    return prompts


def fold_map(
    host: FoldHost,
    act_map: ACTMap,
    source_prompts: Sequence[str] | None = None,
    *,
    strength: float = 1.0,
    init: ACTMap | None = None,
    init_gain: float | None = None,
    init_max_level: float | None = None,
    steps: int = FOLD_STEPS,
    lr: float = 0.02,
    calls_per_step: int = 2,
    prompts_per_call: int = 8,
    weighting: str = "per_level",
    rounds: int = 1,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> ACTMap:
    """One static, foldable map (one bucket, unbounded, per element, ``cfg_rows="all"``) whose guided
    predictions match those of ``act_map``'s hooks at ``strength`` along the host's own generations of
    ``source_prompts`` (default: the prompts the map was fitted on, ``fold_prompts``; see the module
    docstring).

    ``init``: the starting map (one bucket); default ``collapse_map(act_map, init_gain, init_max_level)``,
    without ``init_gain`` at the gain of ``INIT_GAINS`` with the lowest loss. ``steps`` Adam steps of
    ``calls_per_step`` recorded denoiser calls with ``prompts_per_call`` of their prompts each; Adam's step
    size warms up to ``lr`` over the first tenth of the steps, then follows a cosine to 0. ``weighting``: the
    loss of each state as a share of the teacher's move at its noise level (``"per_level"``: early,
    structure-forming steps count as much as late ones) or the plain squared error of the guided predictions
    (``"pooled"``: dominated by the last steps, where the teacher moves the prediction most). ``rounds`` > 1:
    after each round of ``steps``, the static map generates the prompts itself and its states (with the
    teacher's predictions there) join the fit (DAgger). ``progress(step, steps, loss)`` after every step.
    """
    check_foldable_teacher(act_map, host.family, init)
    if weighting not in WEIGHTINGS:
        raise ACTInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if rounds < 1 or steps < 0:
        raise ACTInputError(f"rounds must be >= 1 and steps >= 0, got {rounds} and {steps}.")
    source_prompts = fold_prompts(act_map, source_prompts)
    if init is not None and (init.buckets is not None or set(init.modules) != set(act_map.modules)):
        raise ACTInputError("init must be a one-bucket map over the same modules as act_map.")
    with host.fitting():
        return _fold(
            host,
            act_map,
            list(source_prompts),
            strength=strength,
            init=init,
            init_gain=init_gain,
            init_max_level=init_max_level,
            steps=steps,
            lr=lr,
            calls_per_step=calls_per_step,
            prompts_per_call=prompts_per_call,
            weighting=weighting,
            rounds=rounds,
            seed=seed,
            progress=progress,
        )


def _fold(
    host: FoldHost,
    act_map: ACTMap,
    source_prompts: list[str],
    *,
    strength: float,
    init: ACTMap | None,
    init_gain: float | None,
    init_max_level: float | None,
    steps: int,
    lr: float,
    calls_per_step: int,
    prompts_per_call: int,
    weighting: str,
    rounds: int,
    seed: int,
    progress: Callable[[int, int, float], None] | None,
) -> ACTMap:
    start = time.perf_counter()
    denoiser = host.denoiser
    modules = host.modules()
    calls = host.record(act_map, strength, source_prompts, seed)  # the teacher: its own cfg_rows
    if not calls:
        raise ACTInputError("The host's generation made no denoiser call to fit on.")
    _plain_outputs(host, calls)
    recorded = time.perf_counter() - start
    device = calls[0].teacher.device
    searched, search_start = None, time.perf_counter()
    if init is None and init_gain is None:
        with _frozen(denoiser):
            searched = {
                gain: relative_error(
                    host, _StaticHooks(modules, collapse_map(act_map, gain, init_max_level), device), calls
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
        loss_initial = relative_error(host, hooks, calls)
        for round_index in range(rounds):
            if round_index:  # the static map's own states, with the teacher's predictions there
                own = _own_states(host, act_map, hooks, strength, source_prompts, seed)
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
                        student = call.guided(host.run(call, call.rows(picked)), picked)
                        target = call.teacher.index_select(0, picked.to(device))
                        loss = (student - target).pow(2).sum() / (call.norm * len(picked) * calls_per_step)
                        loss.backward()
                        total += float(loss.detach())
                optimizer.step()
                schedule.step()
                if progress is not None:
                    progress(round_index * steps + step + 1, rounds * steps, total)
        loss_final = relative_error(host, hooks, calls)
    kept_init = not loss_final[weighting] <= loss_initial[weighting]  # NaN included
    returned = loss_initial if kept_init else loss_final
    if kept_init:  # the fit diverged (too large an lr for this model): the starting map is the better one
        hooks = _StaticHooks(modules, init, device)
        warnings.warn(
            f"The fold ended with a higher loss ({loss_final[weighting]:.3g}) than its starting map "
            f"({loss_initial[weighting]:.3g}); the starting map is returned. Try a smaller lr (now {lr}).",
            ACTWarning,
            stacklevel=3,
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
            **host.metadata(),
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
