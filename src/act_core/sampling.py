"""The host-neutral half of a trajectory fit: the sampling settings, the row layout of a fitting call, what
advances the latents at a step, and the sampling loop for hosts that run their own scheduler.

Every host samples the prompt pairs on rows ``[uncond (CFG batch only); target; source; plain source
(calibrate only)]`` that share their latents (``CallRows``). What a host gives is only its denoiser call and
its scheduler step (``follow_trajectory``), or, where the host runs its own sampler and batches the rows
itself (ComfyUI), the per-evaluation rule (``source_prediction``). Plain torch: no host is imported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import calibration_alignment, calibration_gain
from .progress import Report
from .trajectory import TrajectoryFit


@dataclass
class SamplingSettings:
    """The settings the user generates with, which fitting follows."""

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None = None
    max_sequence_length: int | None = None  # the prompt length in tokens (T5's, Qwen's...: ModelFamily)
    cfg_batch: bool = True  # False where guidance is embedded (FLUX.1): no uncond rows
    # CFG runs when guidance_scale exceeds this: 1 in the usual convention (uncond + scale (cond - uncond)),
    # 0 where the scale is the excess over the cond prediction (ZImagePipeline: cond + scale (cond - uncond))
    cfg_threshold: float = 1.0

    @property
    def guided(self) -> bool:
        """Whether the sampler runs a CFG batch (uncond rows beside the prompt's)."""
        return self.cfg_batch and self.guidance_scale > self.cfg_threshold

    def as_metadata(self, scheduler: str) -> dict:
        info = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
            "scheduler": scheduler,
        }
        if self.max_sequence_length is not None:
            info["max_sequence_length"] = self.max_sequence_length
        return info


def seeded_noise(shape: tuple[int, ...], seed: int, count: int) -> torch.Tensor:
    """``count`` noise tensors, number i from seed ``(seed + i) mod 2**64`` (independent of batching; the
    wrap is ComfyUI's too)."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed((seed + i) % 2**64))
            for i in range(count)
        ]
    )


def prompt_pairs(source: Sequence[str], target: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pair i is (source i, target i); the shorter list repeats, so every prompt is used."""
    pairs = max(len(source), len(target))
    return [source[i % len(source)] for i in range(pairs)], [target[i % len(target)] for i in range(pairs)]


def call_chunks(num_pairs: int, pairs_per_call: int) -> list[range]:
    """The pairs of each denoiser call of a step."""
    return [
        range(start, min(num_pairs, start + pairs_per_call)) for start in range(0, num_pairs, pairs_per_call)
    ]


@dataclass(frozen=True)
class TrajectoryRun:
    """What a host's sampler needs to run the fitting rows (``FitHost.sample``)."""

    session: TrajectoryFit
    source: list[str]  # prompt pair i is (source[i], target[i])
    target: list[str]
    seed: int
    trajectory: str
    calibrate: bool
    pairs_per_call: int
    progress: Report


ROW_KINDS = ("uncond", "target", "source", "plain")


