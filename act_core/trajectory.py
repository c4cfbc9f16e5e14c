"""Fit time-aware ACT maps along the sampling trajectory the host runs (one pass, no threads).

The paper fits from the first denoising step of a 4-step distilled model and uses that one map at
every step. With the 20-40 step, guided samplers people use, first-step statistics steer nothing and
statistics pooled over all steps break images (docs/protocol.md). Here the host runs its own sampler
(its scheduler, steps, guidance) on a batch laid out in rows:

    [uncond rows (CFG), target-prompt rows, source-prompt rows]      all on the SAME latents

and tells the session, before every model call, the call's noise level and which rows are which. At
every hooked module the session pools the source and the target rows of that call, fits the module's
map for this noise level and (``mode="causal"``) transports the source rows at once, before the
forward goes on: module k is fitted on inputs that the maps of modules 1..k-1 already moved, exactly
as the paper's causal estimation, in one pass and without threads. One map per denoising step is kept,
keyed by the step's noise level (``ACTMap.buckets``).

Which latents the rows share is the host's choice (``trajectory`` in the map's metadata):

* ``"steered"`` (default): the host advances the latents with the guided prediction of the
  *transported source rows*: the trajectory the steered model will take at lambda = 1. Because the
  target rows see the same latents, each map only has to supply what the target prompt would change
  at that state; it never learns to undo a difference between two trajectories (that runs away).
* ``"target"``: the host advances with the target rows (teacher forcing).

When all rows of a step do not fit in one model call, the host splits them (``calls_per_step`` > 1):
maps are then fitted once a step's calls are all done, and during the step the source rows are
transported with the previous step's maps (``strategy="lagged"``, bounded memory, close to exact
when maps change slowly between steps; reported in the map's metadata and warned about).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .applying import transport
from .errors import ACTInputError
from .estimators import Guard
from .maps import ACTMap, ModuleMap, model_fingerprint
from .recording import ForwardHooks, first_tensor, pool, replace_first_tensor, widths_of

Rows = slice | torch.Tensor
TRAJECTORIES = ("steered", "target")
TRAJECTORY_MODES = ("causal", "at_once")
# (module name, source samples, target samples) -> ModuleMap
Estimate = Callable[[str, torch.Tensor, torch.Tensor], ModuleMap]


@dataclass
class TrajectoryStats:
    """What fitting along a trajectory cost and how it ran."""

    model_calls: int = 0
    steps: int = 0
    estimation_seconds: float = 0.0
    strategy: str = "exact"
    guard: Guard | None = None
    identical_modules: list[str] = field(default_factory=list)


@dataclass
class _Call:
    source: Rows
    target: Rows


class TrajectoryFit(ForwardHooks):
    """Hooks and per-step maps of one trajectory fit (see the module docstring).

    >>> with TrajectoryFit(modules, estimate) as session:
    ...     for level in noise_levels:
    ...         with session.step(level):
    ...             with session.call(source=slice(2 * n, 3 * n), target=slice(n, 2 * n)):
    ...                 prediction = unet(...)          # source rows already transported here
    ...     act_map = session.result(metadata)
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        estimate: Estimate,
        *,
        mode: str = "causal",
        calls_per_step: int = 1,
        steer: bool = True,
    ):
        if not modules:
            raise ACTInputError(
                "No modules selected to fit: the module selection matched nothing. Check the patterns."
            )
        if mode not in TRAJECTORY_MODES:
            raise ACTInputError(f"mode must be one of {TRAJECTORY_MODES}, got {mode!r}.")
        if calls_per_step < 1:
            raise ACTInputError(f"calls_per_step must be at least 1, got {calls_per_step}.")
        self.modules = dict(modules)
        self.estimate = estimate
        self.mode = mode
        self.steer = steer
        self.calls_per_step = calls_per_step
        self.stats = TrajectoryStats(strategy="exact" if calls_per_step == 1 else "lagged")
        self.levels: list[float] = []
        self.order: list[str] = []
        self.maps: dict[str, list[ModuleMap]] = {}
        self._samples: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._call: _Call | None = None
        self._ran: set[str] = set()
        self._calls_this_step = 0
        self._in_step = False

    # ------------------------------------------------------------------------------------ host API
    @contextlib.contextmanager
    def step(self, level: float) -> Iterator[None]:
        """One denoising step at noise level ``level`` (in [0, 1]; 1 = pure noise)."""
        if self._in_step:
            raise ACTInputError("TrajectoryFit.step() calls cannot be nested.")
        level = float(level)
        if not 0.0 <= level <= 1.0:
            raise ACTInputError(f"Noise levels are in [0, 1] (1 = pure noise), got {level}.")
        if self.levels and level in self.levels:
            raise ACTInputError(f"Noise level {level} was already fitted; every step needs its own level.")
        self._in_step, self._calls_this_step = True, 0
        self._samples = {}
        self.levels.append(level)
        try:
            yield
            if self._calls_this_step != self.calls_per_step:
                raise ACTInputError(
                    f"Step at noise level {level} ran {self._calls_this_step} model call(s), "
                    f"expected calls_per_step={self.calls_per_step}."
                )
            if self.calls_per_step > 1 or self.mode == "at_once":
                for name in [n for n in self.order if n in self._samples]:
                    self._fit(name)
            self._check_step_complete(level)
            self.stats.steps += 1
        finally:
            self._in_step = False
            self._samples = {}

    @contextlib.contextmanager
    def call(self, *, source: Rows, target: Rows) -> Iterator[None]:
        """One model call inside a step; ``source`` / ``target`` are the rows of the two prompt sets."""
        if not self._in_step:
            raise ACTInputError("TrajectoryFit.call() must run inside step().")
        self._call = _Call(source, target)
        self._ran = set()
        try:
            yield
        finally:
            self._call = None
            self._calls_this_step += 1
            self.stats.model_calls += 1

    def result(self, metadata: Mapping[str, Any] | None = None) -> ACTMap:
        """The time-aware map: one bucket per fitted step, keyed by the steps' noise levels."""
        if not self.levels:
            raise ACTInputError("No denoising step was fitted; run at least one step().")
        fitted = {name: self.maps[name] for name in self.order if name in self.maps}
        if not fitted:
            raise ACTInputError(
                "None of the selected modules ran during fitting; check that the host runs the hooked model."
            )
        modules = {}
        for name, per_step in fitted.items():
            if len(per_step) != len(self.levels):
                raise ACTInputError(
                    f"Module {name!r} ran in {len(per_step)} of {len(self.levels)} steps; every hooked module "
                    "must run at every step."
                )
            modules[name] = ModuleMap(
                torch.stack([m.omega for m in per_step]),
                torch.stack([m.beta for m in per_step]),
                torch.stack([m.low for m in per_step]),
                torch.stack([m.high for m in per_step]),
                apply_mode=per_step[0].apply_mode,
            )
        info = {
            "mode": self.mode,
            "causal_strategy": self.stats.strategy if self.mode == "causal" else None,
            "model_fingerprint": model_fingerprint(widths_of(self.modules)),
            "act_version": __version__,
        }
        info.update(metadata or {})
        return ACTMap(modules, info, tuple(self.levels))

    # ------------------------------------------------------------------------------------ hooks
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            call = self._call
            if call is None:
                return None  # a forward that is not part of this fit
            x = first_tensor(output)
            if x is None:
                raise ACTInputError(
                    f"Module {name!r} returned {type(output).__name__}, not a tensor; it cannot be hooked."
                )
            if name in self._ran:
                raise ACTInputError(
                    f"Module {name!r} ran more than once in one model call; trajectory fitting needs each "
                    "hooked module to run once per call (pick other modules)."
                )
            self._ran.add(name)
            if name not in self.order:
                self.order.append(name)
            sources, targets = self._samples.setdefault(name, ([], []))
            sources.append(pool(x[call.source]))
            targets.append(pool(x[call.target]))
            if self.mode == "causal" and self.calls_per_step == 1:
                module_map = self._fit(name)  # every sample of this step is here: exact causal
            else:
                module_map = self._previous_map(name)
            if module_map is None or not self.steer:
                return None
            y = x.clone()
            y[call.source] = transport(x[call.source], module_map, 1.0)
            return replace_first_tensor(output, y)

        return hook

    def _fit(self, name: str) -> ModuleMap:
        start = time.perf_counter()
        sources, targets = self._samples.pop(name)
        module_map = self.estimate(name, torch.cat(sources), torch.cat(targets))
        self.maps.setdefault(name, []).append(module_map)
        self.stats.estimation_seconds += time.perf_counter() - start
        return module_map

    def _previous_map(self, name: str) -> ModuleMap | None:
        """Lagged and at-once steering: the map of the previous step (none at the first step)."""
        if self.mode == "at_once":
            return None
        maps = self.maps.get(name)
        return maps[-1] if maps else None

    def _check_step_complete(self, level: float) -> None:
        missing = [n for n in self.order if len(self.maps.get(n, [])) != len(self.levels)]
        if missing:
            raise ACTInputError(
                f"Module {missing[0]!r} did not run at noise level {level}; every hooked module must run at "
                "every step."
            )


def warn_if_lagged(stats: TrajectoryStats, why: str) -> None:
    """Say out loud that the bounded-memory fallback ran."""
    if stats.strategy == "lagged":
        warnings.warn(
            f"ACT fitting split every step into several model calls ({why}), so the source rows were "
            "steered with the previous step's maps while each step was recorded (strategy 'lagged': bounded "
            "memory, approximately causal). Raise the batch size limit if memory allows, for exact fitting.",
            stacklevel=3,
        )
