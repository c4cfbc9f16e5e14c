"""FLUX.2 through diffusers on a tiny Flux2Pipeline built offline (random weights)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from tiny_flux2 import MAX_SEQUENCE_LENGTH, build_tiny_flux2

from act_core import ACTMap
from act_core.diffusers import act_pipeline
from act_core.errors import ACTInputError

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
SAMPLING = {
    "num_inference_steps": 3,
    "height": 32,
    "width": 32,
    "guidance_scale": 4.0,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = build_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2"))
    base.set_progress_bar_config(disable=True)
    wrapped = act_pipeline(base)
    yield wrapped
    wrapped.disable_act()


@pytest.fixture(scope="module")
def flux2_map(pipe):
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        return pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    # Flux2Pipeline's first positional argument is an image: the prompt goes by name
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_flux2_pipeline_gets_the_flux2_family(pipe):
    from act_core.families import FAMILIES, family_of_pipeline_class

    assert type(pipe).__name__ == "ACTFlux2Pipeline" and pipe.act_family.name == "flux2"
    assert (
        FAMILIES["flux2"] is pipe.act_family and family_of_pipeline_class("Flux2Pipeline") is pipe.act_family
    )
    assert pipe.act_family.hosts == ("diffusers",) and not pipe.act_family.cfg_batch
    # the guidance scale is embedded (FLUX.2 [dev]); no pooled text vector reaches the modulation
    assert pipe.transformer.time_guidance_embed.guidance_embedder is not None
    assert "transformer.time_text_embed.text_embedder" not in pipe.act_modules(["transformer"])


def test_default_preset_hooks_every_block_stream_along_the_trajectory(pipe, flux2_map):
    assert list(flux2_map.modules) == [
        "transformer.transformer_blocks.0:text",
        "transformer.transformer_blocks.0:image",
        "transformer.transformer_blocks.1:text",
        "transformer.transformer_blocks.1:image",
        "transformer.single_transformer_blocks.0:joint",
        "transformer.single_transformer_blocks.1:joint",
    ]
    # the joint stream is the single block's own output: text and image tokens, at the transformer's width
    assert set(flux2_map.widths.values()) == {pipe.transformer.inner_dim}
    meta = flux2_map.metadata
    assert meta["family"] == "flux2" and meta["preset"] == "transformer_blocks" and meta["cfg_rows"] == "all"
    assert meta["sampling"]["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    assert meta["sampling"]["guidance_scale"] == 4.0 and meta["causal_strategy"] == "exact"
    # time-aware: one bucket (and one calibration gain) per step, the first at pure noise
    assert len(flux2_map.buckets) == 3 and max(flux2_map.buckets) == pytest.approx(1.0)
    assert len(meta["calibration_gains"]) == 3


@pytest.mark.parametrize("guidance, steps", [(4.0, 3), (2.5, 4)])
def test_the_fitting_rows_follow_flux2pipelines_own_trajectory(pipe, monkeypatch, guidance, steps):
    """Un-steered, each pair's latents end where Flux2Pipeline's do from the same noise: the same prompt
    encoding, noise, schedule (its empirical mu), timestep and embedded guidance."""
    import act_core.diffusers.adapter as shared  # every adapter's loop runs through it (follow_scheduler)
    import act_core.diffusers.flux2 as adapter
    from act_core.sampling import SamplingSettings
    from act_core.workflow import TrajectoryRun

    class PlainSession:  # records nothing, transports nothing
        replayed, current_level = True, None

        @contextlib.contextmanager
        def call(self, level, *, source, target):
            yield

    ends = []
    follow = shared.follow_trajectory
    monkeypatch.setattr(shared, "follow_trajectory", lambda *a, **k: ends.append(follow(*a, **k)))
    prompts = ["a red circle", "a blue square, striped"]
    settings = SamplingSettings(steps, guidance, 32, 32, None, MAX_SEQUENCE_LENGTH, cfg_batch=False)
    run = TrajectoryRun(PlainSession(), prompts, prompts, 7, "steered", False, 2, lambda *a: None)
    adapter.run_flux2_trajectory(pipe, run, settings)
    for i, prompt in enumerate(prompts):
        expected = generate(  # the pipeline draws its own noise from a generator seeded 7 + i
            pipe, prompt, seed=7 + i, guidance_scale=guidance, num_inference_steps=steps, output_type="latent"
        )
        torch.testing.assert_close(ends[0][i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(pipe, flux2_map, tmp_path):
    plain = generate(pipe)
    pipe.enable_act(flux2_map, strength=0.0)
    at_zero = generate(pipe)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    pipe.disable_act()
    assert np.array_equal(at_zero, plain)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(generate(pipe), plain)
    loaded = ACTMap.load(flux2_map.save(tmp_path / "flux2.safetensors"))
    assert loaded.equal(flux2_map)
    pipe.enable_act(loaded, strength=1.0)
    try:
        assert np.array_equal(generate(pipe), steered)
    finally:
        pipe.disable_act()


def test_the_map_applies_at_another_step_count_and_guidance(pipe, flux2_map):
    for overrides in ({"num_inference_steps": 5}, {"guidance_scale": 2.0}):
        plain = generate(pipe, **overrides)
        pipe.enable_act(flux2_map, strength=1.0)
        try:
            steered = generate(pipe, **overrides)
        finally:
            pipe.disable_act()
        assert np.abs(steered - plain).max() > 1e-3
        assert np.array_equal(generate(pipe, **overrides), plain)


def test_the_norm_preset(pipe):
    with pytest.warns(Warning):
        norms = pipe.fit_act(SOURCE, TARGET, preset="transformer_norms", progress=False, **SAMPLING)
    assert len(norms) == 2 * 4 + 2 and "transformer.single_transformer_blocks.1.norm" in norms.modules
    assert "transformer.transformer_blocks.0.norm1_context" in norms.modules
    base = generate(pipe)
    pipe.enable_act(norms, strength=1.0)
    try:
        assert np.abs(generate(pipe) - base).max() > 1e-3
    finally:
        pipe.disable_act()


def test_flux2_maps_do_not_fold_and_refuse_clearly(pipe, flux2_map, tmp_path):
    from act_core.lora import export_lora

    for preset in ("pooled_text_and_blocks", "text_encoder_norms"):
        with pytest.raises(ACTInputError, match=f"Unknown ACT preset '{preset}' for flux2"):
            pipe.fit_act(SOURCE, TARGET, preset=preset, progress=False, **SAMPLING)
    with pytest.raises(ACTInputError, match="time-aware map .* cannot be folded"):
        pipe.fuse_act(flux2_map)
    assert pipe.act_map is None
    with pytest.raises(ACTInputError, match="FLUX.2 maps do not fold.*LoRA"):
        export_lora(flux2_map, pipe, tmp_path / "x.safetensors")
    with pytest.raises(ACTInputError, match="max_sequence_length"):
        pipe.fit_act(SOURCE, TARGET, progress=False, **{**SAMPLING, "max_sequence_length": 513})
    with pytest.raises(ACTInputError, match="without a CFG batch"):
        pipe.fit_act(SOURCE, TARGET, progress=False, negative_prompt="blurry", **SAMPLING)


class Processor:
    """What Flux2Pipeline uses of FLUX.2's tokenizer, a PixtralProcessor (which needs torchvision): its chat
    template, its text tokenizer as ``.tokenizer``, and a call whose first argument is images."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None:
            raise ValueError("images given to a processor without an image processor")
        return self.tokenizer(text, **kwargs)


