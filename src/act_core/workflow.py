"""THE fit workflow, written once for every host (the diffusers mixin, the ComfyUI Fit node, the CLI).

preset -> modules -> prompt checks -> text-encoder modules (no denoiser pass) -> denoiser modules along
the host's own sampling trajectory with those text-encoder maps applied (``TrajectoryFit``: one map per
noise level, exact causal in one pass, calibrated once per level) -> metadata. The paper's first-step
protocol (and text-encoder-only presets) take the first-step engine instead.

A host gives a ``FitHost``: how to find its modules, what its text encoders see of a prompt, how to run
its sampler on the fitting rows (``act_core.sampling``), how many pairs one denoiser call takes, and
how to run the first-step engine's model. Everything else is decided here.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from .applying import apply_act
from .calibration import DEFAULT_CALIBRATION
from .errors import ACTInputError, ACTWarning
from .estimators import DEFAULT_SHRINKAGE, MAX_OMEGA, ModuleEstimator
from .families import FAMILIES, ModelFamily
from .maps import ACTMap, part_of, prompt_digest
from .presets import PROTOCOLS, Preset
from .progress import Report
from .sampling import CallRows, SamplingSettings, TrajectoryRun, prompt_pairs
from .trajectory import TRAJECTORIES, TrajectoryFit
from .validation import (
    check_balance,
    check_max_sequence_length,
    check_parts,
    check_positive_int,
    check_prompts,
    check_seed,
)

# Text-encoder maps before the denoiser's: pairs per text-encoder batch of the first-step engine.
TEXT_ENCODER_BATCH = 8


@dataclass(frozen=True)
class FitOptions:
    """What the user chose beyond the prompts and the sampling settings; None: the preset's own."""

    preset: str | Preset | None = None
    parts: Sequence[str] | None = None
    protocol: str | None = None
    method: str | None = None
    support: str | None = None
    mode: str | None = None
    trajectory: str = "steered"
    statistic: str | None = None
    calibrate: bool | None = None
    # how a step's gain is chosen (act_core.trajectory.calibration_gain)
    calibration: str = DEFAULT_CALIBRATION
    batch_size: int | None = None  # the first-step engine's batches; the trajectory's too, unless:
    max_pairs_per_call: int | None = None  # prompt pairs per denoiser call of a trajectory fit (None: memory)
    seed: int = 0
    statistics_steps: int = 1
    causal_strategy: str = "auto"
    max_lockstep_batches: int = 64
    shrinkage: float = DEFAULT_SHRINKAGE
    max_omega: float = MAX_OMEGA


@dataclass(frozen=True)
class FirstStepFit:
    """What the first-step engine needs from the workflow (``FitHost.fit_first_step``)."""

    modules: Mapping[str, nn.Module]
    source: list[str]
    target: list[str]
    estimator_options: Mapping[str, Any]  # method, support, apply_mode, shrinkage, max_omega
    mode: str
    batch_size: int
    seed: int
    statistics_steps: int
    causal_strategy: str
    max_lockstep_batches: int
    progress: Report | None


class FitHost(Protocol):
    """A host's adapter to the fit workflow."""

    family: ModelFamily
    name: str  # "diffusers", "comfyui"
    settings: SamplingSettings

    def part_modules(self, part: str) -> Mapping[str, nn.Module]:
        """Every module of ``part`` under its canonical name (the preset picks among them)."""

    def has_part(self, part: str) -> bool:
        """Whether this model has ``part`` (False only for a part it is known to lack: SD 1.x and 2.x have no
        text_encoder_2 of the SDXL family); a preset fitted whole skips the parts the model lacks."""

    def dead_modules(self, part: str) -> tuple[str, ...]:
        """Module-path globs of ``part`` whose output never reaches the denoiser."""

    def check_prompt_sets(self, source: list[str], target: list[str]) -> None:
        """Refuse sets that are the same to the text encoders; warn about words they do not know."""

    def fit_first_step(self, fit: FirstStepFit) -> ACTMap:
        """Run the first-step engine (``act_core.fitting``) with this host's encoders and denoiser."""

    def pairs_per_call(self, num_pairs: int, rows_per_pair: int) -> int:
        """How many prompt pairs one denoiser call takes (all of them: exact causal)."""

    def steer_text_encoders(self, text_map: ACTMap) -> contextlib.AbstractContextManager:
        """While sampling, the text encoders transported by ``text_map`` at strength 1."""

    def sample(self, run: TrajectoryRun) -> None:
        """Sample the pairs with the host's sampler, every denoiser call inside ``run.session.call``."""

    def fitting(self) -> contextlib.AbstractContextManager:
        """Held while fitting (locks, refusing a steered model)."""

    def metadata(self, protocol: str, uses_denoiser: bool) -> dict:
        """The host's part of the map's metadata: ``model``, ``sampling`` and extras."""


