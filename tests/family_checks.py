"""Checks every diffusers family's tests run on their tiny pipeline, written once.

Each family's test module keeps its own tests (their names, fixtures and settings) and calls these for the
procedure they share: the fitting rows follow the pipeline's own trajectory, strength 0 is exact and 1
steers, the map file round trips, a cond-rows map leaves the negative prompt's call alone, the CLI fits and
describes a folder. What differs between families (the pipeline, its ``generate``, the settings, the expected
names) comes in as parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from act_core import ACTMap
from act_core.errors import ACTInputError

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
# The two prompts of the trajectory checks: different lengths, so a family that pads pads one of them.
PROMPTS = ["a red circle", "a blue square, striped"]
# The CLI tests' two prompt pairs, as ``act fit`` options.
CLI_PROMPTS = ["--source-prompt", "a red circle", "--source-prompt", "a blue circle"]
CLI_PROMPTS += ["--target-prompt", "a red square", "--target-prompt", "a blue square"]


def act_pipe(base: Any) -> Iterator[Any]:
    """The body of a module-scoped ``pipe`` fixture: ``base`` wrapped as an ACT pipeline, without progress
    bars, its map disabled again at the end (``yield from act_pipe(build(...))``)."""
    from act_core.diffusers import act_pipeline

    base.set_progress_bar_config(disable=True)
    wrapped = act_pipeline(base)
    yield wrapped
    wrapped.disable_act()


def fit_warned(pipe: Any, sampling: dict, **options: Any) -> ACTMap:
    """A fit on SOURCE -> TARGET that must warn: the tests' tokenizers do not know these words."""
    with pytest.warns(Warning):
        return pipe.fit_act(SOURCE, TARGET, progress=False, **sampling, **options)


def check_split_calls_give_the_one_call_map(pipe: Any, act_map: ACTMap, sampling: dict) -> None:
    """The family's default fit with every step split into calls of one pair (target-side rows first, then
    the source rows' calls meeting at every module) gives ``act_map``, the fit whose calls hold all pairs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tests' tokenizers do not know these words
        split = pipe.fit_act(SOURCE, TARGET, progress=False, max_pairs_per_call=1, **sampling)
    assert split.metadata["pairs_per_call"] == 1 < act_map.metadata["pairs_per_call"]
    assert split.metadata["causal_strategy"] == "exact"
    check_same_maps(split, act_map)


def check_same_maps(fitted: Any, reference: Any, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Every module's omega and beta within float32 rounding of the reference map's (same modules, levels)."""
    assert sorted(fitted.modules) == sorted(reference.modules) and fitted.buckets == reference.buckets
    for name, module_map in reference.modules.items():
        for field in ("omega", "beta"):
            torch.testing.assert_close(
                getattr(fitted.modules[name], field), getattr(module_map, field), rtol=rtol, atol=atol
            )


def check_pipeline_family(pipe: Any, family: str, pipeline_class: str, hosts: tuple[str, ...]) -> None:
    """``act_pipeline`` gives the pipeline its family's mixin; the family is registered under its name and
    found by the pipeline class's name, and it says in which hosts its maps apply."""
    from act_core.families import FAMILIES, family_of_pipeline_class

    assert type(pipe).__name__ == f"ACT{pipeline_class}" and pipe.act_family.name == family
    assert FAMILIES[family] is pipe.act_family
    assert family_of_pipeline_class(pipeline_class) is pipe.act_family
    assert pipe.act_family.hosts == hosts


def check_time_aware_default_map(
    act_map: ACTMap,
    *,
    modules: list[str],
    width: int,
    family: str,
    cfg_rows: str,
    sampling: dict,
    preset: str = "transformer_blocks",
) -> None:
    """A family's default map, fitted along the trajectory at 3 steps: exactly ``modules`` (in order) at the
    transformer's ``width``, the family, preset and rows in its metadata with the ``sampling`` it followed,
    an exact causal fit, and time-aware (one bucket and one calibration gain per step, the first at pure
    noise)."""
    assert list(act_map.modules) == modules
    assert set(act_map.widths.values()) == {width}
    meta = act_map.metadata
    assert meta["family"] == family and meta["preset"] == preset and meta["cfg_rows"] == cfg_rows
    for key, value in sampling.items():
        assert meta["sampling"][key] == value, key
    assert meta["causal_strategy"] == "exact"
    assert len(act_map.buckets) == 3 and max(act_map.buckets) == pytest.approx(1.0)
    assert len(meta["calibration_gains"]) == 3


