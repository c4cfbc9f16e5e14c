"""Lumina 2 through diffusers on a tiny Lumina2Pipeline built offline (random weights)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from tiny_lumina2 import build_tiny_lumina2

from act_core import ACTMap
from act_core.diffusers import act_pipeline
from act_core.errors import ACTInputError

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
# Lumina2Pipeline needs sizes in multiples of 16 (its VAE factor 8, 2x2 patches): a 8x8 latent, 16 image tokens
SAMPLING = {"num_inference_steps": 3, "height": 64, "width": 64, "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = build_tiny_lumina2(tmp_path_factory.mktemp("tiny_lumina2"))
    base.set_progress_bar_config(disable=True)
    wrapped = act_pipeline(base)
    yield wrapped
    wrapped.disable_act()


@pytest.fixture(scope="module")
def lumina_map(pipe):
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        return pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_lumina2_pipeline_gets_the_lumina2_family(pipe):
    from act_core.families import FAMILIES, family_of_pipeline_class

    assert type(pipe).__name__ == "ACTLumina2Pipeline" and pipe.act_family.name == "lumina2"
    assert FAMILIES["lumina2"] is pipe.act_family
    assert family_of_pipeline_class("Lumina2Pipeline") is pipe.act_family
    assert pipe.act_family.hosts == ("diffusers", "comfyui")


def test_default_preset_hooks_every_main_block_along_the_guided_trajectory(pipe, lumina_map):
    assert list(lumina_map.modules) == ["transformer.layers.0:joint", "transformer.layers.1:joint"]
    assert set(lumina_map.widths.values()) == {pipe.transformer.config.hidden_size}
    meta = lumina_map.metadata
    assert (
        meta["family"] == "lumina2" and meta["preset"] == "transformer_blocks" and meta["cfg_rows"] == "cond"
    )
    assert meta["sampling"]["guidance_scale"] == 4.0 and meta["causal_strategy"] == "exact"
    # time-aware: one bucket (and one calibration gain) per step, the first at pure noise
    assert len(lumina_map.buckets) == 3 and max(lumina_map.buckets) == pytest.approx(1.0)
    assert len(meta["calibration_gains"]) == 3


class PlainSession:  # records nothing, transports nothing
    replayed, current_level = True, None

    @contextlib.contextmanager
    def call(self, level, *, source, target):
        yield


@pytest.mark.parametrize("guidance, negative", [(4.0, None), (4.0, "blurry"), (1.0, None)])
def test_the_fitting_rows_follow_lumina2pipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter batches the uncond rows with the prompt's (Lumina2Pipeline calls the transformer twice a
    step), and guides with the pipeline's CFG normalisation; un-steered, each pair's latents end where the
    pipeline's do from the same noise."""
    import act_core.diffusers.lumina2 as adapter
    from act_core.sampling import SamplingSettings
    from act_core.workflow import TrajectoryRun

    ends = []
    follow = adapter.follow_trajectory
    monkeypatch.setattr(adapter, "follow_trajectory", lambda *a, **k: ends.append(follow(*a, **k)))
    prompts = ["a red circle", "a blue square, striped"]
    settings = SamplingSettings(3, guidance, 64, 64, negative)
    run = TrajectoryRun(PlainSession(), prompts, prompts, 7, "steered", False, 2, lambda *a: None)
    adapter.run_lumina2_trajectory(pipe, run, settings)
    for i, prompt in enumerate(prompts):
        noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(7 + i))[None]
        expected = generate(
            pipe,
            prompt,
            latents=noise,
            negative_prompt=negative,
            guidance_scale=guidance,
            output_type="latent",
        )
        torch.testing.assert_close(ends[0][i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_the_step_gate_reads_the_noise_level_off_lumina2s_reversed_timestep(pipe, lumina_map):
    """Lumina2Pipeline gives its transformer 1 - sigma: the gate's noise level is sigma (1 at the first step),
    so the map's first bucket steers the first step and a window ending at 0.5 leaves the last step alone."""
    from act_core.applying import active_handle

    levels = []
    pipe.enable_act(lumina_map, strength=1.0, end=0.5)
    handle = active_handle(pipe.act_modules())
    set_call = handle.set_call

    def spy(parts, rows=None, noise_level=None, in_window=True):
        levels.append((noise_level, in_window))
        return set_call(parts, rows=rows, noise_level=noise_level, in_window=in_window)

    handle.set_call = spy
    try:
        generate(pipe, guidance_scale=1.0)
    finally:
        pipe.disable_act()
    assert [level for level, _ in levels] == pytest.approx(list(lumina_map.buckets), abs=1e-6)
    assert [in_window for _, in_window in levels] == [True, True, False]


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe, lumina_map, tmp_path
):
    plain = generate(pipe)
    pipe.enable_act(lumina_map, strength=0.0)
    at_zero = generate(pipe)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    pipe.disable_act()
    assert np.array_equal(at_zero, plain)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(generate(pipe), plain)
    loaded = ACTMap.load(lumina_map.save(tmp_path / "lumina2.safetensors"))
    assert loaded.equal(lumina_map)
    pipe.enable_act(loaded, strength=1.0)
    try:
        assert np.array_equal(generate(pipe), steered)
    finally:
        pipe.disable_act()


def test_the_map_applies_at_another_step_count_and_without_guidance(pipe, lumina_map):
    for overrides in ({"num_inference_steps": 5}, {"guidance_scale": 1.0}):
        plain = generate(pipe, **overrides)
        pipe.enable_act(lumina_map, strength=1.0)
        try:
            steered = generate(pipe, **overrides)
        finally:
            pipe.disable_act()
        assert np.abs(steered - plain).max() > 1e-3
        assert np.array_equal(generate(pipe, **overrides), plain)


def test_a_cond_rows_map_leaves_the_negative_prompts_call_alone(pipe, lumina_map):
    """At the first step (same latents with and without ACT) Lumina2Pipeline's second transformer call, the
    negative prompt's, is the plain model's."""
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    try:
        generate(pipe, num_inference_steps=1)
        pipe.enable_act(lumina_map, strength=1.0)
        generate(pipe, num_inference_steps=1)
    finally:
        pipe.disable_act()
        handle.remove()
    plain_cond, plain_uncond, steered_cond, steered_uncond = outputs
    assert not torch.equal(steered_cond, plain_cond)
    assert torch.equal(steered_uncond, plain_uncond)


def test_norm_preset_and_refusals(pipe, lumina_map, tmp_path):
    from act_core.lora import export_lora

    with pytest.warns(Warning):
        norms = pipe.fit_act(SOURCE, TARGET, preset="transformer_norms", progress=False, **SAMPLING)
    assert list(norms.modules) == [
        f"transformer.layers.{i}.{norm}" for i in range(2) for norm in ("norm1.norm", "ffn_norm1")
    ]
    base = generate(pipe)
    pipe.enable_act(norms, strength=1.0)
    try:
        assert np.abs(generate(pipe) - base).max() > 1e-3
    finally:
        pipe.disable_act()
    with pytest.raises(ACTInputError, match="Unknown ACT preset 'pooled_text_and_blocks' for lumina2"):
        pipe.fit_act(SOURCE, TARGET, preset="pooled_text_and_blocks", progress=False, **SAMPLING)
    with pytest.raises(ACTInputError, match="time-aware map .* cannot be folded"):
        pipe.fuse_act(lumina_map)
    assert pipe.act_map is None
    with pytest.raises(ACTInputError, match="Lumina 2 maps do not fold.*LoRA"):
        export_lora(lumina_map, pipe, tmp_path / "x.safetensors")
    with pytest.raises(ACTInputError, match="max_sequence_length"):
        pipe.fit_act(SOURCE, TARGET, progress=False, **{**SAMPLING, "max_sequence_length": 300})


def test_cli_fits_a_lumina2_folder_with_the_lumina2_default(tmp_path, capsys):
    from act_core.cli import main

    build_tiny_lumina2(tmp_path / "lumina2")
    out = tmp_path / "map.safetensors"
    args = ["fit", "--model", str(tmp_path / "lumina2"), "--steps", "2", "--height", "64", "--width", "64"]
    args += ["--guidance", "4", "--source-prompt", "a red circle", "--source-prompt", "a blue circle"]
    args += ["--target-prompt", "a red square", "--target-prompt", "a blue square"]
    assert main([*args, "--output", str(out), "-q"]) == 0, capsys.readouterr().err
    fitted = ACTMap.load(out)
    assert fitted.metadata["family"] == "lumina2" and fitted.metadata["preset"] == "transformer_blocks"
    assert fitted.metadata["model"] == "Lumina2Pipeline" and len(fitted.buckets) == 2
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model: Lumina2Pipeline" in info and "cfg_rows: cond" in info and "buckets: 2" in info
