"""Chroma through diffusers on a tiny ChromaPipeline built offline (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_chroma import MAX_SEQUENCE_LENGTH, build_tiny_chroma

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
    base = build_tiny_chroma(tmp_path_factory.mktemp("tiny_chroma"))
    base.set_progress_bar_config(disable=True)
    wrapped = act_pipeline(base)
    yield wrapped
    wrapped.disable_act()


@pytest.fixture(scope="module")
def chroma_map(pipe):
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        return pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_chroma_pipeline_gets_the_chroma_family(pipe):
    from act_core.families import FAMILIES, family_of_pipeline_class

    assert type(pipe).__name__ == "ACTChromaPipeline" and pipe.act_family.name == "chroma"
    assert (
        FAMILIES["chroma"] is pipe.act_family
        and family_of_pipeline_class("ChromaPipeline") is pipe.act_family
    )
    assert pipe.act_family.hosts == ("diffusers", "comfyui")  # ComfyUI: tests/comfyui/test_comfy_chroma.py


def test_default_preset_hooks_every_block_stream_along_the_guided_trajectory(pipe, chroma_map):
    assert list(chroma_map.modules) == [
        "transformer.transformer_blocks.0:text",
        "transformer.transformer_blocks.0:image",
        "transformer.transformer_blocks.1:text",
        "transformer.transformer_blocks.1:image",
        "transformer.single_transformer_blocks.0:joint",
        "transformer.single_transformer_blocks.1:joint",
    ]
    # the joint stream is the single block's own output: text and image tokens, at the transformer's width
    assert set(chroma_map.widths.values()) == {pipe.transformer.inner_dim}
    meta = chroma_map.metadata
    assert (
        meta["family"] == "chroma" and meta["preset"] == "transformer_blocks" and meta["cfg_rows"] == "cond"
    )
    assert meta["sampling"]["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    assert meta["sampling"]["guidance_scale"] == 4.0 and meta["causal_strategy"] == "exact"
    # time-aware: one bucket (and one calibration gain) per step, the first at pure noise
    assert len(chroma_map.buckets) == 3 and max(chroma_map.buckets) == pytest.approx(1.0)
    assert len(meta["calibration_gains"]) == 3


@pytest.mark.parametrize("guidance, negative", [(4.0, None), (4.0, "blurry"), (1.0, None)])
def test_the_fitting_rows_follow_chromapipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter batches the uncond rows with the prompt's (ChromaPipeline calls the transformer twice a
    step); un-steered, each pair's latents end where the pipeline's do from the same noise."""
    import contextlib

    import act_core.diffusers.chroma as adapter
    from act_core.sampling import SamplingSettings
    from act_core.workflow import TrajectoryRun

    class PlainSession:  # records nothing, transports nothing
        replayed, current_level = True, None

        @contextlib.contextmanager
        def call(self, level, *, source, target):
            yield

    ends = []
    import act_core.diffusers.adapter as shared  # every adapter's loop runs through it (follow_scheduler)

    follow = shared.follow_trajectory
    monkeypatch.setattr(shared, "follow_trajectory", lambda *a, **k: ends.append(follow(*a, **k)))
    prompts = ["a red circle", "a blue square, striped"]
    settings = SamplingSettings(3, guidance, 32, 32, negative, MAX_SEQUENCE_LENGTH)
    run = TrajectoryRun(PlainSession(), prompts, prompts, 7, "steered", False, 2, lambda *a: None)
    adapter.run_chroma_trajectory(pipe, run, settings)
    for i, prompt in enumerate(prompts):
        noise = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(7 + i))[None]
        latents = pipe._pack_latents(noise, 1, 4, 16, 16)
        expected = generate(
            pipe,
            prompt,
            latents=latents,
            negative_prompt=negative,
            guidance_scale=guidance,
            output_type="latent",
        )
        torch.testing.assert_close(ends[0][i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe, chroma_map, tmp_path
):
    plain = generate(pipe)
    pipe.enable_act(chroma_map, strength=0.0)
    at_zero = generate(pipe)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    pipe.disable_act()
    assert np.array_equal(at_zero, plain)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(generate(pipe), plain)
    loaded = ACTMap.load(chroma_map.save(tmp_path / "chroma.safetensors"))
    assert loaded.equal(chroma_map)
    pipe.enable_act(loaded, strength=1.0)
    try:
        assert np.array_equal(generate(pipe), steered)
    finally:
        pipe.disable_act()


def test_the_map_applies_at_another_step_count_and_without_guidance(pipe, chroma_map):
    for overrides in ({"num_inference_steps": 5}, {"guidance_scale": 1.0}):
        plain = generate(pipe, **overrides)
        pipe.enable_act(chroma_map, strength=1.0)
        try:
            steered = generate(pipe, **overrides)
        finally:
            pipe.disable_act()
        assert np.abs(steered - plain).max() > 1e-3
        assert np.array_equal(generate(pipe, **overrides), plain)


def test_norm_and_text_encoder_presets(pipe):
    with pytest.warns(Warning):
        norms = pipe.fit_act(SOURCE, TARGET, preset="transformer_norms", progress=False, **SAMPLING)
    assert len(norms) == 2 * 4 + 2 and "transformer.single_transformer_blocks.1.norm.norm" in norms.modules
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.warns(Warning):
            text = pipe.fit_act(SOURCE, TARGET, preset="text_encoder_norms", progress=False, **SAMPLING)
    finally:
        handle.remove()
    assert calls == [] and text.parts() == ["text_encoder"] and text.metadata["cfg_rows"] == "all"
    assert "text_encoder.encoder.final_layer_norm" in text.modules
    base = generate(pipe)
    pipe.enable_act(text, strength=1.0)
    try:
        assert np.abs(generate(pipe) - base).max() > 1e-3
    finally:
        pipe.disable_act()


def test_the_t5_mask_of_the_text_runner_is_the_tokenizers(pipe):
    from act_core.diffusers.chroma import _t5_mask

    prompts = ["a red circle", "a much longer prompt, which the tokenizer truncates at its thirty-two tokens"]
    encoded = pipe.tokenizer(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True)
    ids = torch.tensor(encoded.input_ids)
    assert torch.equal(_t5_mask(ids, pipe.tokenizer.eos_token_id), torch.tensor(encoded.attention_mask))


def test_chroma_maps_do_not_fold_and_refuse_clearly(pipe, chroma_map, tmp_path):
    from act_core.lora import export_lora

    with pytest.raises(ACTInputError, match="Unknown ACT preset 'pooled_text_and_blocks' for chroma"):
        pipe.fit_act(SOURCE, TARGET, preset="pooled_text_and_blocks", progress=False, **SAMPLING)
    with pytest.raises(ACTInputError, match="time-aware map .* cannot be folded"):
        pipe.fuse_act(chroma_map)
    assert pipe.act_map is None
    with pytest.raises(ACTInputError, match="Chroma maps do not fold.*LoRA"):
        export_lora(chroma_map, pipe, tmp_path / "x.safetensors")
    with pytest.raises(ACTInputError, match="max_sequence_length"):
        pipe.fit_act(SOURCE, TARGET, progress=False, **{**SAMPLING, "max_sequence_length": 513})


def test_a_cond_rows_map_leaves_the_negative_prompts_call_alone(pipe, chroma_map):
    """What the map was fitted for: at the first step (same latents with and without ACT) ChromaPipeline's
    second transformer call, the negative prompt's, is the plain model's."""
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    try:
        generate(pipe, num_inference_steps=1)
        pipe.enable_act(chroma_map, strength=1.0)
        generate(pipe, num_inference_steps=1)
    finally:
        pipe.disable_act()
        handle.remove()
    plain_cond, plain_uncond, steered_cond, steered_uncond = outputs
    assert not torch.equal(steered_cond, plain_cond)
    assert torch.equal(steered_uncond, plain_uncond)


def test_cli_fits_a_chroma_folder_with_the_chroma_default(tmp_path, capsys):
    from act_core.cli import main

    build_tiny_chroma(tmp_path / "chroma")
    out = tmp_path / "map.safetensors"
    args = ["fit", "--model", str(tmp_path / "chroma"), "--steps", "2", "--height", "32", "--width", "32"]
    args += ["--guidance", "4", "--source-prompt", "a red circle", "--source-prompt", "a blue circle"]
    args += ["--target-prompt", "a red square", "--target-prompt", "a blue square"]
    args += ["--max-sequence-length", str(MAX_SEQUENCE_LENGTH)]
    assert main([*args, "--output", str(out), "-q"]) == 0, capsys.readouterr().err
    fitted = ACTMap.load(out)
    assert fitted.metadata["family"] == "chroma" and fitted.metadata["preset"] == "transformer_blocks"
    assert fitted.metadata["model"] == "ChromaPipeline" and len(fitted.buckets) == 2
    assert fitted.metadata["sampling"]["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model: ChromaPipeline" in info and "cfg_rows: cond" in info and "buckets: 2" in info
