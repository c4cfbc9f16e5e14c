"""Stable Diffusion 3 through diffusers on a tiny StableDiffusion3Pipeline built offline (random weights)."""

from __future__ import annotations

import family_checks as fc
import pytest
import torch
from tiny_sd3 import build_tiny_sd3

from act_core import ACTMap

SAMPLING = {
    "num_inference_steps": 3,
    "height": 32,
    "width": 32,
    "guidance_scale": 4.0,
    "max_sequence_length": 16,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    yield from fc.act_pipe(build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def sd3_map(pipe):
    return fc.fit_warned(pipe, SAMPLING)  # warns: the tests' tokenizer does not know these words


def generate(pipe, seed=0):
    return pipe(
        "a red circle", generator=torch.Generator().manual_seed(seed), output_type="np", **SAMPLING
    ).images


def test_default_preset_hooks_the_pooled_text_and_every_block_stream_along_the_guided_trajectory(
    pipe, sd3_map
):
    assert type(pipe).__name__ == "ACTStableDiffusion3Pipeline" and pipe.act_family.name == "sd3"
    names = list(sd3_map.modules)
    assert names[0] == "transformer.time_text_embed.text_embedder"
    # 3 blocks: text + image streams of the first two, the last (context_pre_only) has an image stream only
    assert names[1:] == [
        "transformer.transformer_blocks.0:text",
        "transformer.transformer_blocks.0:image",
        "transformer.transformer_blocks.1:text",
        "transformer.transformer_blocks.1:image",
        "transformer.transformer_blocks.2:image",
    ]
    meta = sd3_map.metadata
    assert (
        meta["family"] == "sd3" and meta["preset"] == "pooled_text_and_blocks" and meta["cfg_rows"] == "cond"
    )
    assert len(sd3_map.buckets) == 3 and meta["causal_strategy"] == "exact"
    assert len(meta["calibration_gains"]) == 3


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(pipe, sd3_map, tmp_path):
    fc.check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
        pipe, sd3_map, generate, tmp_path / "sd3.safetensors"
    )


def test_the_reference_style_preset_and_clear_refusals(pipe, sd3_map, tmp_path):
    blocks = fc.fit_warned(pipe, SAMPLING, preset="transformer_blocks")
    assert "transformer.time_text_embed.text_embedder" not in blocks.modules and len(blocks) == 5
    fc.check_unknown_preset_refused(pipe, "unet_norms", "sd3", SAMPLING)
    fc.check_maps_do_not_fold(pipe, sd3_map, tmp_path, "SD3")


def test_cli_fits_an_sd3_folder_with_the_sd3_default(tmp_path, capsys):
    from act_core.cli import main

    build_tiny_sd3(tmp_path / "sd3")
    out = tmp_path / "map.safetensors"
    args = ["fit", "--model", str(tmp_path / "sd3"), "--steps", "2", "--height", "32", "--width", "32"]
    args += ["--guidance", "4", *fc.CLI_PROMPTS]
    assert main([*args, "--max-sequence-length", "16", "--output", str(out), "-q"]) == 0
    assert "act fit: warning: The tokenizer does not know" in capsys.readouterr().err
    fitted = ACTMap.load(out)
    assert fitted.metadata["family"] == "sd3" and fitted.metadata["preset"] == "pooled_text_and_blocks"
    assert fitted.metadata["sampling"]["max_sequence_length"] == 16 and len(fitted.buckets) == 2


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, sd3_map):
    fc.check_split_calls_give_the_one_call_map(pipe, sd3_map, SAMPLING)
