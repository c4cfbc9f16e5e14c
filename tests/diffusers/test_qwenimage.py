"""Qwen-Image through diffusers on a tiny QwenImagePipeline built offline (random weights)."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from tiny_qwenimage import TEMPLATE, TEMPLATE_TOKENS, build_tiny_qwenimage

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
    yield from fc.act_pipe(build_tiny_qwenimage(tmp_path_factory.mktemp("tiny_qwenimage")))


@pytest.fixture(scope="module")
def qwen_map(pipe):
    return fc.fit_warned(pipe, SAMPLING)  # warns: the tests' tokenizer does not know these words


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**GENERATE, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_qwenimage_pipeline_gets_the_qwenimage_family(pipe):
    fc.check_pipeline_family(pipe, "qwenimage", "QwenImagePipeline", ("diffusers", "comfyui"))
    # The tiny tokenizer spells the template as Qwen's does: the pipeline drops exactly its system part.
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(TEMPLATE.format("a cat")).input_ids)
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_TOKENS
    assert tokens[:2] == ["<|im_start|>", "system"] and tokens[TEMPLATE_TOKENS - 2 : TEMPLATE_TOKENS] == [
        "user",
        "Ċ",
    ]


def test_default_preset_hooks_every_block_stream_along_the_guided_trajectory(pipe, qwen_map):
    # The last block's text output is read by nothing: it is not a module.
    fc.check_time_aware_default_map(
        qwen_map,
        modules=[
            "transformer.transformer_blocks.0:text",
            "transformer.transformer_blocks.0:image",
            "transformer.transformer_blocks.1:image",
        ],
        width=pipe.transformer.inner_dim,
        family="qwenimage",
        cfg_rows="cond",
        sampling={"guidance_scale": 4.0, "negative_prompt": "blurry"},
    )


@pytest.mark.parametrize("guidance, negative", [(4.0, None), (4.0, "blurry"), (1.0, "blurry")])
def test_the_fitting_rows_follow_qwenimagepipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter batches the negative prompt's rows with the prompt's (QwenImagePipeline calls the
    transformer twice a step and rescales the guided prediction), pads prompts of different lengths with
    masked tokens, and draws pair i's noise from seed + i: un-steered, each pair's latents end where the
    pipeline's do, generating from that seed. True CFG runs only with a negative prompt."""
    import act_core.diffusers.qwenimage as adapter
    from act_core.diffusers.host import sampling_settings

    batches = []
    settings = sampling_settings(pipe, pipe.act_family, adapter.ADAPTER, 3, guidance, 32, 32, negative, None)
    assert settings.guided == (guidance > 1 and negative is not None)

    def run_trajectory(run):  # fc.PROMPTS have different lengths: the shorter is padded
        handle = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
        )
        try:
            adapter.run_qwenimage_trajectory(pipe, run, settings)
        finally:
            handle.remove()
        assert set(batches) == {(3 if settings.guided else 2) * len(fc.PROMPTS)}  # [uncond;] target; source

    def expected(seed, prompt):
        return generate(
            pipe,
            prompt,
            seed=seed,
            negative_prompt=negative,
            true_cfg_scale=guidance,
            output_type="latent",
        )

    fc.check_rows_follow_the_pipeline(monkeypatch, adapter, run_trajectory, expected)


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
    fc.check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
        pipe, qwen_map, generate, tmp_path / "qwen.safetensors"
    )


def test_the_map_applies_at_another_step_count_and_without_guidance(pipe, qwen_map):
    settings = ({"num_inference_steps": 5}, {"negative_prompt": None}, {"true_cfg_scale": 1.0})
    fc.check_the_map_applies_under(pipe, qwen_map, generate, settings)


def test_a_cond_rows_map_leaves_the_negative_prompts_call_alone(pipe, qwen_map):
    """What the map was fitted for: at the first step (same latents with and without ACT) QwenImagePipeline's
    second transformer call, the negative prompt's, is the plain model's; without a negative prompt (no true
    CFG, one call a step) the prompt's only call is steered."""
    outputs = fc.first_step_outputs(pipe, qwen_map, generate, options=({}, {"negative_prompt": None}))
    plain_cond, plain_uncond, steered_cond, steered_uncond, plain_alone, steered_alone = outputs
    assert not torch.equal(steered_cond, plain_cond)
    assert torch.equal(steered_uncond, plain_uncond)
    assert not torch.equal(steered_alone, plain_alone)


def test_the_norm_preset(pipe):
    norms = fc.fit_warned(pipe, SAMPLING, preset="transformer_norms")
    assert len(norms) == 2 * 4 and "transformer.transformer_blocks.1.txt_norm2" in norms.modules
    fc.check_the_map_steers(pipe, norms, generate)


def test_qwenimage_maps_do_not_fold_and_refuse_clearly(pipe, qwen_map, tmp_path):
    fc.check_unknown_preset_refused(pipe, "pooled_text_and_blocks", "qwenimage", SAMPLING)
    fc.check_maps_do_not_fold(pipe, qwen_map, tmp_path, "Qwen-Image")
    fc.check_too_long_prompts_refused(pipe, SAMPLING, 1025)


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
    fc.check_cli_fit_and_info(
        capsys,
        tmp_path / "qwen",
        out,
        size,
        family="qwenimage",
        model="QwenImagePipeline",
        cfg_rows="cond",
        sampling={"negative_prompt": "blurry"},
    )
    sweep = ["sweep", "-q", "--model", str(tmp_path / "qwen"), "--map", str(out), *size]
    sweep += ["--prompt", "a red circle", "--lambdas", "0,1", "--output", str(grid)]
    assert main(sweep) == 0, capsys.readouterr().err
    saved = json.loads(Image.open(grid).text["act_sweep"])
    # --guidance reaches the pipeline as its CFG scale, true_cfg_scale
    assert saved["generate"]["true_cfg_scale"] == 4.0 and "guidance_scale" not in saved["generate"]


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, qwen_map):
    fc.check_split_calls_give_the_one_call_map(pipe, qwen_map, SAMPLING)
