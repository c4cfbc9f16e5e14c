"""The host-neutral half of a trajectory fit: the sampling settings, the row layout of a fitting call, what
advances the latents at a step, and the sampling loop for hosts that run their own scheduler.

Every host samples the prompt pairs on rows ``[uncond (CFG batch only); target; source; plain source
(calibrate only)]`` that share their latents (``CallRows``). What a host gives is only its denoiser call and
its scheduler step (``follow_trajectory``), or, where the host runs its own sampler and batches the rows
itself (ComfyUI), the per-evaluation rule (``source_prediction``). Plain torch: no host is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .progress import Report
from .trajectory import TrajectoryFit, calibration_gain


@dataclass
class SamplingSettings:
    """The settings the user generates with, which fitting follows."""

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None = None
    max_sequence_length: int | None = None  # T5 length (FLUX, SD3)
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


@dataclass(frozen=True)
class CallRows:
    """Where one fitting call's rows sit: ``[uncond (guided only); target; source; plain source (calibrate
    only)]``, ``k`` pairs each. Every host that lays out its own calls lays them out this way."""

    k: int
    guided: bool
    calibrate: bool

    @property
    def offset(self) -> int:
        return self.k if self.guided else 0

    @property
    def copies(self) -> int:
        """How many rows each pair has in the call."""
        return (1 if self.guided else 0) + 2 + (1 if self.calibrate else 0)

    @property
    def target(self) -> slice:
        return slice(self.offset, self.offset + self.k)

    @property
    def source(self) -> slice:
        return slice(self.offset + self.k, self.offset + 2 * self.k)

    @property
    def plain(self) -> slice:
        return slice(self.offset + 2 * self.k, None)

    def stack(
        self,
        target: torch.Tensor,
        source: torch.Tensor,
        rows: list[int],
        negative: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One conditioning tensor (embeddings, pooled vectors) for this call's rows, in the layout above."""
        parts = ([negative[rows]] if self.guided else []) + [target[rows], source[rows]]
        return torch.cat(parts + ([source[rows]] if self.calibrate else []))


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
        gain = calibration_gain(target, transported, plain)
        session.scale_step(session.current_level, gain)
        transported = plain + gain * (transported - plain)
    return transported if trajectory == "steered" else target


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
    """The sampling loop of hosts that run their own scheduler: at each timestep, every chunk of the run's
    pairs in one denoiser call (``call(latents, t, rows, layout)``) that ``run.session`` fits and
    transports, then ``advance(prediction, t, latents)`` with the guided prediction of the steered rows.
    ``guide(uncond, cond)`` is the sampler's CFG rule where it is not the plain
    ``uncond + guidance_scale * (cond - uncond)`` (QwenImagePipeline rescales the result to the cond norm)."""
    session, calibrate = run.session, run.calibrate
    chunks = call_chunks(len(run.source), run.pairs_per_call)
    total, done = len(timesteps) * len(chunks), 0
    for step, t in enumerate(timesteps):
        level = level_of(t)
        calls = []
        for chunk in chunks:
            rows = list(chunk)
            layout = CallRows(len(rows), guided, calibrate)
            with session.call(level, source=layout.source, target=layout.target):
                output = call(latents, t, rows, layout)
            calls.append((layout, output))
            done += 1
            run.progress(done, total, f"step {step + 1}/{len(timesteps)}")
        joined = {
            name: torch.cat([output[getattr(layout, name)] for layout, output in calls])
            for name in ("target", "source", "plain")
        }
        chosen = source_prediction(
            session,
            joined["target"],
            joined["source"],
            joined["plain"] if calibrate else None,
            trajectory=run.trajectory,
        )
        if guided:
            uncond = torch.cat([output[: layout.k] for layout, output in calls])
            chosen = uncond + guidance_scale * (chosen - uncond) if guide is None else guide(uncond, chosen)
        latents = advance(chosen, t, latents)
    return latents
