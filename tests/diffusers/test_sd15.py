"""SD 1.5 and SD 2.x through diffusers (``StableDiffusionPipeline``, served by the SDXL family) on tiny pipelines
built offline: one CLIP text encoder, no pooled route (``tests/tiny_sd15.py``)."""

from __future__ import annotations

import warnings

import family_checks as fc
import numpy as np
import pytest
import torch
from family_checks import SOURCE, TARGET
from safetensors.torch import load_file
from tiny_sd15 import build_tiny_sd2, build_tiny_sd15

from act_core import ACTMap

SAMPLING = {"num_inference_steps": 3, "height": 32, "width": 32}
BUILDERS = {"sd15": build_tiny_sd15, "sd2": build_tiny_sd2}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pipe(request, tmp_path_factory):
    yield from fc.act_pipe(BUILDERS[request.param](tmp_path_factory.mktemp(f"tiny_{request.param}")))


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    yield from fc.act_pipe(build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15_only")))


def fit(pipe, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tests' tokenizer does not know these words
        return pipe.fit_act(SOURCE, TARGET, progress=False, **{**SAMPLING, **options})


@pytest.fixture(scope="module")
def default_map(pipe):
    return fit(pipe)


def generate(pipe, prompt="a red circle", seed=0, **overrides):
    options = {**SAMPLING, "output_type": "np", **overrides}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **options).images


def test_stable_diffusion_pipeline_is_served_by_the_sdxl_family(pipe):
    from act_core.families import SDXL, family_of_pipeline_class

    assert type(pipe).__name__ == "ACTStableDiffusionPipeline" and pipe.act_family is SDXL
    assert family_of_pipeline_class("StableDiffusionPipeline") is SDXL
    assert getattr(pipe, "text_encoder_2", None) is None  # one CLIP encoder, no pooled vector
    assert "diffusers" in SDXL.hosts and "comfyui" in SDXL.hosts
    # errors name SD 1.x / 2.x too, not SDXL alone
    assert "SD 1.x" in SDXL.display_name and "SD 2.x" in SDXL.display_name


def test_the_default_is_unet_norms_fitted_time_aware_along_the_guided_trajectory(pipe, default_map):
    meta = default_map.metadata
    assert meta["family"] == "sdxl" and meta["preset"] == "unet_norms" and meta["cfg_rows"] == "cond"
    assert meta["model"] == "StableDiffusionPipeline" and meta["causal_strategy"] == "exact"
    assert meta["sampling"]["guidance_scale"] == 7.5  # the pipeline's default
    assert default_map.parts() == ["unet"]
    assert set(default_map.modules) == set(pipe.act_preset_modules("unet_norms"))
    assert "unet.conv_norm_out" in default_map.modules
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1" in default_map.modules
    # one bucket (and calibration gain) per step: PNDM's PLMS evaluates one timestep twice, still one level
    assert len(default_map.buckets) == 3 and len(meta["calibration_gains"]) == 3
    scheduler = pipe.scheduler
    scheduler.set_timesteps(3)
    levels = sorted({float(t) / 1000 for t in scheduler.timesteps}, reverse=True)
    assert default_map.buckets == pytest.approx(levels)


@pytest.mark.parametrize("guidance, negative", [(7.5, None), (5.0, "blurry"), (1.0, None)])
def test_the_fitting_rows_follow_the_pipelines_own_trajectory(pipe, monkeypatch, guidance, negative):
    """Un-steered, each pair's latents end where StableDiffusionPipeline's do from the same noise (its
    scheduler: PNDM with a repeated timestep for SD 1.5, v-prediction DDIM for SD 2.x)."""
    import act_core.diffusers.adapter as shared
    import act_core.diffusers.sdxl as adapter
    from act_core.sampling import SamplingSettings

    settings = SamplingSettings(3, guidance, 32, 32, negative)

    def expected(seed, prompt):
        return generate(
            pipe, prompt, seed=seed, guidance_scale=guidance, negative_prompt=negative, output_type="latent"
        )

    fc.check_rows_follow_the_pipeline(
        monkeypatch, shared, lambda run: adapter.run_trajectory(pipe, run, settings), expected
    )


def test_lambda_zero_is_exact_one_steers_disable_restores_and_the_file_round_trips(
    pipe, default_map, tmp_path
):
    fc.check_lambda_zero_exact_one_steers_disable_restores_and_the_file_round_trips(
        pipe, default_map, generate, tmp_path / "sd.safetensors"
    )


def test_the_foldable_map_fuses_into_the_weights_as_its_hooks_steer(pipe):
    foldable = fit(pipe, preset="unet_norms_foldable")
    assert foldable.foldable and foldable.metadata["cfg_rows"] == "all"
    plain = generate(pipe)
    pipe.enable_act(foldable, strength=0.8)
    hooked = generate(pipe)
    pipe.disable_act()
    pipe.fuse_act(foldable, strength=0.8)
    try:
        fused = generate(pipe)
    finally:
        pipe.unfuse_act()
    assert np.abs(hooked - plain).max() > 1e-3
    np.testing.assert_allclose(fused, hooked, atol=1e-4)
    assert np.array_equal(generate(pipe), plain)


def test_text_encoder_presets_fit_the_one_encoder(sd15, tmp_path):
    """SDXL's text-encoder presets name text_encoder_2 too; SD 1.x has one encoder, and a preset fitted whole
    hooks the parts the model has. SD 1.x conditions on the last layer's normalised output: nothing is dead."""
    from act_core.errors import ACTInputError
    from act_core.lora import export_lora

    text = fit(sd15, preset="text_encoder_norms", support="unbounded")
    assert text.parts() == ["text_encoder"] and len(text) == 2 * 4 + 1
    assert "text_encoder.text_model.final_layer_norm" in text.modules
    assert "text_encoder.text_model.encoder.layers.3.layer_norm2" in text.modules
    both = fit(sd15, preset="text_encoder_and_unet_norms")
    assert both.parts() == ["text_encoder", "unet"]
    fc.check_the_map_steers(sd15, text, generate)
    # unbounded text-encoder maps fold: the LoRA keys are ComfyUI's SD1 CLIP's (clip_l)
    path = export_lora(text, sd15, tmp_path / "text_lora.safetensors", strength=1.0, dtype="fp32")
    keys = set(load_file(str(path)))
    assert len(keys) == 2 * len(text)
    assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff" in keys
    assert all(key.startswith("text_encoders.clip_l.transformer.text_model.") for key in keys)
    # asking for the encoder SD 1.x lacks is still refused
    with pytest.raises(ACTInputError, match="text_encoder_2"):
        fit(sd15, preset="text_encoder_norms", parts=["text_encoder_2"])


def test_cli_fits_exports_and_describes_a_sd15_folder(tmp_path, capsys):
    from act_core.cli import main

    folder = tmp_path / "sd15"
    build_tiny_sd15(folder)
    fast = ["--steps", "2", "--height", "32", "--width", "32"]
    maps = {}
    for preset in ("default", "unet_norms_foldable"):
        maps[preset] = tmp_path / f"{preset}.safetensors"
        argv = ["fit", "-q", "--model", str(folder), *fast, *fc.CLI_PROMPTS, "--output", str(maps[preset])]
        argv += [] if preset == "default" else ["--preset", preset]
        assert main(argv) == 0, capsys.readouterr().err
    model = "StableDiffusionPipeline"
    fc.check_cli_fitted_map(maps["default"], family="sdxl", preset="unet_norms", model=model)
    fc.check_cli_info(capsys, maps["default"], model=model, cfg_rows="cond")
    lora = tmp_path / "lora.safetensors"
    argv = ["export-lora", "-q", "--model", str(folder), "--map", str(maps["unet_norms_foldable"])]
    assert main([*argv, "--output", str(lora), "--dtype", "fp32"]) == 0, capsys.readouterr().err
    assert "LoraLoader" in capsys.readouterr().out
    keys = load_file(str(lora))
    foldable = ACTMap.load(maps["unet_norms_foldable"])
    assert len(keys) == 2 * len(foldable) and "lora_unet_out_0.diff" in keys  # conv_norm_out, LDM-named
    assert all(k.startswith("lora_unet_") and k.endswith((".diff", ".diff_b")) for k in keys)
    assert main(["info", str(lora)]) == 0
    assert "LoRA" in capsys.readouterr().out


def test_a_fit_split_into_calls_of_one_pair_gives_the_one_call_map(pipe, default_map):
    fc.check_split_calls_give_the_one_call_map(pipe, default_map, SAMPLING)
