"""Z-Image through diffusers on a tiny ZImagePipeline built offline (random weights)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from tiny_zimage import build_tiny_zimage

from act_core import ACTMap
from act_core.diffusers import act_pipeline
from act_core.errors import ACTInputError

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
# ZImagePipeline's guidance_scale is the excess over the prompt's prediction: 3 guides as 4 does elsewhere
SAMPLING = {"num_inference_steps": 3, "height": 32, "width": 32, "guidance_scale": 3.0}
TURBO = {**SAMPLING, "guidance_scale": 0.0}  # how Z-Image-Turbo samples: no CFG


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"))
    base.set_progress_bar_config(disable=True)
    wrapped = act_pipeline(base)
    yield wrapped
    wrapped.disable_act()


@pytest.fixture(scope="module")
def zimage_map(pipe):
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        return pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


@pytest.fixture(scope="module")
def turbo_map(pipe):
    with pytest.warns(Warning):
        return pipe.fit_act(SOURCE, TARGET, progress=False, **TURBO)


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_zimage_pipeline_gets_the_zimage_family(pipe):
    from act_core.families import FAMILIES, family_of_pipeline_class

    assert type(pipe).__name__ == "ACTZImagePipeline" and pipe.act_family.name == "zimage"
    assert FAMILIES["zimage"] is pipe.act_family
    assert family_of_pipeline_class("ZImagePipeline") is pipe.act_family
    assert pipe.act_family.hosts == ("diffusers",)  # ComfyUI loads Z-Image as Lumina 2's NextDiT


def test_a_fit_defaults_to_the_pipelines_own_size_guidance_and_steps(pipe):
    """ZImagePipeline has no default_sample_size: its own 1024 pixels, and it guides at any scale above 0."""
    from act_core.diffusers.adapter import load_adapter
    from act_core.diffusers.host import sampling_settings

    settings = sampling_settings(pipe, pipe.act_family, load_adapter(pipe.act_family), *[None] * 6)
    assert (settings.height, settings.width) == (1024, 1024)
    assert (settings.num_inference_steps, settings.guidance_scale, settings.guided) == (50, 5.0, True)
    for scale, guided in ((0.0, False), (0.5, True)):
        tuned = sampling_settings(pipe, pipe.act_family, load_adapter(pipe.act_family), 8, scale, *[None] * 4)
        assert tuned.guided is guided


def test_default_preset_hooks_every_main_block_along_the_trajectory(pipe, zimage_map, turbo_map):
    for act_map, guidance in ((zimage_map, 3.0), (turbo_map, 0.0)):
        assert list(act_map.modules) == ["transformer.layers.0:joint", "transformer.layers.1:joint"]
        assert set(act_map.widths.values()) == {pipe.transformer.dim}
        meta = act_map.metadata
        assert meta["family"] == "zimage" and meta["preset"] == "transformer_blocks"
        assert meta["cfg_rows"] == "cond" and meta["causal_strategy"] == "exact"
        assert meta["sampling"]["guidance_scale"] == guidance
        assert len(act_map.buckets) == 3 and max(act_map.buckets) == pytest.approx(1.0)
        assert len(meta["calibration_gains"]) == 3


class PlainSession:  # records nothing, transports nothing
    replayed, current_level = True, None

    @contextlib.contextmanager
    def call(self, level, *, source, target):
        yield


@pytest.mark.parametrize("guidance, negative", [(3.0, None), (3.0, "blurry"), (0.0, None)])
def test_the_fitting_rows_follow_zimagepipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter's rows ([uncond; target; source] where ZImagePipeline has [cond; uncond]) and its guide
    rule; un-steered, each pair's latents end where the pipeline's do from the same noise."""
    import act_core.diffusers.zimage as adapter
    from act_core.sampling import SamplingSettings
    from act_core.workflow import TrajectoryRun

    ends = []
    follow = adapter.follow_trajectory
    monkeypatch.setattr(adapter, "follow_trajectory", lambda *a, **k: ends.append(follow(*a, **k)))
    prompts = ["a red circle", "a blue square, striped"]
    settings = SamplingSettings(3, guidance, 32, 32, negative, cfg_threshold=0.0)
    run = TrajectoryRun(PlainSession(), prompts, prompts, 7, "steered", False, 2, lambda *a: None)
    adapter.run_zimage_trajectory(pipe, run, settings)
    for i, prompt in enumerate(prompts):
        noise = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(7 + i))[None]
        expected = generate(
            pipe,
            prompt,
            latents=noise,
            negative_prompt=negative,
            guidance_scale=guidance,
            output_type="latent",
        )
        torch.testing.assert_close(ends[0][i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe, zimage_map, tmp_path
):
    plain = generate(pipe)
    pipe.enable_act(zimage_map, strength=0.0)
    at_zero = generate(pipe)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    pipe.disable_act()
    assert np.array_equal(at_zero, plain)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(generate(pipe), plain)
    loaded = ACTMap.load(zimage_map.save(tmp_path / "zimage.safetensors"))
    assert loaded.equal(zimage_map)
    pipe.enable_act(loaded, strength=1.0)
    try:
        assert np.array_equal(generate(pipe), steered)
    finally:
        pipe.disable_act()


def test_the_turbo_map_steers_unguided_sampling_and_another_step_count(pipe, turbo_map):
    for overrides in (TURBO, {**TURBO, "num_inference_steps": 5}):
        plain = generate(pipe, **overrides)
        pipe.enable_act(turbo_map, strength=1.0)
        try:
            steered = generate(pipe, **overrides)
        finally:
            pipe.disable_act()
        assert np.abs(steered - plain).max() > 1e-3
        assert np.array_equal(generate(pipe, **overrides), plain)


def test_a_cond_rows_map_steers_the_first_half_of_zimages_cfg_batch(pipe, zimage_map):
    """ZImagePipeline's CFG batch is [cond; uncond]: at the first step (same latents with and without ACT)
    the prompt's rows are steered and the negative prompt's are the plain model's."""
    outputs = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, output: outputs.append([row.clone() for row in output[0]])
    )
    try:
        generate(pipe, num_inference_steps=1)
        pipe.enable_act(zimage_map, strength=1.0)
        generate(pipe, num_inference_steps=1)
    finally:
        pipe.disable_act()
        handle.remove()
    (plain_cond, plain_uncond), (steered_cond, steered_uncond) = outputs
    assert not torch.equal(steered_cond, plain_cond)
    assert torch.equal(steered_uncond, plain_uncond)