@dataclass(frozen=True)
class CallRows:
    """Where one fitting call's rows sit: ``[uncond (guided only); target; source; plain source (calibrate
    only)]``, ``k`` pairs each. Every host that lays out its own calls lays them out this way. A split step
    runs calls that hold only some of the kinds (``kinds``): the target-side rows, then the source rows."""

    k: int
    guided: bool
    calibrate: bool
    kinds: tuple[str, ...] = ROW_KINDS

    @property
    def held(self) -> tuple[str, ...]:
        """The kinds of rows this call holds, in batch order."""
        used = {"uncond": self.guided, "target": True, "source": True, "plain": self.calibrate}
        return tuple(kind for kind in ROW_KINDS if used[kind] and kind in self.kinds)

    @property
    def copies(self) -> int:
        """How many rows each pair has in the call."""
        return len(self.held)

    def rows(self, kind: str) -> slice | None:
        """The rows of ``kind`` (None when the call does not hold it)."""
        held = self.held
        if kind not in held:
            return None
        start = held.index(kind) * self.k
        return slice(start, start + self.k)

    @property
    def uncond(self) -> slice | None:
        return self.rows("uncond")

    @property
    def target(self) -> slice | None:
        return self.rows("target")

    @property
    def source(self) -> slice | None:
        return self.rows("source")

    @property
    def plain(self) -> slice | None:
        return self.rows("plain")

    def stack(
        self,
        target: torch.Tensor,
        source: torch.Tensor,
        rows: list[int],
        negative: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One conditioning tensor (embeddings, pooled vectors) for this call's rows, in the layout above."""
        return torch.cat(self.parts(target, source, rows, negative))

    def parts(self, target: Any, source: Any, rows: list[int], negative: Any = None) -> list:
        """This call's rows of each kind it holds, in batch order: ``[negative[rows], target[rows], ...]``
        (tensors), or one entry per row for lists (``entries``)."""
        sides = {"uncond": negative, "target": target, "source": source, "plain": source}
        if isinstance(target, list):
            return [[sides[kind][i] for i in rows] for kind in self.held]
        return [sides[kind][rows] for kind in self.held]

    def entries(self, target: list, source: list, rows: list[int], negative: list | None = None) -> list:
        """One list entry per row of the call, in batch order (``stack`` for lists: per-prompt embeddings of
        unequal lengths)."""
        return [entry for part in self.parts(target, source, rows, negative) for entry in part]


def split_step_calls(
    num_pairs: int, pairs_per_call: int, guided: bool, calibrate: bool
) -> list[list[tuple[range, CallRows]]]:
    """The calls of one step, as phases of ``(pairs, layout)``: all rows in calls of ``pairs_per_call`` pairs
    when they fit in one call; else the target-side rows (uncond, target, plain: never transported) in
    calls of as many rows, then the source rows, one per pair, in calls that ``TrajectoryFit.run_together``
    (a module's map needs every pair's source rows; the target rows are then all recorded)."""
    if pairs_per_call >= num_pairs:
        return [[(range(num_pairs), CallRows(num_pairs, guided, calibrate))]]
    budget = pairs_per_call * CallRows(1, guided, calibrate).copies  # rows per call
    others = tuple(kind for kind in CallRows(1, guided, calibrate).held if kind != "source")
    phases = []
    for kinds, per_call in ((others, max(1, budget // len(others))), (("source",), budget)):
        phases.append(
            [
                (chunk, CallRows(len(chunk), guided, calibrate, kinds))
                for chunk in call_chunks(num_pairs, per_call)
            ]
        )
    return phases


def source_prediction(
    session: TrajectoryFit,
    target: torch.Tensor,
    transported: torch.Tensor,
    plain: torch.Tensor | None,
    *,
    trajectory: str,
) -> torch.Tensor:
    """The prompt rows' prediction that advances the latents, from one evaluation's target, transported and
    (calibrating) plain rows.

    The first evaluation at a noise level fits that level's maps; with calibration it scales them by
    ``calibration_gain`` once and returns ``plain + gain (transported - plain)``, what the scaled maps give.
    An evaluation at a level fitted before (second-order samplers, repeated timesteps) was transported with
    the already scaled maps: it is used as it is, and the level is never scaled twice.
    """
    if plain is not None and not session.replayed:
        gain = calibration_gain(target, transported, plain, session.calibration)
        session.record_alignment(session.current_level, calibration_alignment(target, transported, plain))
        session.scale_step(session.current_level, gain)
        transported = plain + gain * (transported - plain)
    return transported if trajectory == "steered" else target


def _fitting_call(
    session: TrajectoryFit,
    level: float,
    call: Callable[[torch.Tensor, Any, list[int], CallRows], torch.Tensor],
    latents: torch.Tensor,
    t: Any,
    chunk: range,
    layout: CallRows,
) -> torch.Tensor:
    with session.call(level, source=layout.source, target=layout.target):
        return call(latents, t, list(chunk), layout)


def follow_trajectory(
    run: TrajectoryRun,
    latents: torch.Tensor,
    timesteps: Sequence[Any],
    *,
    level_of: Callable[[Any], float],
    call: Callable[[torch.Tensor, Any, list[int], CallRows], torch.Tensor],
    advance: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor],
    guided: bool,
    guidance_scale: float,
    guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The sampling loop of hosts that run their own scheduler: at each timestep, the run's pairs in
    denoiser calls (``call(latents, t, rows, layout)``; ``split_step_calls``) that ``run.session`` fits and
    transports, then ``advance(prediction, t, latents)`` with the guided prediction of the steered rows.
    ``guide(uncond, cond)`` is the sampler's CFG rule where it is not the plain
    ``uncond + guidance_scale * (cond - uncond)`` (QwenImagePipeline rescales the result to the cond norm)."""
    session, calibrate, pairs = run.session, run.calibrate, len(run.source)
    phases = split_step_calls(pairs, run.pairs_per_call, guided, calibrate)
    total, done = len(timesteps) * sum(len(phase) for phase in phases), 0
    for step, t in enumerate(timesteps):
        level = level_of(t)
        joined: dict[str, list[torch.Tensor]] = {kind: [] for kind in ROW_KINDS}
        for phase in phases:
            calls = [
                functools.partial(_fitting_call, session, level, call, latents, t, chunk, layout)
                for chunk, layout in phase
            ]
            # only source calls need to meet at the modules; the target-side ones run one after the other
            together = any(layout.source is not None for _, layout in phase)
            outputs = session.run_together(calls) if together else [run() for run in calls]
            for (_, layout), output in zip(phase, outputs, strict=True):
                for kind in layout.held:
                    joined[kind].append(output[layout.rows(kind)])
            done += len(phase)
            run.progress(done, total, f"step {step + 1}/{len(timesteps)}")
        chosen = source_prediction(
            session,
            torch.cat(joined["target"]),
            torch.cat(joined["source"]),
            torch.cat(joined["plain"]) if calibrate else None,
            trajectory=run.trajectory,
        )
        if guided:
            uncond = torch.cat(joined["uncond"])
            chosen = uncond + guidance_scale * (chosen - uncond) if guide is None else guide(uncond, chosen)
        latents = advance(chosen, t, latents)
    return latents
