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

When all rows of a step do not fit in one model call, the host splits them over several calls:
maps are then fitted once a step's calls are all done, and during the step the source rows are
transported with the previous step's maps (``strategy="lagged"``, bounded memory, close to exact
when maps change slowly between steps; reported in the map's metadata and warned about).

``mode="at_once"`` (for comparison) never transports during fitting: every map is fitted on the
plain model's activations, and the latents follow the un-steered source rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .applying import transport
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
TRAJECTORIES = ("steered", "target")
CALIBRATION_RANGE = (0.5, 3.0)
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


class TrajectoryFit(ForwardHooks):
    """Hooks and per-step maps of one trajectory fit (see the module docstring).

    >>> with TrajectoryFit(modules, estimate, num_pairs=n) as session:
    ...     for level, t in zip(noise_levels, timesteps):
    ...         with session.call(level, source=slice(2 * n, 3 * n), target=slice(n, 2 * n)):
    ...             prediction = unet(...)          # the source rows come out already transported
    ...         ...                                  # advance the latents with the source rows' guided output
    ...     act_map = session.result(metadata)

    A step is all the calls at one noise level. When its first call holds all ``num_pairs`` source and
    target rows, every module is fitted inside that call (exact causal). When the host splits the
    rows over several calls (memory), the step's maps are fitted once all pairs were seen, and the
    source rows are transported with the previous step's maps meanwhile (``"lagged"``). A call at a
    noise level that was fitted before (e.g. Heun's second evaluation) is steered with that level's
    maps and not recorded.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        estimate: Estimate,
        *,
        num_pairs: int,
        mode: str = "causal",
        statistic: str = "mean",
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
        self.summarise = pool if statistic == "mean" else positions
        self.modules = dict(modules)
        self.estimate = estimate
        self.mode = mode
        self.num_pairs = num_pairs
        self.stats = TrajectoryStats()
        self.levels: list[float] = []
        self.gains: dict[int, float] = {}
        self.order: list[str] = []
        self.maps: dict[str, list[ModuleMap]] = {}
        self._samples: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._level: float | None = None
        self._seen = {"source": 0, "target": 0}
        self._exact = False
        self._replay: int | None = None  # bucket index of a call at an already fitted level
        self._last_level: float | None = None
        self._call: tuple[Rows | None, Rows | None] | None = None
        self._call_rows: tuple[int, int] | None = None
        self._ran: set[str] = set()
        self._strategies: set[str] = set()

    # ------------------------------------------------------------------------------------ host API
    @contextlib.contextmanager
    def call(self, level: float, *, source: Rows | None, target: Rows | None) -> Iterator[None]:
        """One model call at noise level ``level`` (in [0, 1], 1 = pure noise) with these rows.

        ``source`` / ``target`` select the rows of each prompt set in the call's batch; a host whose
        calls carry only one of the two (memory splits) passes None for the other.
        """
        if self._call is not None:
            raise ACTInputError("TrajectoryFit.call() cannot be nested.")
        level = float(level)
        if not 0.0 <= level <= 1.0:
            raise ACTInputError(f"Noise levels are in [0, 1] (1 = pure noise), got {level}.")
        level = self._known_level(level)
        if level != self._level:
            self._close_step()
            self._replay = self.levels.index(level) if level in self.levels else None
            if self._replay is None:
                self._level, self._seen, self._exact = level, {"source": 0, "target": 0}, False
                self.levels.append(level)
            else:
                self._level = None  # replayed calls never open a step
        self._call, self._call_rows, self._ran = (source, target), None, set()
        self._last_level = level
        try:
            yield
        finally:
            self._call = None
            self.stats.model_calls += 1
        if self._replay is None and self._call_rows is not None:
            for side, count in zip(("source", "target"), self._call_rows, strict=True):
                self._seen[side] += count
                if self._seen[side] > self.num_pairs:
                    raise ACTInputError(
                        f"Noise level {level} saw {self._seen[side]} {side} rows, more than num_pairs="
                        f"{self.num_pairs}; each prompt pair must run once per step."
                    )
            if self._seen["source"] == self._seen["target"] == self.num_pairs:
                self._close_step()

    @property
    def current_level(self) -> float | None:
        """The noise level of the latest call (None before the first)."""
        return self._last_level

    @property
    def replayed(self) -> bool:
        """True when the latest call was at an already fitted noise level (steered, not recorded)."""
        return self._replay is not None

    def scale_step(self, level: float, gain: float) -> None:
        """Scale the maps of the step at ``level`` by ``gain`` (omega -> 1 + gain (omega - 1), beta -> gain beta).

        Hosts calibrate a step with it so that the transported source rows' model output matches the target
        rows' (``act_core.sampling.source_prediction``, once per noise level).
        """
        self._close_step()
        index = self.levels.index(self._known_level(float(level)))
        for maps in self.maps.values():
            m = maps[index]
            maps[index] = ModuleMap(1.0 + gain * (m.omega - 1.0), gain * m.beta, m.low, m.high, m.apply_mode)
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
        strategy = "exact" if self._strategies <= {"exact"} else "lagged"
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
            call = self._call
            if call is None:
                return None  # a forward that is not part of this fit
            x = read_output(self.modules[name], output)
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
            source_rows, target_rows = call
            source = x[source_rows] if source_rows is not None else x[:0]
            target = x[target_rows] if target_rows is not None else x[:0]
            if self._replay is not None:
                module_map = self._map_at(name, self._replay)
            else:
                module_map = self._record(name, source, target)
            if module_map is None or self.mode == "at_once" or source_rows is None:
                return None
            y = x.clone()
            y[source_rows] = transport(source, module_map, 1.0)
            return write_output(self.modules[name], output, y)

        return hook

    def _record(self, name: str, source: torch.Tensor, target: torch.Tensor) -> ModuleMap | None:
        """Pool this call's rows; fit now when the call holds the whole step (exact), else lag."""
        if self._call_rows is None:
            self._call_rows = (source.shape[0], target.shape[0])
            if self._seen["source"] == self._seen["target"] == 0:
                self._exact = source.shape[0] == target.shape[0] == self.num_pairs
                self._strategies.add("exact" if self._exact else "lagged")
        if name not in self.order:
            self.order.append(name)
        sources, targets = self._samples.setdefault(name, ([], []))
        if source.shape[0]:
            sources.append(self.summarise(source))
        if target.shape[0]:
            targets.append(self.summarise(target))
        if self._exact:
            return self._fit(name)
        return self._map_at(name, len(self.levels) - 2)  # the previous step's map (none at the first)

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
        module_map = self.estimate(name, torch.cat(sources), torch.cat(targets))
        self.maps.setdefault(name, []).append(module_map)
        self.stats.estimation_seconds += time.perf_counter() - start
        return module_map

    def _close_step(self) -> None:
        """Fit what a split step recorded, and check that every module has this step's map."""
        if self._level is None:
            return
        level, self._level = self._level, None
        if set(self._seen.values()) - {0, self.num_pairs} or len(set(self._seen.values())) > 1:
            raise ACTInputError(
                f"Noise level {level} saw {self._seen['source']} source and {self._seen['target']} target rows of "
                f"{self.num_pairs} prompt pairs; every pair must run at every step."
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


def calibration_gain(target: torch.Tensor, transported: torch.Tensor, plain: torch.Tensor) -> float:
    """The gain g that makes ``plain + g * (transported - plain)`` best match ``target`` (least squares).

    Per-unit transport of each layer's statistics reproduces only part of what the target prompt changes
    in the model's output (a per-channel affine map cannot carry everything a prompt does), and guidance
    multiplies what is missing. Calibrating every step's maps on the model output itself makes lambda = 1
    mean "the prediction moves as far as the target prompt moves it". Clamped to [0.5, 3].
    """
    moved = transported.double() - plain.double()
    wanted = target.double() - plain.double()
    norm = float((moved * moved).sum())
    if norm <= 0.0:
        return 1.0
    return min(CALIBRATION_RANGE[1], max(CALIBRATION_RANGE[0], float((wanted * moved).sum()) / norm))
