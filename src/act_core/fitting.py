"""Fit an ACT map by running a host model on source and target batches.

The host passes ``run_model(batch)``, a callable that runs its model on one batch (whatever a batch is
for that host: a list of prompts, a dict of tensors), and the named modules to hook. Two modes:

* ``at_once``: one pass over every batch; every module is fitted from the plain model's activations.
* ``causal`` (the paper's default): modules are fitted in execution order, and module k's source samples
  are recorded with the maps of modules 1..k-1 already applied at lambda = 1.

The reference implementation does causal fitting with one truncated pass per module (about K/2 full
passes for K modules). Here the ``lockstep`` strategy makes it exact at the cost of ONE pass: every
batch runs in its own thread, and each hooked module is a rendezvous; when every batch has recorded
its sample there, the module is fitted and all batches continue with the map applied. The price is
memory: every batch's forward is alive at once, like one big batch. When that is too much
(``max_lockstep_batches``), or modules run several times per call, the ``groupwise`` strategy fits
consecutive groups of modules with one (truncated) pass per group: exact between groups, at-once
within a group; with one module per group it is the reference algorithm.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .applying import transport
from .concurrency import run_in_threads
from .errors import ACTError, ACTInputError
from .estimators import DEFAULT_SHRINKAGE, MAX_OMEGA, ModuleEstimator, on_host
from .maps import APPLY_SPATIAL_MEAN, ACTMap, ModuleMap, model_fingerprint
from .progress import Report
from .recording import ForwardHooks, pool, read_output, widths_of, write_output

SOURCE, TARGET = "source", "target"
MODES = ("causal", "at_once")
CAUSAL_STRATEGIES = ("auto", "lockstep", "groupwise")
POOLING = "mean over real tokens (B,T,D); mean over spatial axes (B,C,H,W); identity (B,D)"


class _StopForward(BaseException):
    """Raised inside a hook to cut a pass short once the modules it needed have run.

    A BaseException, like KeyboardInterrupt: a host's ``except Exception`` around its model call must
    not swallow ACT's own control flow (and turn a real error into a "stuck" rendezvous).
    """


class _Aborted(BaseException):
    """Raised in lockstep threads when another thread failed; the original error is re-raised."""


class _RepeatedModule(ACTError):
    """A module ran twice in one run_model call, which lockstep cannot handle."""


@dataclass
class _BatchContext:
    side: str
    index: int
    slot: int
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class FitStats:
    """What fitting cost: run_model calls, wall time, and how the time split."""

    run_model_calls: int = 0
    forward_seconds: float = 0.0  # wall time of the model passes (lockstep: the whole concurrent pass)
    estimation_seconds: float = 0.0
    strategy: str = ""
    groups: int = 0
    concurrent: bool = False


class _Lockstep:
    """Rendezvous at each hooked module for ``n`` batch threads; the last to arrive fits the module."""

    def __init__(self, n: int, on_complete: Callable[[str], None]):
        self.n = n
        self.on_complete = on_complete
        self.cond = threading.Condition()
        self.arrived: dict[str, int] = defaultdict(int)
        self.completed: set[str] = set()
        self.waiting: dict[int, str] = {}
        self.finished: set[int] = set()
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def arrive(self, name: str, index: int) -> None:
        with self.cond:
            if self.error is not None:
                raise _Aborted
            self.arrived[name] += 1
            last = self.arrived[name] == self.n
            if not last:
                self.waiting[index] = name
                self._check_stuck()
                while name not in self.completed and self.error is None:
                    self.cond.wait(timeout=0.5)
                if self.error is not None:
                    raise _Aborted
                return
        # The last batch to arrive fits the module WITHOUT holding the lock: estimation may take a while,
        # and nothing it calls may wait on another thread while every batch thread is parked here.
        try:
            self.on_complete(name)
        except BaseException as error:
            self.fail(error)
            raise _Aborted from None
        with self.cond:
            self.completed.add(name)
            # Waiters at this module are released now, even before they wake up and run again.
            self.waiting = {slot: at for slot, at in self.waiting.items() if at != name}
            self.cond.notify_all()

    def thread_finished(self, index: int) -> None:
        with self.cond:
            self.finished.add(index)
            self._check_stuck()

    def _check_stuck(self) -> None:
        live = self.n - len(self.finished)
        if live > 0 and len(self.waiting) == live and self.error is None:
            stuck = sorted(set(self.waiting.values()))
            self.error = ACTInputError(
                f"Causal lockstep fitting is stuck at module(s) {stuck[:3]}: not every batch ran the same "
                "hooked modules in the same order. Every batch must run each hooked module once per "
                "run_model call; use causal_strategy='groupwise' or mode='at_once' otherwise."
            )
            self.cond.notify_all()


class _FitSession(ForwardHooks):
    """Hooks, samples and fitted maps of one ``fit`` call."""

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        estimate: Callable[[str, torch.Tensor, torch.Tensor], ModuleMap],
        steer_target: bool,
    ):
        self.modules = dict(modules)
        self.estimate = estimate
        self.steer_target = steer_target
        self.fitted: dict[str, ModuleMap] = {}
        self.order: list[str] = []
        self.record: set[str] = set(modules)
        self.stop_after: str | None = None
        self.lockstep: _Lockstep | None = None
        self.samples: dict[str, dict[tuple[str, int], torch.Tensor]] = defaultdict(dict)
        self.repeated_modules = False
        self.stats = FitStats()
        self._local = threading.local()
        self._order_lock = threading.Lock()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            context: _BatchContext | None = getattr(self._local, "context", None)
            if context is None:
                return None  # a forward that is not part of this fit
            x = read_output(self.modules[name], output)
            if x is None:
                raise ACTInputError(
                    f"Module {name!r} returned {type(output).__name__}, not a tensor; it cannot be hooked."
                )
            context.calls[name] += 1
            if context.calls[name] > 1:
                self.repeated_modules = True
                if self.lockstep is not None:
                    raise _RepeatedModule(f"module {name!r} ran more than once in one run_model call")
            with self._order_lock:
                if name not in self.fitted and name not in self.order:
                    self.order.append(name)
            if name in self.record:
                key = (context.side, context.index)
                sample = pool(x)
                previous = self.samples[name].get(key)
                self.samples[name][key] = sample if previous is None else torch.cat([previous, sample])
            if self.lockstep is not None:
                self.lockstep.arrive(name, context.slot)
            if name == self.stop_after:
                raise _StopForward
            module_map = self.fitted.get(name)
            if module_map is not None and (context.side == SOURCE or self.steer_target):
                return write_output(self.modules[name], output, transport(x, module_map, 1.0))
            return None

        return hook

    def run_batch(
        self, run_model: Callable[[Any], Any], batch: Any, side: str, index: int, slot: int
    ) -> None:
        """Run one batch with this thread's context set; a _StopForward just ends the pass early."""
        self._local.context = _BatchContext(side, index, slot)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                run_model(batch)
        except _StopForward:
            pass
        finally:
            self._local.context = None
            with self._order_lock:
                self.stats.run_model_calls += 1
                if not self.stats.concurrent:  # lockstep measures the wall time of the whole pass
                    self.stats.forward_seconds += time.perf_counter() - start

    def fit_module(self, name: str) -> None:
        """Estimate the map of one module from its recorded samples, then drop the samples."""
        start = time.perf_counter()
        with self._order_lock:
            recorded = self.samples.pop(name, {})
        source = [recorded[key] for key in sorted(recorded) if key[0] == SOURCE]
        target = [recorded[key] for key in sorted(recorded) if key[0] == TARGET]
        if not source or not target:
            raise ACTInputError(
                f"Module {name!r} ran for only one side (source or target); it cannot be fitted."
            )
        source, target = torch.cat(source), torch.cat(target)
        self.fitted[name] = self.estimate(name, source, target)
        self.stats.estimation_seconds += time.perf_counter() - start


