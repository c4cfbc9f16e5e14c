"""Fit time-aware ACT maps along the sampling trajectory the host runs (one pass, no threads).

The paper fits from the first denoising step of a 4-step distilled model and uses that one map at
every step. With the 20-40 step, guided samplers people use, first-step statistics steer nothing and
statistics pooled over all steps break images (docs/protocol.md). Here the host runs its own sampler
(its scheduler, steps, guidance) on a batch laid out in rows:

    [uncond rows (CFG), target-prompt rows, source-prompt rows, (calibrate) plain source rows]
                                                                    all on the SAME latents

and tells the session, before every model call, the call's noise level and which rows are which. At
every hooked module the session pools the source and the target rows of that call, fits the module's
map for this noise level and (``mode="causal"``) transports the source rows at once, before the
forward goes on: module k is fitted on inputs that the maps of modules 1..k-1 already moved, exactly
as the paper's causal estimation, in one pass and without threads. One map per denoising step is kept,
keyed by the step's noise level (``ACTMap.buckets``). With ``calibrate`` the plain source rows (the
same prompts, never transported) tell how far the transport moved the model output; the host scales
the step's maps by ``calibration_gain`` (``TrajectoryFit.scale_step``) so lambda = 1 moves the output as
far as the target prompt does.

Which latents the rows share is the host's choice (``trajectory`` in the map's metadata):

* ``"steered"`` (default): the host advances the latents with the guided prediction of the
  *transported source rows*: the trajectory the steered model will take at lambda = 1. Because the
  target rows see the same latents, each map only has to supply what the target prompt would change
  at that state; it never learns to undo a difference between two trajectories (that runs away).
* ``"target"``: the host advances with the target rows (teacher forcing).

When all rows of a step do not fit in one model call, the host runs the target-side rows first and then
the source rows in calls that ``run_together`` (threads meeting at every hooked module): the same maps.
Only source rows a host runs in calls one after the other, unplanned, are transported with the previous
step's maps (``strategy="lagged"``, reported in the map's metadata and warned about).

``mode="at_once"`` (for comparison) never transports during fitting: every map is fitted on the
plain model's activations, and the latents follow the un-steered source rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ._version import __version__
from .applying import transport
from .calibration import CALIBRATIONS, DEFAULT_CALIBRATION
from .concurrency import run_in_threads
from .errors import ACTInputError
from .maps import ACTMap, ModuleMap, model_fingerprint
from .recording import (
    MAX_POSITIONS,
    STATISTICS,
    ForwardHooks,
    pool,
    positions,
    read_output,
    widths_of,
    write_output,
)

Rows = slice | torch.Tensor
T = TypeVar("T")
TRAJECTORIES = ("steered", "target")
TRAJECTORY_MODES = ("causal", "at_once")
# Noise levels closer than this are one level (float noise of a recomputed timestep is ~1e-7; the closest
# distinct levels of a 1000-step schedule are 1e-3 apart).
LEVEL_TOLERANCE = 1e-5
# (module name, source samples, target samples) -> ModuleMap
Estimate = Callable[[str, torch.Tensor, torch.Tensor], ModuleMap]


@dataclass
class TrajectoryStats:
    """What fitting along a trajectory cost and how it ran."""

    model_calls: int = 0
    steps: int = 0
    estimation_seconds: float = 0.0
    strategy: str = "exact"
    concurrent_calls: int = 0  # calls that ran in rendezvous groups (``TrajectoryFit.run_together``)


class _Aborted(Exception):
    """Raised in a rendezvous member when another member failed; the first error is re-raised."""


@dataclass
class _Call:
    """One model call in flight (per thread): its rows, what it recorded, its place in the step."""

    source: Rows | None
    target: Rows | None
    key: tuple[int, int]
    group: _Group | None
    ran: set[str] = field(default_factory=set)
    rows: tuple[int, int] | None = None


@dataclass
class _Group:
    """Calls that run together in threads and meet at every hooked module (``run_together``)."""

    live: int
    error: BaseException | None = None


class TrajectoryFit(ForwardHooks):
    """Hooks and per-step maps of one trajectory fit (see the module docstring).

    >>> with TrajectoryFit(modules, estimate, num_pairs=n) as session:
    ...     for level, t in zip(noise_levels, timesteps):
    ...         with session.call(level, source=slice(2 * n, 3 * n), target=slice(n, 2 * n)):
    ...             prediction = unet(...)          # the source rows come out already transported
    ...         ...                                  # advance the latents with the source rows' guided output
    ...     act_map = session.result(metadata)

    A step is all the calls at one noise level. A module's map for the step is fitted as soon as every
    pair's source and target rows have passed it, and the source rows are transported with it before the
    forward goes on (exact causal). Target rows never need a map, so a host short of memory runs a step as:
    calls holding the target (and uncond / plain) rows first, then the source rows in one call, or in
    several calls that ``run_together`` in threads and meet at every hooked module (one runs at a time, so
    memory holds one call's working set plus the others' paused state). Only where a call's source rows
    must be transported before the step's other source rows can reach a module (calls run one after the
    other) are they transported with the previous step's map (``"lagged"``, reported and warned about). A
    call at a noise level fitted before (e.g. Heun's second evaluation) is steered with that level's maps
    and not recorded.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        estimate: Estimate,
        *,
        num_pairs: int,
        mode: str = "causal",
        statistic: str = "mean",
        calibration: str = DEFAULT_CALIBRATION,
    ):
        if not modules:
            raise ACTInputError(
                "No modules selected to fit: the module selection matched nothing. Check the patterns."
            )
        if mode not in TRAJECTORY_MODES:
            raise ACTInputError(f"mode must be one of {TRAJECTORY_MODES}, got {mode!r}.")
        if num_pairs < 2:
            raise ACTInputError(f"Trajectory fitting needs at least 2 prompt pairs, got {num_pairs}.")
        if statistic not in STATISTICS:
            raise ACTInputError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
        if calibration not in CALIBRATIONS:
            raise ACTInputError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}.")
        self.calibration = calibration
        self.summarise = pool if statistic == "mean" else positions
        self.modules = dict(modules)
        self.estimate = estimate
        self.mode = mode
        self.num_pairs = num_pairs
        self.stats = TrajectoryStats()
        self.levels: list[float] = []
        self.gains: dict[int, float] = {}
        # per fitted step: the cosine between the transported and the target rows' moves of the output
        self.alignments: dict[int, float] = {}
        self.order: list[str] = []
        self.maps: dict[str, list[ModuleMap]] = {}
        # module -> (source, target) samples of the open step, each with its call's key (pair order)
        self._samples: dict[str, tuple[list, list]] = {}
        self._counts: dict[str, list[int]] = {}  # module -> [source rows, target rows] seen this step
        self._level: float | None = None
        self._seen = {"source": 0, "target": 0}
        self._replay: int | None = None  # bucket index of a call at an already fitted level
        self._last_level: float | None = None
        self._local = threading.local()
        # The baton: a rendezvous member holds it while it runs and lets go only while it waits at a module.
        self._cond = threading.Condition(threading.RLock())
        self._waiting: dict[int, str] = {}  # waiting thread -> module
        self._epoch = 0  # bumped when every live member waits and none can complete a module (a stall)
        self._calls = 0
        self._strategies: set[str] = set()

    # ------------------------------------------------------------------------------------ host API
    @contextlib.contextmanager
    def call(self, level: float, *, source: Rows | None, target: Rows | None) -> Iterator[None]:
        """One model call at noise level ``level`` (in [0, 1], 1 = pure noise) with these rows.

        ``source`` / ``target`` select the rows of each prompt set in the call's batch; a call that holds
        only one of the two (a split step) passes None for the other.
        """
        if getattr(self._local, "call", None) is not None:
            raise ACTInputError("TrajectoryFit.call() cannot be nested.")
        level = float(level)
        if not 0.0 <= level <= 1.0:
            raise ACTInputError(f"Noise levels are in [0, 1] (1 = pure noise), got {level}.")
        with self._cond:
            level = self._open(level)
            member = getattr(self._local, "member", None)  # set in a ``run_together`` thread
            if member is None:
                self._calls += 1
                key, group = (self._calls, 0), None
            else:
                key, group = member
            context = _Call(source, target, key, group)
            self._local.call = context
            self._last_level = level
        try:
            yield
        finally:
            with self._cond:
                self._local.call = None
                self.stats.model_calls += 1
                if group is not None:
                    self.stats.concurrent_calls += 1
        with self._cond:
            self._count_rows(level, context)

    def run_together(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run ``calls`` each in a thread, their model calls (``call``, inside them) meeting at every hooked
        module: a module's map is fitted once every source row of the step has reached it, so calls that
        hold parts of a step's source rows give the maps of one call holding them all.

        One runs at a time (the others wait at a module), so memory holds one call's working set and the
        others' paused activations. Returns the results in order; a failure in one stops all and is
        re-raised here. A single call runs in the calling thread.
        """
        if len(calls) == 1:
            return [calls[0]()]
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        group = _Group(live=len(calls))
        with self._cond:
            self._calls += 1
            first = self._calls
        results: list[Any] = [None] * len(calls)

        def member(slot: int, run: Callable[[], T]) -> None:
            try:
                # grad mode is per thread: the caller's, never more (torch.inference_mode(False) turns grad ON)
                mode = torch.inference_mode() if inference else contextlib.nullcontext()
                with self._cond, torch.set_grad_enabled(grad), mode:
                    if group.error is not None:
                        raise _Aborted
                    self._local.member = ((first, slot), group)
                    results[slot] = run()
            except _Aborted:
                pass
            except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread below
                self._fail(group, error)
            finally:
                self._local.member = None
                with self._cond:
                    group.live -= 1
                    self._check_stall(group)

        run_in_threads(
            [functools.partial(member, slot, run) for slot, run in enumerate(calls)],
            name="act-fit-call",
            stop=lambda error: self._fail(group, error),  # e.g. KeyboardInterrupt here: stop the members too
        )
        if group.error is not None:
            raise group.error
        return results

    @property
    def current_level(self) -> float | None:
        """The noise level of the latest call (None before the first)."""
        return self._last_level

    @property
    def replayed(self) -> bool:
        """True when the latest call was at an already fitted noise level (steered, not recorded)."""
        return self._replay is not None

    def record_alignment(self, level: float, alignment: float) -> None:
        """Keep how well the step's transport points where the target prompt moves the output (a cosine)."""
        self.alignments[self.levels.index(self._known_level(float(level)))] = float(alignment)

    def scale_step(self, level: float, gain: float) -> None:
        """Scale the maps of the step at ``level`` by ``gain`` (omega -> 1 + gain (omega - 1), beta -> gain beta).

        Hosts calibrate a step with it so that the transported source rows' model output matches the target
        rows' (``act_core.sampling.source_prediction``, once per noise level).
        """
        self._close_step()
        index = self.levels.index(self._known_level(float(level)))
        for maps in self.maps.values():
            m = maps[index]
            # the same kind of map (an estimator's device map stays on the device: no copy to the host)
            maps[index] = dataclasses.replace(m, omega=1.0 + gain * (m.omega - 1.0), beta=gain * m.beta)
        self.gains[index] = float(gain)

    def result(self, metadata: Mapping[str, Any] | None = None) -> ACTMap:
        """The time-aware map: one bucket per fitted step, keyed by the steps' noise levels."""
        self._close_step()
        if not self.levels:
            raise ACTInputError("No denoising step was fitted; run at least one model call.")
        fitted = {name: self.maps[name] for name in self.order if name in self.maps}
        if not fitted:
            raise ACTInputError(
                "None of the selected modules ran during fitting; check that the host runs the hooked model."
            )
        modules = {}
        for name, per_step in fitted.items():
            if len(per_step) != len(self.levels):
                raise ACTInputError(
                    f"Module {name!r} was fitted at {len(per_step)} of {len(self.levels)} noise levels; every "
                    "hooked module must run at every step."
                )
            modules[name] = ModuleMap(
                *(torch.stack([getattr(m, f) for m in per_step]) for f in ("omega", "beta", "low", "high")),
                apply_mode=per_step[0].apply_mode,
            )
        strategy = "lagged" if "lagged" in self._strategies else "exact"
        self.stats.strategy = strategy
        info = {
            "mode": self.mode,
            "statistic": "per-sample mean"
            if self.summarise is pool
            else f"every position (at most {MAX_POSITIONS})",
            "causal_strategy": strategy if self.mode == "causal" else None,
            "model_fingerprint": model_fingerprint(widths_of(self.modules)),
            "act_version": __version__,
        }
        info.update(metadata or {})
        return ACTMap(modules, info, tuple(self.levels))

    # ------------------------------------------------------------------------------------ hooks
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            call: _Call | None = getattr(self._local, "call", None)
            if call is None:
                return None  # a forward that is not part of this fit
            x = read_output(self.modules[name], output)
            if x is None:
                raise ACTInputError(
                    f"Module {name!r} returned {type(output).__name__}, not a tensor; it cannot be hooked."
                )
            if name in call.ran:
                raise ACTInputError(
                    f"Module {name!r} ran more than once in one model call; trajectory fitting needs each "
                    "hooked module to run once per call (pick other modules)."
                )
            call.ran.add(name)
            source = x[call.source] if call.source is not None else x[:0]
            target = x[call.target] if call.target is not None else x[:0]
            if self._replay is not None:
                module_map = self._map_at(name, self._replay)
            else:
                module_map = self._record(name, call, source, target)
            if module_map is None or self.mode == "at_once" or call.source is None:
                return None
            y = x.clone()
            y[call.source] = transport(source, module_map, 1.0)
            return write_output(self.modules[name], output, y)

        return hook

    def _record(self, name: str, call: _Call, source: torch.Tensor, target: torch.Tensor) -> ModuleMap | None:
        """Pool this call's rows; the step's map once every pair reached this module (waiting for the other
        members of a rendezvous group), else the previous step's map (lagged)."""
        pooled = (
            self.summarise(source) if source.shape[0] else None,
            self.summarise(target) if target.shape[0] else None,
        )
        with self._cond:
            if call.rows is None:
                call.rows = (source.shape[0], target.shape[0])
            if name not in self.order:
                self.order.append(name)
            samples = self._samples.setdefault(name, ([], []))
            counts = self._counts.setdefault(name, [0, 0])
            for side, part in enumerate(pooled):
                if part is not None:
                    samples[side].append((call.key, part))
                    counts[side] += (source, target)[side].shape[0]
            if self.mode == "at_once" or call.source is None:
                return None  # nothing of this call is transported: no need to wait
            released = False
            while True:
                if self._fitted_now(name):
                    return self.maps[name][-1]
                if self._counts[name] == [self.num_pairs, self.num_pairs]:
                    module_map = self._fit(name)
                    self._waiting = {t: at for t, at in self._waiting.items() if at != name}
                    self._cond.notify_all()
                    return module_map
                if call.group is None or released:
                    self._strategies.add("lagged")
                    return self._map_at(name, len(self.levels) - 2)  # the previous step's (none at the first)
                released = self._wait(name, call.group)

    def _wait(self, name: str, group: _Group) -> bool:
        """Wait (letting another member run) until ``name`` is fitted; True when released by a stall."""
        epoch, me = self._epoch, threading.get_ident()
        self._waiting[me] = name
        self._check_stall(group)
        while (
            not self._fitted_now(name)
            and self._counts[name] != [self.num_pairs, self.num_pairs]
            and epoch == self._epoch
            and group.error is None
        ):
            self._cond.wait()
        self._waiting.pop(me, None)
        if group.error is not None:
            raise _Aborted
        return epoch != self._epoch

    def _check_stall(self, group: _Group) -> None:
        """Every live member waits and none can bring the rows a module lacks (a member split its rows over
        calls of its own): release them all, to go on with the previous step's maps (lagged)."""
        if group.live > 0 and len(self._waiting) >= group.live and group.error is None:
            self._epoch += 1
            self._waiting.clear()
            self._cond.notify_all()

    def _fail(self, group: _Group, error: BaseException) -> None:
        with self._cond:
            if group.error is None:
                group.error = error
            self._cond.notify_all()

    def _fitted_now(self, name: str) -> bool:
        return len(self.maps.get(name, ())) == len(self.levels)

    def _open(self, level: float) -> float:
        """The known level equal to ``level``; a new level opens a step (closing the previous one)."""
        level = self._known_level(level)
        if level != self._level:
            self._close_step()
            self._replay = self.levels.index(level) if level in self.levels else None
            if self._replay is None:
                self._level, self._seen, self._counts = level, {"source": 0, "target": 0}, {}
                self.levels.append(level)
            else:
                self._level = None  # replayed calls never open a step
        return level

    def _count_rows(self, level: float, call: _Call) -> None:
        if self._replay is not None or call.rows is None:
            return
        for side, count in zip(("source", "target"), call.rows, strict=True):
            self._seen[side] += count
            if self._seen[side] > self.num_pairs:
                raise ACTInputError(
                    f"Noise level {level} saw {self._seen[side]} {side} rows, more than num_pairs="
                    f"{self.num_pairs}; each prompt pair must run once per step."
                )
        if self._seen["source"] == self._seen["target"] == self.num_pairs:
            self._close_step()

    def _known_level(self, level: float) -> float:
        """A fitted level equal to ``level`` up to float noise (a scheduler that computes one timestep twice
        may give 666.0 and 666.0001), else ``level`` itself: one noise level, one map."""
        for known in self.levels:
            if abs(known - level) <= LEVEL_TOLERANCE:
                return known
        return level

    def _map_at(self, name: str, index: int) -> ModuleMap | None:
        maps = self.maps.get(name)
        return maps[index] if maps and 0 <= index < len(maps) else None

    def _fit(self, name: str) -> ModuleMap:
        start = time.perf_counter()
        sources, targets = self._samples.pop(name)
        ordered = [
            torch.cat([part for _, part in sorted(side, key=lambda item: item[0])])
            for side in (sources, targets)
        ]
        module_map = self.estimate(name, *ordered)
        self.maps.setdefault(name, []).append(module_map)
        self.stats.estimation_seconds += time.perf_counter() - start
        return module_map

    def _close_step(self) -> None:
        """Fit what a split step left unfitted, and check that every module has this step's map."""
        with self._cond:
            if self._level is None:
                return
            level, self._level = self._level, None
            if set(self._seen.values()) - {0, self.num_pairs} or len(set(self._seen.values())) > 1:
                raise ACTInputError(
                    f"Noise level {level} saw {self._seen['source']} source and {self._seen['target']} target "
                    f"rows of {self.num_pairs} prompt pairs; every pair must run at every step."
                )
            for name in [n for n in self.order if n in self._samples]:
                self._fit(name)
            missing = [n for n in self.order if len(self.maps.get(n, [])) != len(self.levels)]
            if missing:
                raise ACTInputError(
                    f"Module {missing[0]!r} did not run at noise level {level}; every hooked module must run at "
                    "every step."
                )
            self.stats.steps += 1
