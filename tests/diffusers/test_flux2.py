"""FLUX.2 through diffusers on a tiny Flux2Pipeline built offline (random weights)."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from family_checks import SOURCE, TARGET
from tiny_flux2 import MAX_SEQUENCE_LENGTH, build_tiny_flux2

from act_core.errors import ACTInputError

SAMPLING = {
    "num_inference_steps": 3,
    "height": 32,
    "width": 32,
    "guidance_scale": 4.0,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    yield from fc.act_pipe(build_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2")))


@pytest.fixture(scope="module")
def flux2_map(pipe):
    return fc.fit_warned(pipe, SAMPLING)  # warns: the tests' tokenizer does not know these words


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    # Flux2Pipeline's first positional argument is an image: the prompt goes by name
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_flux2_pipeline_gets_the_flux2_family(pipe):
    fc.check_pipeline_family(pipe, "flux2", "Flux2Pipeline", ("diffusers",))
    assert not pipe.act_family.cfg_batch
    # the guidance scale is embedded (FLUX.2 [dev]); no pooled text vector reaches the modulation
    assert pipe.transformer.time_guidance_embed.guidance_embedder is not None
    assert "transformer.time_text_embed.text_embedder" not in pipe.act_modules(["transformer"])


def test_default_preset_hooks_every_block_stream_along_the_trajectory(pipe, flux2_map):
    # the joint stream is the single block's own output: text and image tokens, at the transformer's width
    fc.check_time_aware_default_map(
        flux2_map,
        modules=[
            "transformer.transformer_blocks.0:text",
            "transformer.transformer_blocks.0:image",
            "transformer.transformer_blocks.1:text",
            "transformer.transformer_blocks.1:image",
            "transformer.single_transformer_blocks.0:joint",
            "transformer.single_transformer_blocks.1:joint",
        ],
        width=pipe.transformer.inner_dim,
        family="flux2",
        cfg_rows="all",
        sampling={"max_sequence_length": MAX_SEQUENCE_LENGTH, "guidance_scale": 4.0},
    )


@pytest.mark.parametrize("guidance, steps", [(4.0, 3), (2.5, 4)])
def test_the_fitting_rows_follow_flux2pipelines_own_trajectory(pipe, monkeypatch, guidance, steps):
    """Un-steered, each pair's latents end where Flux2Pipeline's do from the same noise: the same prompt
    encoding, noise, schedule (its empirical mu), timestep and embedded guidance."""
    import act_core.diffusers.adapter as shared  # every adapter's loop runs through it (follow_scheduler)
    import act_core.diffusers.flux2 as adapter
    from act_core.sampling import SamplingSettings

    settings = SamplingSettings(steps, guidance, 32, 32, None, MAX_SEQUENCE_LENGTH, cfg_batch=False)

    def expected(seed, prompt):  # the pipeline draws its own noise from a generator seeded 7 + i
        return generate(
            pipe, prompt, seed=seed, guidance_scale=guidance, num_inference_steps=steps, output_type="latent"
        )

    fc.check_rows_follow_the_pipeline(
        monkeypatch, shared, lambda run: adapter.run_flux2_trajectory(pipe, run, settings), expected
    )


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(pipe, flux2_map, tmp_path):
    fc.check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
        pipe, flux2_map, generate, tmp_path / "flux2.safetensors"
    )


def test_the_map_applies_at_another_step_count_and_guidance(pipe, flux2_map):
    fc.check_the_map_applies_under(
        pipe, flux2_map, generate, ({"num_inference_steps": 5}, {"guidance_scale": 2.0})
    )


def test_the_norm_preset(pipe):
    norms = fc.fit_warned(pipe, SAMPLING, preset="transformer_norms")
    assert len(norms) == 2 * 4 + 2 and "transformer.single_transformer_blocks.1.norm" in norms.modules
    assert "transformer.transformer_blocks.0.norm1_context" in norms.modules
    fc.check_the_map_steers(pipe, norms, generate)


def test_flux2_maps_do_not_fold_and_refuse_clearly(pipe, flux2_map, tmp_path):
    for preset in ("pooled_text_and_blocks", "text_encoder_norms"):
        fc.check_unknown_preset_refused(pipe, preset, "flux2", SAMPLING)
    fc.check_maps_do_not_fold(pipe, flux2_map, tmp_path, "FLUX.2")
    fc.check_too_long_prompts_refused(pipe, SAMPLING, 513)
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
    fc.check_cli_fit_and_info(
        capsys,
        tmp_path / "flux2",
        out,
        [*size, "--max-sequence-length", str(MAX_SEQUENCE_LENGTH)],
        family="flux2",
        model="Flux2Pipeline",
        cfg_rows="all",
        sampling={"max_sequence_length": MAX_SEQUENCE_LENGTH},
    )
    # the sweep passes the prompt by name: Flux2Pipeline's first positional argument is an image (the sweep
    # has no --max-sequence-length: it generates at the pipeline's 512)
    sweep = ["sweep", "-q", "--model", str(tmp_path / "flux2"), "--map", str(out), *size]
    sweep += ["--prompt", "a red circle", "--lambdas", "0,1", "--output", str(grid)]
    assert main(sweep) == 0, capsys.readouterr().err
    assert grid.exists()


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, flux2_map):
    fc.check_split_calls_give_the_one_call_map(pipe, flux2_map, SAMPLING)