Batches = list[tuple[str, int, Any]]


def _run_pass(
    session: _FitSession,
    run_model: Callable[[Any], Any],
    batches: Batches,
    report: Report,
    done: int,
    total: int,
) -> None:
    for slot, (side, index, batch) in enumerate(batches):
        session.run_batch(run_model, batch, side, index, slot)
        report(done + slot + 1, total, f"{side} batch {index + 1}")


def _fit_lockstep(
    session: _FitSession, run_model: Callable[[Any], Any], batches: Batches, report: Report
) -> None:
    """Exact causal fitting in one pass: one thread per batch, a rendezvous at every module.

    Progress is reported from the calling thread (worker threads queue it), so a callback that talks
    to the host's main thread (a UI, an interrupt check) runs where the host expects it.
    """
    total = len(session.modules)
    reports: queue.SimpleQueue[tuple[int, int, str]] = queue.SimpleQueue()

    def complete(name: str) -> None:
        session.fit_module(name)
        reports.put((len(session.fitted), total, f"fitted {name}"))

    lockstep = _Lockstep(len(batches), complete)
    session.lockstep = lockstep
    session.stats.concurrent = True

    def worker(slot: int, side: str, index: int, batch: Any) -> None:
        try:
            session.run_batch(run_model, batch, side, index, slot)
        except _Aborted:
            pass
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread below
            lockstep.fail(error)
        finally:
            lockstep.thread_finished(slot)

    def drain() -> None:
        while True:
            try:
                item = reports.get_nowait()
            except queue.Empty:
                return
            report(*item)

    start = time.perf_counter()
    try:
        run_in_threads(
            [
                functools.partial(worker, slot, side, index, batch)
                for slot, (side, index, batch) in enumerate(batches)
            ],
            name="act-fit",
            stop=lockstep.fail,  # e.g. KeyboardInterrupt in the main thread: stop the workers too
            poll=drain,
        )
    finally:
        session.lockstep = None
        session.stats.forward_seconds = time.perf_counter() - start - session.stats.estimation_seconds
    if lockstep.error is not None:
        raise lockstep.error
    report(total, total, "fitted all modules")