class PlainSession:  # records nothing, transports nothing
    replayed, current_level = True, None

    @contextlib.contextmanager
    def call(self, level, *, source, target):
        yield

    def run_together(self, calls):
        return [call() for call in calls]


def check_rows_follow_the_pipeline(
    monkeypatch: pytest.MonkeyPatch,
    patched: Any,
    run_trajectory: Callable[[Any], None],
    expected: Callable[[int, str], torch.Tensor],
    seed: int = 7,
) -> None:
    """Un-steered (a session that records and transports nothing), the fitting rows of each pair of PROMPTS
    end where the pipeline's own generation does: what ``run_trajectory(run)`` hands the trajectory loop's
    end (``follow_trajectory``, looked up in the module ``patched``) against ``expected(seed + i, prompt)``,
    the pipeline's latents from pair i's noise."""
    from act_core.workflow import TrajectoryRun

    ends = []
    follow = patched.follow_trajectory
    monkeypatch.setattr(patched, "follow_trajectory", lambda *a, **k: ends.append(follow(*a, **k)))
    run = TrajectoryRun(PlainSession(), PROMPTS, PROMPTS, seed, "steered", False, 2, lambda *a: None)
    run_trajectory(run)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(ends[0][i : i + 1], expected(seed + i, prompt), rtol=1e-4, atol=1e-5)


def check_zero_is_exact_one_steers_disable_restores(
    pipe: Any, act_map: ACTMap, generate: Callable[[Any], np.ndarray]
) -> np.ndarray:
    """Strength 0 generates the plain image bit for bit, strength 1 changes it, and disabling restores the
    plain pipeline bit for bit. Returns the steered image."""
    plain = generate(pipe)
    pipe.enable_act(act_map, strength=0.0)
    at_zero = generate(pipe)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    pipe.disable_act()
    assert np.array_equal(at_zero, plain)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(generate(pipe), plain)
    return steered


def check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe: Any, act_map: ACTMap, generate: Callable[[Any], np.ndarray], path: Path
) -> None:
    """check_zero_is_exact_one_steers_disable_restores, then the map saved to ``path`` loads equal and
    steers the pipeline to the same image bit for bit."""
    steered = check_zero_is_exact_one_steers_disable_restores(pipe, act_map, generate)
    loaded = ACTMap.load(act_map.save(path))
    assert loaded.equal(act_map)
    pipe.enable_act(loaded, strength=1.0)
    try:
        assert np.array_equal(generate(pipe), steered)
    finally:
        pipe.disable_act()


def check_the_map_steers(
    pipe: Any, act_map: ACTMap, generate: Callable[..., np.ndarray], **overrides
) -> None:
    """At strength 1 the map changes ``generate(pipe, **overrides)``'s image."""
    base = generate(pipe, **overrides)
    pipe.enable_act(act_map, strength=1.0)
    try:
        assert np.abs(generate(pipe, **overrides) - base).max() > 1e-3
    finally:
        pipe.disable_act()


def check_the_map_applies_under(
    pipe: Any, act_map: ACTMap, generate: Callable[..., np.ndarray], settings: Iterable[dict]
) -> None:
    """A map fitted at one setting applies at others (``generate``'s overrides, one at a time): it changes
    the image, and disabling it restores the plain one bit for bit."""
    for overrides in settings:
        plain = generate(pipe, **overrides)
        pipe.enable_act(act_map, strength=1.0)
        try:
            steered = generate(pipe, **overrides)
        finally:
            pipe.disable_act()
        assert np.abs(steered - plain).max() > 1e-3
        assert np.array_equal(generate(pipe, **overrides), plain)


def first_step_outputs(
    pipe: Any,
    act_map: ACTMap,
    generate: Callable[..., np.ndarray],
    record: Callable[[Any], Any] = lambda output: output[0],
    options: Iterable[dict] = ({},),
) -> list:
    """What the transformer returns (``record(output)`` of each call) in a one-step generation, plain then
    with the map at strength 1, for each of ``options``: at the first step the latents are the same with and
    without ACT, so the outputs differ only where the map steers."""
    outputs = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, output: outputs.append(record(output))
    )
    try:
        for option in options:
            generate(pipe, num_inference_steps=1, **option)
            pipe.enable_act(act_map, strength=1.0)
            generate(pipe, num_inference_steps=1, **option)
            pipe.disable_act()
    finally:
        pipe.disable_act()
        handle.remove()
    return outputs


