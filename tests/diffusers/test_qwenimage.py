"""Qwen-Image through diffusers on a tiny QwenImagePipeline built offline (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_qwenimage import TEMPLATE, TEMPLATE_TOKENS, build_tiny_qwenimage

from act_core import ACTMap
from act_core.diffusers import act_pipeline
from act_core.errors import ACTInputError

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
# What a fit follows; ``guidance_scale`` is QwenImagePipeline's true_cfg_scale, guided with a negative prompt.
SAMPLING = {
    "num_inference_steps": 3,
    "height": 32,
    "width": 32,
    "guidance_scale": 4.0,
    "negative_prompt": "blurry",
}
# The same settings as the pipeline takes them.
GENERATE = {
    "num_inference_steps": 3,
    "height": 32,
    "width": 32,
    "true_cfg_scale": 4.0,
    "negative_prompt": "blurry",
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = build_tiny_qwenimage(tmp_path_factory.mktemp("tiny_qwenimage"))
    base.set_progress_bar_config(disable=True)
    wrapped = act_pipeline(base)
    yield wrapped
    wrapped.disable_act()


@pytest.fixture(scope="module")
def qwen_map(pipe):
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        return pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**GENERATE, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_qwenimage_pipeline_gets_the_qwenimage_family(pipe):
    from act_core.families import FAMILIES, family_of_pipeline_class

    assert type(pipe).__name__ == "ACTQwenImagePipeline" and pipe.act_family.name == "qwenimage"
    assert (
        FAMILIES["qwenimage"] is pipe.act_family
        and family_of_pipeline_class("QwenImagePipeline") is pipe.act_family
    )
    assert pipe.act_family.hosts == ("diffusers", "comfyui")
    # The tiny tokenizer spells the template as Qwen's does: the pipeline drops exactly its system part.
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(TEMPLATE.format("a cat")).input_ids)
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_TOKENS
    assert tokens[:2] == ["<|im_start|>", "system"] and tokens[TEMPLATE_TOKENS - 2 : TEMPLATE_TOKENS] == [
        "user",
        "Ċ",
    ]


def test_default_preset_hooks_every_block_stream_along_the_guided_trajectory(pipe, qwen_map):
    # The last block's text output is read by nothing: it is not a module.
    assert list(qwen_map.modules) == [
        "transformer.transformer_blocks.0:text",
        "transformer.transformer_blocks.0:image",
        "transformer.transformer_blocks.1:image",
    ]
    assert set(qwen_map.widths.values()) == {pipe.transformer.inner_dim}
    meta = qwen_map.metadata
    assert meta["family"] == "qwenimage" and meta["preset"] == "transformer_blocks"
    assert meta["cfg_rows"] == "cond" and meta["causal_strategy"] == "exact"
    assert meta["sampling"]["guidance_scale"] == 4.0 and meta["sampling"]["negative_prompt"] == "blurry"
    # time-aware: one bucket (and one calibration gain) per step, the first at pure noise
    assert len(qwen_map.buckets) == 3 and max(qwen_map.buckets) == pytest.approx(1.0)
    assert len(meta["calibration_gains"]) == 3


@pytest.mark.parametrize("guidance, negative", [(4.0, None), (4.0, "blurry"), (1.0, "blurry")])
def test_the_fitting_rows_follow_qwenimagepipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter batches the negative prompt's rows with the prompt's (QwenImagePipeline calls the
    transformer twice a step and rescales the guided prediction), pads prompts of different lengths with
    masked tokens, and draws pair i's noise from seed + i: un-steered, each pair's latents end where the
    pipeline's do, generating from that seed. True CFG runs only with a negative prompt."""
    import contextlib

    import act_core.diffusers.qwenimage as adapter
    from act_core.diffusers.host import sampling_settings
    from act_core.workflow import TrajectoryRun

    class PlainSession:  # records nothing, transports nothing
        replayed, current_level = True, None

        @contextlib.contextmanager
        def call(self, level, *, source, target):
            yield

    ends, batches = [], []
    follow = adapter.follow_trajectory
    monkeypatch.setattr(adapter, "follow_trajectory", lambda *a, **k: ends.append(follow(*a, **k)))
    prompts = ["a red circle", "a blue square, striped"]  # different lengths: the shorter is padded
    settings = sampling_settings(pipe, pipe.act_family, adapter.ADAPTER, 3, guidance, 32, 32, negative, None)
    assert settings.guided == (guidance > 1 and negative is not None)
    run = TrajectoryRun(PlainSession(), prompts, prompts, 7, "steered", False, 2, lambda *a: None)
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        adapter.run_qwenimage_trajectory(pipe, run, settings)
    finally:
        handle.remove()
    assert set(batches) == {(3 if settings.guided else 2) * len(prompts)}  # [uncond;] target; source
    for i, prompt in enumerate(prompts):
        expected = generate(
            pipe,
            prompt,
            seed=7 + i,
            negative_prompt=negative,
            true_cfg_scale=guidance,
            output_type="latent",
        )
        torch.testing.assert_close(ends[0][i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_the_fits_guidance_is_the_pipelines_true_cfg_scale(pipe):
    """Without guidance_scale a fit takes the pipeline's own true_cfg_scale default (4.0), not its
    guidance_scale (None: a distilled-guidance input); without a negative prompt it runs no uncond rows."""
    import act_core.diffusers.qwenimage as adapter
    from act_core.diffusers.host import sampling_settings

    settings = sampling_settings(pipe, pipe.act_family, adapter.ADAPTER, 2, None, 32, 32, None, None)
    assert settings.guidance_scale == 4.0 and not settings.guided
    settings = sampling_settings(pipe, pipe.act_family, adapter.ADAPTER, 2, None, 32, 32, "", None)
    assert settings.guided  # an empty negative prompt turns true CFG on, as in the pipeline


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(pipe, qwen_map, tmp_path):
    plain = generate(pipe)
    pipe.enable_act(qwen_map, strength=0.0)
    at_zero = generate(pipe)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    pipe.disable_act()
    assert np.array_equal(at_zero, plain)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(generate(pipe), plain)
    loaded = ACTMap.load(qwen_map.save(tmp_path / "qwen.safetensors"))
    assert loaded.equal(qwen_map)
    pipe.enable_act(loaded, strength=1.0)
    try:
        assert np.array_equal(generate(pipe), steered)
    finally:
        pipe.disable_act()


def test_the_map_applies_at_another_step_count_and_without_guidance(pipe, qwen_map):
    for overrides in ({"num_inference_steps": 5}, {"negative_prompt": None}, {"true_cfg_scale": 1.0}):
        plain = generate(pipe, **overrides)
        pipe.enable_act(qwen_map, strength=1.0)
        try:
            steered = generate(pipe, **overrides)
        finally:
            pipe.disable_act()
        assert np.abs(steered - plain).max() > 1e-3
        assert np.array_equal(generate(pipe, **overrides), plain)


def test_a_cond_rows_map_leaves_the_negative_prompts_call_alone(pipe, qwen_map):
    """What the map was fitted for: at the first step (same latents with and without ACT) QwenImagePipeline's
    second transformer call, the negative prompt's, is the plain model's; without a negative prompt (no true
    CFG, one call a step) the prompt's only call is steered."""
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    try:
        for options in ({}, {"negative_prompt": None}):
            generate(pipe, num_inference_steps=1, **options)
            pipe.enable_act(qwen_map, strength=1.0)
            generate(pipe, num_inference_steps=1, **options)
            pipe.disable_act()
    finally:
        pipe.disable_act()
        handle.remove()
    plain_cond, plain_uncond, steered_cond, steered_uncond, plain_alone, steered_alone = outputs
    assert not torch.equal(steered_cond, plain_cond)
    assert torch.equal(steered_uncond, plain_uncond)
    assert not torch.equal(steered_alone, plain_alone)


def test_the_norm_preset(pipe):
    with pytest.warns(Warning):
        norms = pipe.fit_act(SOURCE, TARGET, preset="transformer_norms", progress=False, **SAMPLING)
    assert len(norms) == 2 * 4 and "transformer.transformer_blocks.1.txt_norm2" in norms.modules
    base = generate(pipe)
    pipe.enable_act(norms, strength=1.0)
    try:
        assert np.abs(generate(pipe) - base).max() > 1e-3
    finally:
        pipe.disable_act()


def test_qwenimage_maps_do_not_fold_and_refuse_clearly(pipe, qwen_map, tmp_path):
    from act_core.lora import export_lora

    with pytest.raises(ACTInputError, match="Unknown ACT preset 'pooled_text_and_blocks' for qwenimage"):
        pipe.fit_act(SOURCE, TARGET, preset="pooled_text_and_blocks", progress=False, **SAMPLING)
    with pytest.raises(ACTInputError, match="time-aware map .* cannot be folded"):
        pipe.fuse_act(qwen_map)
    assert pipe.act_map is None
    with pytest.raises(ACTInputError, match="Qwen-Image maps do not fold.*LoRA"):
        export_lora(qwen_map, pipe, tmp_path / "x.safetensors")
    with pytest.raises(ACTInputError, match="max_sequence_length"):
        pipe.fit_act(SOURCE, TARGET, progress=False, **{**SAMPLING, "max_sequence_length": 1025})


def test_cli_fits_a_qwenimage_folder_then_describes_and_sweeps_the_map(tmp_path, capsys):
    import json

    from PIL import Image

    from act_core.cli import main

    build_tiny_qwenimage(tmp_path / "qwen")
    out, grid = tmp_path / "map.safetensors", tmp_path / "grid.png"
    size = [
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--guidance",
        "4",
        "--negative-prompt",
        "blurry",
    ]
    args = ["fit", "--model", str(tmp_path / "qwen"), *size]
    args += ["--source-prompt", "a red circle", "--source-prompt", "a blue circle"]
    args += ["--target-prompt", "a red square", "--target-prompt", "a blue square"]
    assert main([*args, "--output", str(out), "-q"]) == 0, capsys.readouterr().err
    fitted = ACTMap.load(out)
    assert fitted.metadata["family"] == "qwenimage" and fitted.metadata["preset"] == "transformer_blocks"
    assert fitted.metadata["model"] == "QwenImagePipeline" and len(fitted.buckets) == 2
    assert fitted.metadata["sampling"]["negative_prompt"] == "blurry"
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model: QwenImagePipeline" in info and "cfg_rows: cond" in info and "buckets: 2" in info
    sweep = ["sweep", "-q", "--model", str(tmp_path / "qwen"), "--map", str(out), *size]
    sweep += ["--prompt", "a red circle", "--lambdas", "0,1", "--output", str(grid)]
    assert main(sweep) == 0, capsys.readouterr().err
    saved = json.loads(Image.open(grid).text["act_sweep"])
    # --guidance reaches the pipeline as its CFG scale, true_cfg_scale
    assert saved["generate"]["true_cfg_scale"] == 4.0 and "guidance_scale" not in saved["generate"]