def test_a_processor_tokenizer_fits_as_the_pipeline_encodes(pipe, flux2_map, monkeypatch):
    """FLUX.2's tokenizer is a processor: the prompt checks read its text tokenizer (``.tokenizer``: the
    unknown-word warning, the refusal of prompt sets it cannot tell apart), and the fit is the same."""
    monkeypatch.setattr(pipe, "tokenizer", Processor(pipe.tokenizer))
    with pytest.warns(Warning, match="does not know"):
        again = pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)
    assert again.equal(flux2_map)
    with pytest.raises(ACTInputError, match="same"):
        pipe.fit_act(SOURCE, [prompt.upper() for prompt in SOURCE], progress=False, **SAMPLING)


def test_a_pipeline_with_flux2s_transformer_but_other_sampling_is_refused(pipe):
    """Flux2KleinPipeline shares the transformer class (so the family) but encodes with Qwen3 and runs real
    CFG: the FLUX.2 adapter refuses to fit along it rather than follow the wrong trajectory."""
    import act_core.diffusers.flux2 as adapter

    class Flux2KleinPipeline:
        transformer = pipe.transformer

    with pytest.raises(ACTInputError, match="Flux2KleinPipeline shares FLUX.2's transformer"):
        adapter.run_flux2_trajectory(Flux2KleinPipeline(), None, None)


def test_cli_fits_a_flux2_folder_then_describes_and_sweeps_the_map(tmp_path, capsys):
    from act_core.cli import main

    build_tiny_flux2(tmp_path / "flux2")
    out, grid = tmp_path / "map.safetensors", tmp_path / "grid.png"
    size = ["--steps", "2", "--height", "32", "--width", "32", "--guidance", "4"]
    args = [
        "fit",
        "--model",
        str(tmp_path / "flux2"),
        *size,
        "--max-sequence-length",
        str(MAX_SEQUENCE_LENGTH),
    ]
    args += ["--source-prompt", "a red circle", "--source-prompt", "a blue circle"]
    args += ["--target-prompt", "a red square", "--target-prompt", "a blue square"]
    assert main([*args, "--output", str(out), "-q"]) == 0, capsys.readouterr().err
    fitted = ACTMap.load(out)
    assert fitted.metadata["family"] == "flux2" and fitted.metadata["preset"] == "transformer_blocks"
    assert fitted.metadata["model"] == "Flux2Pipeline" and len(fitted.buckets) == 2
    assert fitted.metadata["sampling"]["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model: Flux2Pipeline" in info and "cfg_rows: all" in info and "buckets: 2" in info
    # the sweep passes the prompt by name: Flux2Pipeline's first positional argument is an image (the sweep
    # has no --max-sequence-length: it generates at the pipeline's 512)
    sweep = ["sweep", "-q", "--model", str(tmp_path / "flux2"), "--map", str(out), *size]
    sweep += ["--prompt", "a red circle", "--lambdas", "0,1", "--output", str(grid)]
    assert main(sweep) == 0, capsys.readouterr().err
    assert grid.exists()