def test_the_step_gate_reads_the_noise_level_off_zimages_reversed_timestep(pipe, turbo_map):
    from act_core.applying import active_handle

    levels = []
    pipe.enable_act(turbo_map, strength=1.0, end=0.5)
    handle = active_handle(pipe.act_modules())
    set_call = handle.set_call

    def spy(parts, rows=None, noise_level=None, in_window=True):
        levels.append((noise_level, in_window))
        return set_call(parts, rows=rows, noise_level=noise_level, in_window=in_window)

    handle.set_call = spy
    try:
        generate(pipe, **TURBO)
    finally:
        pipe.disable_act()
    assert [level for level, _ in levels] == pytest.approx(list(turbo_map.buckets), abs=1e-6)
    assert [in_window for _, in_window in levels] == [True, True, False]


def test_norm_preset_and_refusals(pipe, zimage_map, tmp_path):
    from act_core.lora import export_lora

    with pytest.warns(Warning):
        norms = pipe.fit_act(SOURCE, TARGET, preset="transformer_norms", progress=False, **TURBO)
    assert list(norms.modules) == [
        f"transformer.layers.{i}.{norm}" for i in range(2) for norm in ("attention_norm1", "ffn_norm1")
    ]
    base = generate(pipe, **TURBO)
    pipe.enable_act(norms, strength=1.0)
    try:
        assert np.abs(generate(pipe, **TURBO) - base).max() > 1e-3
    finally:
        pipe.disable_act()
    with pytest.raises(ACTInputError, match="time-aware map .* cannot be folded"):
        pipe.fuse_act(zimage_map)
    assert pipe.act_map is None
    with pytest.raises(ACTInputError, match="Z-Image maps do not fold.*LoRA"):
        export_lora(zimage_map, pipe, tmp_path / "x.safetensors")
    with pytest.raises(ACTInputError, match="max_sequence_length"):
        pipe.fit_act(SOURCE, TARGET, progress=False, **{**SAMPLING, "max_sequence_length": 993})


def test_cli_fits_a_zimage_folder_with_the_zimage_default(tmp_path, capsys):
    from act_core.cli import main

    build_tiny_zimage(tmp_path / "zimage")
    out = tmp_path / "map.safetensors"
    args = ["fit", "--model", str(tmp_path / "zimage"), "--steps", "2", "--height", "32", "--width", "32"]
    args += ["--guidance", "0", "--source-prompt", "a red circle", "--source-prompt", "a blue circle"]
    args += ["--target-prompt", "a red square", "--target-prompt", "a blue square"]
    assert main([*args, "--output", str(out), "-q"]) == 0, capsys.readouterr().err
    fitted = ACTMap.load(out)
    assert fitted.metadata["family"] == "zimage" and fitted.metadata["preset"] == "transformer_blocks"
    assert fitted.metadata["model"] == "ZImagePipeline" and len(fitted.buckets) == 2
    assert fitted.metadata["sampling"]["guidance_scale"] == 0.0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model: ZImagePipeline" in info and "cfg_rows: cond" in info and "buckets: 2" in info
