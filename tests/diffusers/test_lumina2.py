"""Lumina 2 through diffusers on a tiny Lumina2Pipeline built offline (random weights)."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from tiny_lumina2 import build_tiny_lumina2

# Lumina2Pipeline needs sizes in multiples of 16 (its VAE factor 8, 2x2 patches): a 8x8 latent, 16 image tokens
SAMPLING = {"num_inference_steps": 3, "height": 64, "width": 64, "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    yield from fc.act_pipe(build_tiny_lumina2(tmp_path_factory.mktemp("tiny_lumina2")))


@pytest.fixture(scope="module")
def lumina_map(pipe):
    return fc.fit_warned(pipe, SAMPLING)  # warns: the tests' tokenizer does not know these words


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_lumina2_pipeline_gets_the_lumina2_family(pipe):
    fc.check_pipeline_family(pipe, "lumina2", "Lumina2Pipeline", ("diffusers", "comfyui"))


def test_default_preset_hooks_the_caption_stream_along_the_guided_trajectory(pipe, lumina_map):
    """The default, caption_stream (as Z-Image's): every context refiner block's output."""
    fc.check_time_aware_default_map(
        lumina_map,
        modules=["transformer.context_refiner.0:text"],
        width=pipe.transformer.config.hidden_size,
        family="lumina2",
        cfg_rows="cond",
        sampling={"guidance_scale": 4.0},
        preset="caption_stream",
    )


@pytest.mark.parametrize("guidance, negative", [(4.0, None), (4.0, "blurry"), (1.0, None)])
def test_the_fitting_rows_follow_lumina2pipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter batches the uncond rows with the prompt's (Lumina2Pipeline calls the transformer twice a
    step), and guides with the pipeline's CFG normalisation; un-steered, each pair's latents end where the
    pipeline's do from the same noise."""
    import act_core.diffusers.lumina2 as adapter
    from act_core.sampling import SamplingSettings

    settings = SamplingSettings(3, guidance, 64, 64, negative)

    def expected(seed, prompt):
        noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed))[None]
        return generate(
            pipe,
            prompt,
            latents=noise,
            negative_prompt=negative,
            guidance_scale=guidance,
            output_type="latent",
        )

    fc.check_rows_follow_the_pipeline(
        monkeypatch, adapter, lambda run: adapter.run_lumina2_trajectory(pipe, run, settings), expected
    )


def test_the_step_gate_reads_the_noise_level_off_lumina2s_reversed_timestep(pipe, lumina_map):
    """Lumina2Pipeline gives its transformer 1 - sigma: the gate's noise level is sigma (1 at the first step),
    so the map's first bucket steers the first step and a window ending at 0.5 leaves the last step alone."""
    fc.check_the_step_gate_reads_sigma(pipe, lumina_map, generate, guidance_scale=1.0)


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe, lumina_map, tmp_path
):
    fc.check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
        pipe, lumina_map, generate, tmp_path / "lumina2.safetensors"
    )


def test_the_map_applies_at_another_step_count_and_without_guidance(pipe, lumina_map):
    fc.check_the_map_applies_under(
        pipe, lumina_map, generate, ({"num_inference_steps": 5}, {"guidance_scale": 1.0})
    )


def test_a_cond_rows_map_leaves_the_negative_prompts_call_alone(pipe, lumina_map):
    """At the first step (same latents with and without ACT) Lumina2Pipeline's second transformer call, the
    negative prompt's, is the plain model's."""
    fc.check_a_cond_rows_map_leaves_the_negative_call_alone(pipe, lumina_map, generate)


def test_other_presets_and_refusals(pipe, lumina_map, tmp_path):
    blocks = fc.fit_warned(pipe, SAMPLING, preset="transformer_blocks")
    assert list(blocks.modules) == ["transformer.layers.0:joint", "transformer.layers.1:joint"]
    fc.check_the_map_steers(pipe, blocks, generate)
    norms = fc.fit_warned(pipe, SAMPLING, preset="transformer_norms")
    assert list(norms.modules) == [
        f"transformer.layers.{i}.{norm}" for i in range(2) for norm in ("norm1.norm", "ffn_norm1")
    ]
    fc.check_the_map_steers(pipe, norms, generate)
    fc.check_unknown_preset_refused(pipe, "pooled_text_and_blocks", "lumina2", SAMPLING)
    fc.check_maps_do_not_fold(pipe, lumina_map, tmp_path, "Lumina 2")
    fc.check_too_long_prompts_refused(pipe, SAMPLING, 300)


def test_cli_fits_a_lumina2_folder_with_the_lumina2_default(tmp_path, capsys):
    build_tiny_lumina2(tmp_path / "lumina2")
    fc.check_cli_fit_and_info(
        capsys,
        tmp_path / "lumina2",
        tmp_path / "map.safetensors",
        ["--steps", "2", "--height", "64", "--width", "64", "--guidance", "4"],
        family="lumina2",
        model="Lumina2Pipeline",
        cfg_rows="cond",
        preset="caption_stream",
    )


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, lumina_map):
    fc.check_split_calls_give_the_one_call_map(pipe, lumina_map, SAMPLING)