def fit_metadata(
    *,
    family: str,
    preset: str,
    protocol: str,
    source: Sequence[str],
    target: Sequence[str],
    seed: int,
    model: str,
    host: str,
    sampling: dict,
    cfg_rows: str,
    extra: dict | None = None,
) -> dict:
    """The provenance every fitted map stores, built in one place for every host."""
    info = {
        "family": family,
        "preset": preset,
        "protocol": protocol,
        "model": model,
        "host": host,
        "num_source_prompts": len(source),
        "num_target_prompts": len(target),
        "source_digest": prompt_digest(list(source)),
        # the prompts themselves, so that the map folds into weights later without asking for them again
        # (act_core.distill.fold_prompts: fuse_act, act export-lora, the Fold node)
        "source_prompts": list(source),
        "target_digest": prompt_digest(list(target)),
        "seed": seed,
        "sampling": sampling,
        "cfg_rows": cfg_rows,
    }
    info.update(extra or {})
    return info


def check_family_sampling(family: ModelFamily, negative_prompt: Any, max_sequence_length: Any) -> int | None:
    """The options only some families have: a negative prompt needs a CFG batch, a T5 length a T5 encoder.
    One rule for the mixin, the CLI and the nodes; returns the checked T5 length (or None)."""
    if negative_prompt is not None:
        if not isinstance(negative_prompt, str):
            raise ACTInputError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}.")
        if negative_prompt and not family.cfg_batch:
            raise ACTInputError(
                f"{family.display_name} samples without a CFG batch, so a negative prompt (--negative-prompt) "
                "has no effect there; drop it."
            )
    if max_sequence_length is None:
        return None
    if family.max_sequence_length is None:
        having = ", ".join(f.display_name for f in FAMILIES.values() if f.max_sequence_length is not None)
        raise ACTInputError(
            "max_sequence_length (--max-sequence-length) is the prompt length in tokens of the families whose "
            f"text encoder takes one ({having}); {family.display_name} has none. Drop it."
        )
    return check_max_sequence_length(
        max_sequence_length, family.max_sequence_length[1], what="max_sequence_length (--max-sequence-length)"
    )


