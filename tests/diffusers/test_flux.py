"""FLUX.1 through diffusers on a tiny FluxPipeline built offline (random weights)."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from family_checks import SOURCE, TARGET
from tiny_flux import MAX_SEQUENCE_LENGTH, build_tiny_flux

from act_core import ACTMap
from act_core.diffusers import act_pipeline
from act_core.errors import ACTInputError

SAMPLING = {"num_inference_steps": 3, "height": 32, "width": 32, "max_sequence_length": MAX_SEQUENCE_LENGTH}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    yield from fc.act_pipe(build_tiny_flux(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="module")
def block_map(pipe):
    return pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


def generate(pipe, steps=3, seed=0):
    return pipe(
        "a red circle",
        num_inference_steps=steps,
        height=32,
        width=32,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def test_flux_pipeline_gets_the_flux_mixin(pipe):
    assert type(pipe).__name__ == "ACTFluxPipeline" and pipe.act_family.name == "flux"


def test_default_preset_hooks_the_pooled_text_and_every_block_stream_along_the_trajectory(pipe, block_map):
    names = list(block_map.modules)
    assert names[:3] == [
        "transformer.time_text_embed.text_embedder",
        "transformer.transformer_blocks.0:text",
        "transformer.transformer_blocks.0:image",
    ]
    assert "transformer.single_transformer_blocks.1:joint" in names and len(names) == 1 + 2 * 2 + 2
    assert len(block_map.buckets) == 3 and max(block_map.buckets) == pytest.approx(1.0)
    meta = block_map.metadata
    assert (
        meta["family"] == "flux" and meta["preset"] == "pooled_text_and_blocks" and meta["cfg_rows"] == "all"
    )
    assert (
        meta["sampling"]["max_sequence_length"] == MAX_SEQUENCE_LENGTH and meta["causal_strategy"] == "exact"
    )
    assert len(meta["calibration_gains"]) == 3


def test_lambda_zero_is_exact_one_steers_disable_restores(pipe, block_map, tmp_path):
    for steps in (3, 5):
        fc.check_zero_is_exact_one_steers_disable_restores(
            pipe, block_map, lambda pipe, steps=steps: generate(pipe, steps)
        )
    loaded = ACTMap.load(block_map.save(tmp_path / "flux.safetensors"))
    assert loaded.equal(block_map)


def test_norm_and_text_encoder_presets(pipe):
    norms = pipe.fit_act(SOURCE, TARGET, preset="transformer_norms", progress=False, **SAMPLING)
    assert "transformer.transformer_blocks.0.norm1.norm" in norms.modules
    assert "transformer.single_transformer_blocks.0.norm.norm" in norms.modules
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        text = pipe.fit_act(SOURCE, TARGET, preset="text_encoder_norms", progress=False, **SAMPLING)
    finally:
        handle.remove()
    assert calls == [] and text.parts() == ["text_encoder", "text_encoder_2"]
    assert any(name.startswith("text_encoder_2.encoder.block.") for name in text.modules)
    fc.check_the_map_steers(pipe, text, generate)


def test_flux_maps_do_not_fold_and_refuse_clearly(pipe, block_map, tmp_path):
    from act_core.lora import export_lora

    with pytest.raises(ACTInputError, match="time-aware|cannot be folded|fold"):
        pipe.fuse_act(block_map)
    with pytest.raises(ACTInputError, match="LoRA"):
        export_lora(block_map, pipe, tmp_path / "x.safetensors")
    assert pipe.act_map is None


def test_cli_fits_a_flux_folder_with_the_flux_default(tmp_path, capsys):
    from act_core.cli import main

    build_tiny_flux(tmp_path / "flux")
    common = ["fit", "--model", str(tmp_path / "flux"), "--steps", "2", "--height", "32", "--width", "32"]
    prompts = fc.CLI_PROMPTS
    out = tmp_path / "map.safetensors"
    assert main([*common, *prompts, "--max-sequence-length", "16", "--output", str(out), "-q"]) == 0
    fitted = ACTMap.load(out)
    assert fitted.metadata["preset"] == "pooled_text_and_blocks" and fitted.metadata["family"] == "flux"
    assert main([*common, *prompts, "--negative-prompt", "blurry", "--output", str(out), "-q"]) == 2
    assert "without a CFG batch" in capsys.readouterr().err


def test_flux_dev_style_guidance_embedding_fits_and_steers(tmp_path):
    """FLUX.1-dev embeds guidance (``CombinedTimestepGuidanceTextProjEmbeddings``) instead of running a CFG
    batch: the default preset still finds the pooled-text projection, fits at the dev guidance, and steers;
    strength 0 is the plain pipeline bit for bit and disable restores it."""
    base = build_tiny_flux(tmp_path / "dev", seed=1, guidance_embeds=True)
    base.set_progress_bar_config(disable=True)
    assert type(base.transformer.time_text_embed).__name__ == "CombinedTimestepGuidanceTextProjEmbeddings"
    dev = act_pipeline(base)
    settings = {**SAMPLING, "guidance_scale": 3.5}
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        act_map = dev.fit_act(SOURCE, TARGET, progress=False, **settings)
    assert "transformer.time_text_embed.text_embedder" in act_map.modules
    assert act_map.metadata["sampling"]["guidance_scale"] == 3.5 and len(act_map.buckets) == 3

    def image(pipe):
        return pipe(
            "a red circle",
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **settings,
        ).images

    fc.check_zero_is_exact_one_steers_disable_restores(dev, act_map, image)


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, block_map):
    fc.check_split_calls_give_the_one_call_map(pipe, block_map, SAMPLING)