def _fit_groupwise(
    session: _FitSession,
    run_model: Callable[[Any], Any],
    batches: Batches,
    report: Report,
    num_groups: int | None,
) -> None:
    """Causal between groups of consecutive modules, at-once within a group; one pass per group."""
    session.record = set(session.modules)
    _run_pass(session, run_model, batches, report, 0, len(batches))
    order = list(session.order)
    if not order:
        return
    count = max(1, min(num_groups or 16, len(order)))
    bounds = [round(i * len(order) / count) for i in range(count + 1)]
    groups = [order[bounds[i] : bounds[i + 1]] for i in range(count)]
    session.stats.groups = count
    for name in groups[0]:
        session.fit_module(name)
    session.samples.clear()
    truncate = not session.repeated_modules
    total = len(batches) * count
    for number, group in enumerate(groups[1:], start=1):
        session.record = set(group)
        session.stop_after = group[-1] if truncate else None
        _run_pass(session, run_model, batches, report, number * len(batches), total)
        for name in group:
            session.fit_module(name)
    session.record, session.stop_after = set(), None


def fit_with_stats(
    run_model: Callable[[Any], Any],
    source_batches: Sequence[Any],
    target_batches: Sequence[Any],
    modules: Mapping[str, nn.Module],
    *,
    method: str = "linear",
    support: str | None = None,
    mode: str = "causal",
    apply_mode: str = APPLY_SPATIAL_MEAN,
    causal_strategy: str = "auto",
    max_lockstep_batches: int = 64,
    num_groups: int | None = None,
    steer_target: bool = False,
    max_imbalance: float = 4.0,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_omega: float = MAX_OMEGA,
    progress: Report | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[ACTMap, FitStats]:
    """``fit``, also returning what it cost (run_model calls, forward and estimation seconds)."""

    def new_estimator() -> ModuleEstimator:
        return ModuleEstimator(
            method, support, apply_mode, max_imbalance=max_imbalance, shrinkage=shrinkage, max_omega=max_omega
        )

    estimate = new_estimator()
    if mode not in MODES:
        raise ACTInputError(f"mode must be one of {MODES}, got {mode!r}.")
    if causal_strategy not in CAUSAL_STRATEGIES:
        raise ACTInputError(f"causal_strategy must be one of {CAUSAL_STRATEGIES}, got {causal_strategy!r}.")
    for side, side_batches in ((SOURCE, source_batches), (TARGET, target_batches)):
        if len(side_batches) == 0:
            raise ACTInputError(
                f"The {side} set is empty: give at least 2 {side} prompts (the paper uses hundreds)."
            )
    if not modules:
        raise ACTInputError(
            "No modules selected to fit: the module selection matched nothing. Check the patterns."
        )

    batches: Batches = [(SOURCE, i, b) for i, b in enumerate(source_batches)]
    batches += [(TARGET, i, b) for i, b in enumerate(target_batches)]
    report = progress or (lambda done, total, description: None)
    strategy = "at_once" if mode == "at_once" else causal_strategy
    if strategy == "auto" and len(batches) > max_lockstep_batches:
        warnings.warn(
            f"Causal fitting uses the group-wise strategy: {len(batches)} batches exceed "
            f"max_lockstep_batches={max_lockstep_batches} (lockstep keeps every batch's forward in memory "
            "at once). Raise it if memory allows, for exact causal fitting in one pass.",
            stacklevel=3,
        )
        strategy = "groupwise"

    session = _FitSession(modules, estimate, steer_target)
    if strategy in ("auto", "lockstep"):
        try:
            with session:
                _fit_lockstep(session, run_model, batches, report)
            strategy = "lockstep"
        except _RepeatedModule as error:
            if causal_strategy == "lockstep":
                raise ACTInputError(
                    f"Lockstep causal fitting needs each module to run once per run_model call, but {error}. "
                    "Use causal_strategy='groupwise' (e.g. for statistics over several denoising steps)."
                ) from None
            warnings.warn(f"Causal fitting falls back to the group-wise strategy: {error}.", stacklevel=3)
            estimate = new_estimator()
            session = _FitSession(modules, estimate, steer_target)
            strategy = "groupwise"
    if strategy == "groupwise":
        with session:
            _fit_groupwise(session, run_model, batches, report, num_groups)
    elif strategy == "at_once":
        with session:
            _run_pass(session, run_model, batches, report, 0, len(batches))
            for name in list(session.order):
                session.fit_module(name)
    session.stats.strategy = strategy

    if not session.fitted:
        raise ACTInputError(
            "None of the selected modules ran during fitting; check that run_model runs the hooked model."
        )
    fitted = {name: session.fitted[name] for name in session.order if name in session.fitted}
    estimate.check_not_identical(len(fitted))  # reads the estimates' deferred checks (NaN or Inf raises)
    info = {
        **estimate.metadata(),
        "mode": mode,
        "causal_strategy": strategy if mode == "causal" else None,
        "groups": session.stats.groups or None,
        "pooling": POOLING,
        "steer_target": steer_target,
        "num_source": (estimate.sample_counts or (None, None))[0],
        "num_target": (estimate.sample_counts or (None, None))[1],
        "model_fingerprint": model_fingerprint(widths_of(modules)),
        "act_version": __version__,
    }
    info.update(metadata or {})
    # the maps stayed on the activations' device while fitting; the result is on CPU (what maps are saved as)
    return ACTMap({name: on_host(module_map) for name, module_map in fitted.items()}, info), session.stats


def fit(
    run_model: Callable[[Any], Any],
    source_batches: Sequence[Any],
    target_batches: Sequence[Any],
    modules: Mapping[str, nn.Module],
    **options: Any,
) -> ACTMap:
    """Fit an ACT map for ``modules`` from source and target batches.

    Args:
        run_model: runs the host model on one batch. In lockstep mode it is called from worker threads,
            so thread-local state (autocast, grad mode) must be set inside it.
        source_batches / target_batches: batches of the two prompt sets (p and q in the paper).
        modules: canonical name -> module; only modules that actually run get a map.
        method: "linear" (Linear-AcT, default), "mean" (Mean-AcT) or "gaussian" (Gaussian-OT).
        support: "range" (source [min, max]), "unbounded" or "qLO-HI"; default per method.
        mode: "causal" (default) or "at_once".
        apply_mode: for 4-D outputs, "spatial_mean" (reference, default) or "per_element" (foldable).
        causal_strategy: "lockstep" (exact, one pass, all batches in memory at once), "groupwise"
            (one truncated pass per group of modules), or "auto" (lockstep when there are at most
            ``max_lockstep_batches`` batches and modules run once per call, else groupwise, with a warning).
        num_groups: groups for the groupwise strategy (default: min(16, number of modules)).
        steer_target: also apply earlier maps to target batches while fitting (the reference does; by
            default target statistics come from the plain model: the distribution to reach).
        max_imbalance: refuse sample counts more unequal than this ratio (quantile matching handles
            mild imbalance; a large one usually means a mistake in the prompt lists).
        shrinkage / max_omega: the Linear-AcT omega guard (``estimators.robust_linear_act``): pseudo-samples
            that pull omega toward 1 where a unit barely varies, and a cap; ``shrinkage=0`` and a huge
            ``max_omega`` give the paper's plain estimator.
        progress: ``progress(done, total, description)``; raise from it to interrupt fitting.
        metadata: extra JSON-able provenance stored in the map (prompt digests, model name, preset).
    """
    act_map, _ = fit_with_stats(run_model, source_batches, target_batches, modules, **options)
    return act_map