def check_a_cond_rows_map_leaves_the_negative_call_alone(
    pipe: Any, act_map: ACTMap, generate: Callable[..., np.ndarray]
) -> None:
    """For a pipeline that calls its transformer twice a step (the prompt's, then the negative prompt's): a
    cond-rows map steers the first call and leaves the second the plain model's (what it was fitted for)."""
    plain_cond, plain_uncond, steered_cond, steered_uncond = first_step_outputs(pipe, act_map, generate)
    assert not torch.equal(steered_cond, plain_cond)
    assert torch.equal(steered_uncond, plain_uncond)


def check_the_step_gate_reads_sigma(
    pipe: Any, act_map: ACTMap, generate: Callable[..., np.ndarray], **overrides
) -> None:
    """For a pipeline whose transformer takes 1 - sigma: the gate's noise level at each step is the map's
    bucket of that step (sigma: 1 at the first step), and a window ending at 0.5 leaves the last of 3 steps
    alone."""
    from act_core.applying import active_handle

    levels = []
    pipe.enable_act(act_map, strength=1.0, end=0.5)
    handle = active_handle(pipe.act_modules())
    set_call = handle.set_call

    def spy(parts, rows=None, noise_level=None, in_window=True):
        levels.append((noise_level, in_window))
        return set_call(parts, rows=rows, noise_level=noise_level, in_window=in_window)

    handle.set_call = spy
    try:
        generate(pipe, **overrides)
    finally:
        pipe.disable_act()
    assert [level for level, _ in levels] == pytest.approx(list(act_map.buckets), abs=1e-6)
    assert [in_window for _, in_window in levels] == [True, True, False]


def check_unknown_preset_refused(pipe: Any, preset: str, family: str, sampling: dict) -> None:
    """A fit with a preset the family does not have is refused, naming the preset and the family."""
    with pytest.raises(ACTInputError, match=f"Unknown ACT preset '{preset}' for {family}"):
        pipe.fit_act(SOURCE, TARGET, preset=preset, progress=False, **sampling)


def check_maps_do_not_fold(pipe: Any, act_map: ACTMap, folder: Path, display_name: str) -> None:
    """A time-aware transformer map neither fuses into the weights (the pipeline is left without a map) nor
    exports as a LoRA, and the refusals say why (``display_name``: the regex start of the family's name)."""
    from act_core.lora import export_lora

    with pytest.raises(ACTInputError, match="time-aware map .* cannot be folded"):
        pipe.fuse_act(act_map)
    assert pipe.act_map is None
    with pytest.raises(ACTInputError, match=f"{display_name} maps do not fold.*LoRA"):
        export_lora(act_map, pipe, folder / "x.safetensors")


def check_too_long_prompts_refused(pipe: Any, sampling: dict, max_sequence_length: int) -> None:
    """A fit asking for more text tokens than the family's text encoder takes is refused."""
    with pytest.raises(ACTInputError, match="max_sequence_length"):
        pipe.fit_act(
            SOURCE, TARGET, progress=False, **{**sampling, "max_sequence_length": max_sequence_length}
        )


def check_cli_fitted_map(
    path: Path, *, family: str, preset: str, model: str, sampling: dict | None = None
) -> None:
    """A map ``act fit`` wrote at 2 steps: the family's default preset, the pipeline class and what it
    followed in its metadata, one bucket per step."""
    fitted = ACTMap.load(path)
    assert fitted.metadata["family"] == family and fitted.metadata["preset"] == preset
    assert fitted.metadata["model"] == model and len(fitted.buckets) == 2
    for key, value in (sampling or {}).items():
        assert fitted.metadata["sampling"][key] == value, key


def check_cli_info(capsys: pytest.CaptureFixture, path: Path, *, model: str, cfg_rows: str) -> None:
    """``act info`` describes a 2-step map: its pipeline class, its rows and its buckets."""
    from act_core.cli import main

    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    assert f"model: {model}" in info and f"cfg_rows: {cfg_rows}" in info and "buckets: 2" in info


def check_cli_fit_and_info(
    capsys: pytest.CaptureFixture,
    folder: Path,
    out: Path,
    options: list[str],
    *,
    family: str,
    model: str,
    cfg_rows: str,
    sampling: dict | None = None,
    preset: str = "transformer_blocks",
) -> None:
    """``act fit`` on a saved diffusers ``folder`` (CLI_PROMPTS, ``options``: steps, size, guidance...)
    writes ``out`` with the family's default (check_cli_fitted_map), which ``act info`` describes."""
    from act_core.cli import main

    args = ["fit", "--model", str(folder), *options, *CLI_PROMPTS]
    assert main([*args, "--output", str(out), "-q"]) == 0, capsys.readouterr().err
    check_cli_fitted_map(out, family=family, preset=preset, model=model, sampling=sampling)
    check_cli_info(capsys, out, model=model, cfg_rows=cfg_rows)
