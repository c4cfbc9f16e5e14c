"""Stable Diffusion 3 through diffusers on a tiny StableDiffusion3Pipeline built offline (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_sd3 import build_tiny_sd3

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
    "max_sequence_length": 16,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))
    base.set_progress_bar_config(disable=True)
    wrapped = act_pipeline(base)
    yield wrapped
    wrapped.disable_act()


@pytest.fixture(scope="module")
def sd3_map(pipe):
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        return pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


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
    plain = generate(pipe)
    pipe.enable_act(sd3_map, strength=0.0)
    at_zero = generate(pipe)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    pipe.disable_act()
    assert np.array_equal(at_zero, plain)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(generate(pipe), plain)
    path = tmp_path / "sd3.safetensors"
    sd3_map.save(path)
    loaded = ACTMap.load(path)
    pipe.enable_act(loaded, strength=1.0)
    try:
        assert np.array_equal(generate(pipe), steered)
    finally:
        pipe.disable_act()


def test_the_reference_style_preset_and_clear_refusals(pipe, sd3_map, tmp_path):
    from act_core.lora import export_lora

    with pytest.warns(Warning):
        blocks = pipe.fit_act(SOURCE, TARGET, preset="transformer_blocks", progress=False, **SAMPLING)
    assert "transformer.time_text_embed.text_embedder" not in blocks.modules and len(blocks) == 5
    with pytest.raises(ACTInputError, match="Unknown ACT preset 'unet_norms' for sd3"):
        pipe.fit_act(SOURCE, TARGET, preset="unet_norms", progress=False, **SAMPLING)
    with pytest.raises(ACTInputError, match="time-aware map .* cannot be folded"):
        pipe.fuse_act(sd3_map)
    assert pipe.act_map is None
    with pytest.raises(ACTInputError, match="SD3 maps do not fold.*LoRA"):
        export_lora(sd3_map, pipe, tmp_path / "x.safetensors")


def test_cli_fits_an_sd3_folder_with_the_sd3_default(tmp_path, capsys):
    from act_core.cli import main

    build_tiny_sd3(tmp_path / "sd3")
    out = tmp_path / "map.safetensors"
    args = ["fit", "--model", str(tmp_path / "sd3"), "--steps", "2", "--height", "32", "--width", "32"]
    args += ["--guidance", "4", "--source-prompt", "a red circle", "--source-prompt", "a blue circle"]
    args += ["--target-prompt", "a red square", "--target-prompt", "a blue square"]
    assert main([*args, "--max-sequence-length", "16", "--output", str(out), "-q"]) == 0
    assert "act fit: warning: The tokenizer does not know" in capsys.readouterr().err
    fitted = ACTMap.load(out)
    assert fitted.metadata["family"] == "sd3" and fitted.metadata["preset"] == "pooled_text_and_blocks"
    assert fitted.metadata["sampling"]["max_sequence_length"] == 16 and len(fitted.buckets) == 2
