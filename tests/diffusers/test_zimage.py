"""Z-Image through diffusers on a tiny ZImagePipeline built offline (random weights)."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from tiny_zimage import build_tiny_zimage

# ZImagePipeline's guidance_scale is the excess over the prompt's prediction: 3 guides as 4 does elsewhere
SAMPLING = {"num_inference_steps": 3, "height": 32, "width": 32, "guidance_scale": 3.0}
TURBO = {**SAMPLING, "guidance_scale": 0.0}  # how Z-Image-Turbo samples: no CFG


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    yield from fc.act_pipe(build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage")))


@pytest.fixture(scope="module")
def zimage_map(pipe):
    return fc.fit_warned(pipe, SAMPLING)  # warns: the tests' tokenizer does not know these words


@pytest.fixture(scope="module")
def turbo_map(pipe):
    return fc.fit_warned(pipe, TURBO)


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_zimage_pipeline_gets_the_zimage_family(pipe):
    # ComfyUI loads Z-Image as Lumina 2's NextDiT
    fc.check_pipeline_family(pipe, "zimage", "ZImagePipeline", ("diffusers",))


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


def test_default_preset_hooks_the_caption_stream_along_the_trajectory(pipe, zimage_map, turbo_map):
    """The default, caption_stream: every context refiner block's output (the caption tokens alone)."""
    for act_map, guidance in ((zimage_map, 3.0), (turbo_map, 0.0)):
        fc.check_time_aware_default_map(
            act_map,
            modules=["transformer.context_refiner.0:text"],
            width=pipe.transformer.dim,
            family="zimage",
            cfg_rows="cond",
            sampling={"guidance_scale": guidance},
            preset="caption_stream",
        )


@pytest.mark.parametrize("guidance, negative", [(3.0, None), (3.0, "blurry"), (0.0, None)])
def test_the_fitting_rows_follow_zimagepipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """The adapter's rows ([uncond; target; source] where ZImagePipeline has [cond; uncond]) and its guide
    rule; un-steered, each pair's latents end where the pipeline's do from the same noise."""
    import act_core.diffusers.zimage as adapter
    from act_core.sampling import SamplingSettings

    settings = SamplingSettings(3, guidance, 32, 32, negative, cfg_threshold=0.0)

    def expected(seed, prompt):
        noise = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(seed))[None]
        return generate(
            pipe,
            prompt,
            latents=noise,
            negative_prompt=negative,
            guidance_scale=guidance,
            output_type="latent",
        )

    fc.check_rows_follow_the_pipeline(
        monkeypatch, adapter, lambda run: adapter.run_zimage_trajectory(pipe, run, settings), expected
    )


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe, zimage_map, tmp_path
):
    fc.check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
        pipe, zimage_map, generate, tmp_path / "zimage.safetensors"
    )


def test_the_turbo_map_steers_unguided_sampling_and_another_step_count(pipe, turbo_map):
    fc.check_the_map_applies_under(pipe, turbo_map, generate, (TURBO, {**TURBO, "num_inference_steps": 5}))


def test_a_cond_rows_map_steers_the_first_half_of_zimages_cfg_batch(pipe, zimage_map):
    """ZImagePipeline's CFG batch is [cond; uncond]: at the first step (same latents with and without ACT)
    the prompt's rows are steered and the negative prompt's are the plain model's."""
    outputs = fc.first_step_outputs(
        pipe, zimage_map, generate, record=lambda output: [row.clone() for row in output[0]]
    )
    (plain_cond, plain_uncond), (steered_cond, steered_uncond) = outputs
    assert not torch.equal(steered_cond, plain_cond)
    assert torch.equal(steered_uncond, plain_uncond)


def test_the_step_gate_reads_the_noise_level_off_zimages_reversed_timestep(pipe, turbo_map):
    fc.check_the_step_gate_reads_sigma(pipe, turbo_map, generate, **TURBO)


def test_other_presets_and_refusals(pipe, zimage_map, tmp_path):
    blocks = fc.fit_warned(pipe, TURBO, preset="transformer_blocks")
    assert list(blocks.modules) == ["transformer.layers.0:joint", "transformer.layers.1:joint"]
    fc.check_the_map_steers(pipe, blocks, generate, **TURBO)
    norms = fc.fit_warned(pipe, TURBO, preset="transformer_norms")
    assert list(norms.modules) == [
        f"transformer.layers.{i}.{norm}" for i in range(2) for norm in ("attention_norm1", "ffn_norm1")
    ]
    fc.check_the_map_steers(pipe, norms, generate, **TURBO)
    fc.check_maps_do_not_fold(pipe, zimage_map, tmp_path, "Z-Image")
    fc.check_too_long_prompts_refused(pipe, SAMPLING, 993)


def test_cli_fits_a_zimage_folder_with_the_zimage_default(tmp_path, capsys):
    build_tiny_zimage(tmp_path / "zimage")
    fc.check_cli_fit_and_info(
        capsys,
        tmp_path / "zimage",
        tmp_path / "map.safetensors",
        ["--steps", "2", "--height", "32", "--width", "32", "--guidance", "0"],
        family="zimage",
        model="ZImagePipeline",
        cfg_rows="cond",
        sampling={"guidance_scale": 0.0},
        preset="caption_stream",
    )


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, zimage_map):
    fc.check_split_calls_give_the_one_call_map(pipe, zimage_map, SAMPLING)
