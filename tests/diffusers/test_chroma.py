"""Chroma through diffusers on a tiny ChromaPipeline built offline (random weights)."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from tiny_chroma import MAX_SEQUENCE_LENGTH, build_tiny_chroma

SAMPLING = {
    "num_inference_steps": 3,
    "height": 32,
    "width": 32,
    "guidance_scale": 4.0,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    yield from fc.act_pipe(build_tiny_chroma(tmp_path_factory.mktemp("tiny_chroma")))


@pytest.fixture(scope="module")
def chroma_map(pipe):
    return fc.fit_warned(pipe, SAMPLING)  # warns: the tests' tokenizer does not know these words


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_chroma_pipeline_gets_the_chroma_family(pipe):
    # ComfyUI: tests/comfyui/test_comfy_chroma.py
    fc.check_pipeline_family(pipe, "chroma", "ChromaPipeline", ("diffusers", "comfyui"))


def test_default_preset_hooks_every_block_stream_along_the_guided_trajectory(pipe, chroma_map):
    # the joint stream is the single block's own output: text and image tokens, at the transformer's width
    fc.check_time_aware_default_map(
        chroma_map,
        modules=[
            "transformer.transformer_blocks.0:text",
            "transformer.transformer_blocks.0:image",
            "transformer.transformer_blocks.1:text",
            "transformer.transformer_blocks.1:image",
            "transformer.single_transformer_blocks.0:joint",
            "transformer.single_transformer_blocks.1:joint",
        ],
        width=pipe.transformer.inner_dim,
        family="chroma",
        cfg_rows="cond",
        sampling={"max_sequence_length": MAX_SEQUENCE_LENGTH, "guidance_scale": 4.0},
    )


@pytest.mark.parametrize("guidance, negative", [(4.0, None), (4.0, "blurry"), (1.0, None)])
def test_the_fitting_rows_follow_chromapipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter batches the uncond rows with the prompt's (ChromaPipeline calls the transformer twice a
    step); un-steered, each pair's latents end where the pipeline's do from the same noise."""
    import act_core.diffusers.adapter as shared  # every adapter's loop runs through it (follow_scheduler)
    import act_core.diffusers.chroma as adapter
    from act_core.sampling import SamplingSettings

    settings = SamplingSettings(3, guidance, 32, 32, negative, MAX_SEQUENCE_LENGTH)

    def expected(seed, prompt):
        noise = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(seed))[None]
        latents = pipe._pack_latents(noise, 1, 4, 16, 16)
        return generate(
            pipe,
            prompt,
            latents=latents,
            negative_prompt=negative,
            guidance_scale=guidance,
            output_type="latent",
        )

    fc.check_rows_follow_the_pipeline(
        monkeypatch, shared, lambda run: adapter.run_chroma_trajectory(pipe, run, settings), expected
    )


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe, chroma_map, tmp_path
):
    fc.check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
        pipe, chroma_map, generate, tmp_path / "chroma.safetensors"
    )


def test_the_map_applies_at_another_step_count_and_without_guidance(pipe, chroma_map):
    fc.check_the_map_applies_under(
        pipe, chroma_map, generate, ({"num_inference_steps": 5}, {"guidance_scale": 1.0})
    )


def test_norm_and_text_encoder_presets(pipe):
    norms = fc.fit_warned(pipe, SAMPLING, preset="transformer_norms")
    assert len(norms) == 2 * 4 + 2 and "transformer.single_transformer_blocks.1.norm.norm" in norms.modules
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        text = fc.fit_warned(pipe, SAMPLING, preset="text_encoder_norms")
    finally:
        handle.remove()
    assert calls == [] and text.parts() == ["text_encoder"] and text.metadata["cfg_rows"] == "all"
    assert "text_encoder.encoder.final_layer_norm" in text.modules
    fc.check_the_map_steers(pipe, text, generate)


def test_the_t5_mask_of_the_text_runner_is_the_tokenizers(pipe):
    from act_core.diffusers.chroma import _t5_mask

    prompts = ["a red circle", "a much longer prompt, which the tokenizer truncates at its thirty-two tokens"]
    encoded = pipe.tokenizer(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True)
    ids = torch.tensor(encoded.input_ids)
    assert torch.equal(_t5_mask(ids, pipe.tokenizer.eos_token_id), torch.tensor(encoded.attention_mask))


def test_chroma_maps_do_not_fold_and_refuse_clearly(pipe, chroma_map, tmp_path):
    fc.check_unknown_preset_refused(pipe, "pooled_text_and_blocks", "chroma", SAMPLING)
    fc.check_maps_do_not_fold(pipe, chroma_map, tmp_path, "Chroma")
    fc.check_too_long_prompts_refused(pipe, SAMPLING, 513)


def test_a_cond_rows_map_leaves_the_negative_prompts_call_alone(pipe, chroma_map):
    """What the map was fitted for: at the first step (same latents with and without ACT) ChromaPipeline's
    second transformer call, the negative prompt's, is the plain model's."""
    fc.check_a_cond_rows_map_leaves_the_negative_call_alone(pipe, chroma_map, generate)


def test_cli_fits_a_chroma_folder_with_the_chroma_default(tmp_path, capsys):
    build_tiny_chroma(tmp_path / "chroma")
    options = ["--steps", "2", "--height", "32", "--width", "32", "--guidance", "4"]
    fc.check_cli_fit_and_info(
        capsys,
        tmp_path / "chroma",
        tmp_path / "map.safetensors",
        [*options, "--max-sequence-length", str(MAX_SEQUENCE_LENGTH)],
        family="chroma",
        model="ChromaPipeline",
        cfg_rows="cond",
        sampling={"max_sequence_length": MAX_SEQUENCE_LENGTH},
    )


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, chroma_map):
    fc.check_split_calls_give_the_one_call_map(pipe, chroma_map, SAMPLING)