def preset_modules(host: FitHost, spec: Preset, parts: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The modules ``spec`` hooks on this host's model (optionally only some of its parts), in order."""
    family = host.family
    if parts is None:  # the preset whole: the parts this model has (SD 1.x / 2.x lack SDXL's text_encoder_2)
        parts = tuple(part for part in spec.parts if host.has_part(part)) or spec.parts
    else:
        parts = check_parts(parts, family.parts)
    selected: dict[str, nn.Module] = {}
    for part in parts:
        if part not in spec.patterns:
            raise ACTInputError(
                f"Preset {spec.name!r} hooks {', '.join(spec.parts)}, not {part!r}. Leave parts empty for all "
                "of the preset's parts, or pick another preset."
            )
        selected.update(spec.select(part, host.part_modules(part), host.dead_modules(part)))
    if not selected:
        raise ACTInputError(f"Preset {spec.name!r} matched no module of this model's {', '.join(parts)}.")
    return selected


def fit_act_map(
    host: FitHost,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    options: FitOptions = FitOptions(),  # noqa: B008 - frozen
    progress: Report | None = None,
    less_prompts: Sequence[str] | None = None,
) -> ACTMap:
    """Fit a map that moves the host's generations for ``source_prompts`` toward ``target_prompts``.

    With ``less_prompts`` the map is two-sided: a second map over the same modules moves the source
    prompts toward ``less_prompts``, and lambda < 0 applies it (lambda -1: as if prompted with the less
    side, 0: the model, +1: the target side). It costs a second fit.
    """
    if less_prompts is None:
        return _fit_one_side(host, source_prompts, target_prompts, options, progress)
    less_prompts = check_prompts(less_prompts, "less")
    if sorted(less_prompts) == sorted(check_prompts(target_prompts, "target")):
        raise ACTInputError(
            "The less prompts are the target prompts: a two-sided slider needs a 'less' side that differs from "
            "the 'more' (target) side."
        )

    def phase(name: str) -> Report | None:
        if progress is None:
            return None
        return lambda done, total, what: progress(done, total, f"{name} side: {what}")

    more = _fit_one_side(host, source_prompts, target_prompts, options, phase("more"))
    less = _fit_one_side(host, source_prompts, less_prompts, options, phase("less"))
    metadata = {
        **more.metadata,
        "two_sided": True,
        "num_less_prompts": len(less_prompts),
        "less_digest": prompt_digest(less_prompts),
    }
    return ACTMap(more.modules, metadata, more.buckets, less)


def _fit_one_side(
    host: FitHost,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    options: FitOptions,
    progress: Report | None,
) -> ACTMap:
    """One map: the fit workflow proper (see the module docstring)."""
    family = host.family
    source = check_prompts(source_prompts, "source")
    target = check_prompts(target_prompts, "target")
    check_balance(source, target)
    seed = check_seed(options.seed)
    spec = family.preset(options.preset or family.default_preset)
    protocol = options.protocol or spec.protocol
    if protocol not in PROTOCOLS:
        raise ACTInputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    if options.trajectory not in TRAJECTORIES:
        raise ACTInputError(f"trajectory must be one of {TRAJECTORIES}, got {options.trajectory!r}.")
    check_positive_int(options.statistics_steps, "statistics_steps")
    if options.statistics_steps > host.settings.num_inference_steps:
        raise ACTInputError("statistics_steps must be at most the number of sampling steps.")
    if options.batch_size is not None:
        check_positive_int(options.batch_size, "batch_size")
    if options.max_pairs_per_call is not None:
        check_positive_int(options.max_pairs_per_call, "max_pairs_per_call")
    host.check_prompt_sets(source, target)
    modules = preset_modules(host, spec, options.parts)
    denoiser_modules = {n: m for n, m in modules.items() if part_of(n) == family.denoiser}
    estimator_options = {
        "method": options.method or spec.method,
        "support": options.support or spec.support,
        "apply_mode": spec.apply_mode,
        "shrinkage": options.shrinkage,
        "max_omega": options.max_omega,
    }
    mode = options.mode or spec.mode
    with host.fitting():
        if protocol == "first_step" or not denoiser_modules:
            act_map = host.fit_first_step(
                FirstStepFit(
                    modules,
                    source,
                    target,
                    estimator_options,
                    mode,
                    options.batch_size or TEXT_ENCODER_BATCH,
                    seed,
                    options.statistics_steps,
                    options.causal_strategy,
                    options.max_lockstep_batches,
                    progress,
                )
            )
        else:
            act_map = _fit_along_trajectory(
                host,
                source,
                target,
                modules,
                estimator_options,
                mode=mode,
                seed=seed,
                trajectory=options.trajectory,
                statistic=options.statistic or spec.statistic,
                calibrate=spec.calibrate if options.calibrate is None else bool(options.calibrate),
                calibration=options.calibration,
                batch_size=options.batch_size,
                max_pairs_per_call=options.max_pairs_per_call or options.batch_size,
                progress=progress,
            )
    uses_denoiser = bool(denoiser_modules)
    recorded_protocol = protocol if uses_denoiser else "text_encoders_only"
    host_info = host.metadata(recorded_protocol, uses_denoiser)
    if recorded_protocol == "trajectory":
        host_info["sampling"]["trajectory"] = options.trajectory
    elif recorded_protocol == "first_step":
        host_info["sampling"].update(
            {"statistics_steps": options.statistics_steps, "guidance": "off (cond branch)"}
        )
    metadata = fit_metadata(
        family=family.name,
        preset=spec.name,
        protocol=recorded_protocol,
        source=source,
        target=target,
        seed=seed,
        model=host_info.pop("model"),
        host=host.name,
        sampling=host_info.pop("sampling"),
        cfg_rows=spec.cfg_rows if uses_denoiser else "all",
        extra=host_info,
    )
    return act_map.with_metadata(metadata)


def _fit_along_trajectory(
    host: FitHost,
    source: list[str],
    target: list[str],
    modules: dict[str, nn.Module],
    estimator_options: Mapping[str, Any],
    *,
    mode: str,
    seed: int,
    trajectory: str,
    statistic: str,
    calibrate: bool,
    calibration: str,
    batch_size: int | None,
    max_pairs_per_call: int | None,
    progress: Report | None,
) -> ACTMap:
    """Text-encoder modules first (first-step engine, no denoiser), then the denoiser along the trajectory
    with those maps applied (causal across parts)."""
    denoiser = host.family.denoiser
    denoiser_modules = {n: m for n, m in modules.items() if part_of(n) == denoiser}
    text_modules = {n: m for n, m in modules.items() if n not in denoiser_modules}
    text_map = None
    if text_modules:
        text_map = host.fit_first_step(
            FirstStepFit(
                text_modules,
                source,
                target,
                estimator_options,
                mode,
                batch_size or TEXT_ENCODER_BATCH,
                seed,
                1,
                "auto",
                64,
                None,
            )
        )
    source_pairs, target_pairs = prompt_pairs(source, target)
    pairs = len(source_pairs)
    rows_per_pair = CallRows(1, host.settings.guided, calibrate).copies
    per_call = min(pairs, max_pairs_per_call or host.pairs_per_call(pairs, rows_per_pair))
    estimator = ModuleEstimator(
        estimator_options["method"],
        estimator_options["support"],
        estimator_options["apply_mode"],
        shrinkage=estimator_options["shrinkage"],
        max_omega=estimator_options["max_omega"],
    )
    session = TrajectoryFit(
        denoiser_modules, estimator, num_pairs=pairs, mode=mode, statistic=statistic, calibration=calibration
    )
    steered_text = host.steer_text_encoders(text_map) if text_map else contextlib.nullcontext()
    with steered_text, session:
        host.sample(
            TrajectoryRun(
                session,
                source_pairs,
                target_pairs,
                seed,
                trajectory,
                calibrate,
                per_call,
                progress or (lambda done, total, what: None),
            )
        )
    estimator.check_not_identical(len(session.maps))
    denoiser_map = session.result(
        {
            **estimator.metadata(),
            "num_source": len(source),
            "num_target": len(target),
            "num_pairs": pairs,
            "pairs_per_call": per_call,
            "calibration_gains": [round(session.gains[k], 4) for k in sorted(session.gains)] or None,
            "calibration": calibration if session.gains else None,
            # per step: the cosine between the transport's and the target prompt's moves of the output
            "calibration_alignment": [round(session.alignments[k], 4) for k in sorted(session.alignments)]
            or None,
        }
    )
    if session.stats.strategy == "lagged":
        warnings.warn(
            f"ACT fitting could not bring each step's {pairs} prompt pairs to the {denoiser}'s modules together "
            f"(the host ran their source rows in calls one after the other), so some source rows were steered "
            "with the previous step's maps while a step was recorded ('lagged': approximately causal, weaker "
            "at lambda 1). Lower max_pairs_per_call (fewer rows per call) so that the fit plans the split "
            "itself, which is exact.",
            ACTWarning,
            stacklevel=4,
        )
    if text_map is None:
        return denoiser_map
    return ACTMap({**text_map.modules, **denoiser_map.modules}, denoiser_map.metadata, denoiser_map.buckets)


@contextlib.contextmanager
def text_encoders_steered(modules: Mapping[str, nn.Module], text_map: ACTMap) -> Iterator[None]:
    """``text_map`` hooked on ``modules`` at strength 1 for the duration (what both hosts' adapters do)."""
    handle = apply_act(modules, text_map, 1.0)
    try:
        yield
    finally:
        handle.remove()


def split_pairs(prompts: Sequence[Any], size: int) -> list[tuple[int, Any]]:
    """``(first index, batch)`` batches of ``size``: the first-step engine's batches of one prompt set."""
    return [(start, prompts[start : start + size]) for start in range(0, len(prompts), size)]
