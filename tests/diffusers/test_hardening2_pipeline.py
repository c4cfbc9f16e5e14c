"""Issue 21 (hardening round 2), the findings on the diffusers mixin: each pinned by a test that failed
before the fix. (The core and CLI findings are in tests/core/test_hardening2.py and test_hardening2_cli.py.)"""

from __future__ import annotations

import warnings

import pytest
from tiny_flux import MAX_SEQUENCE_LENGTH, build_tiny_flux
from tiny_sd3 import build_tiny_sd3

from act_core.diffusers import act_pipeline
from act_core.errors import ACTInputError

SOURCE = ["a red circle", "a blue square", "a green triangle"]
TARGET = [p + ", striped" for p in SOURCE]
SMALL = {"height": 32, "width": 32, "progress": False}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pipe = act_pipeline(build_tiny_flux(tmp_path_factory.mktemp("flux")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    pipe = act_pipeline(build_tiny_sd3(tmp_path_factory.mktemp("sd3")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quiet_fit(pipe, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizers do not know these words
        return pipe.fit_act(*args, **kwargs)


@pytest.mark.parametrize(("which", "steps", "guidance"), [("flux", 28, 3.5), ("sd3", 28, 7.0)])
def test_finding2_fits_follow_the_pipelines_own_defaults(request, which, steps, guidance):
    pipe = request.getfixturevalue(which)
    act_map = _quiet_fit(pipe, SOURCE, TARGET, max_sequence_length=MAX_SEQUENCE_LENGTH, **SMALL)
    sampling = act_map.metadata["sampling"]
    assert (sampling["num_inference_steps"], sampling["guidance_scale"]) == (steps, guidance)
    assert len(act_map.buckets) == steps


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, True, "3", None])
def test_finding6_fit_act_refuses_seeds_a_generator_cannot_take(tiny_pipe, seed):
    with pytest.raises(ACTInputError, match="seed"):
        tiny_pipe.fit_act(SOURCE, TARGET, seed=seed, num_inference_steps=2, **SMALL)


@pytest.mark.parametrize("length", [513, 100000, 0, True])
def test_finding6_flux_refuses_t5_lengths_flux_refuses(flux, length):
    with pytest.raises(ACTInputError, match="max_sequence_length"):
        flux.fit_act(SOURCE, TARGET, max_sequence_length=length, num_inference_steps=2, **SMALL)


def test_finding6_a_t5_length_on_a_model_without_t5_is_refused(tiny_pipe):
    with pytest.raises(ACTInputError, match="prompt length in tokens.*SDXL / SD 1.x / SD 2.x has none"):
        tiny_pipe.fit_act(SOURCE, TARGET, max_sequence_length=16, num_inference_steps=2, **SMALL)


def test_finding7_flux_sizes_must_be_what_flux_fits_at(flux):
    """FLUX packs 2x2 latent patches: a height it would round down is refused, not recorded as given."""
    multiple = flux.vae_scale_factor * 2
    with pytest.raises(ACTInputError, match=f"multiples of {multiple} .*packs 2x2 latent patches"):
        flux.fit_act(SOURCE, TARGET, num_inference_steps=2, height=multiple * 2 + multiple // 2, width=32)


def test_finding7_flux_refuses_a_negative_prompt(flux):
    with pytest.raises(ACTInputError, match="without a CFG batch.*negative prompt"):
        flux.fit_act(SOURCE, TARGET, negative_prompt="blurry", num_inference_steps=2, **SMALL)


def test_finding7_guidance_must_be_a_number_and_parts_a_list(tiny_pipe):
    with pytest.raises(ACTInputError, match="guidance_scale"):
        tiny_pipe.fit_act(SOURCE, TARGET, guidance_scale=True, num_inference_steps=2, **SMALL)
    with pytest.raises(ACTInputError, match=r"give a list, e.g. \['unet'\]"):
        tiny_pipe.fit_act(SOURCE, TARGET, parts="unet", num_inference_steps=2, **SMALL)


def test_finding7_the_summary_counts_prompts_not_pairs(tiny_pipe):
    act_map = _quiet_fit(
        tiny_pipe, SOURCE, TARGET + ["a red square, striped"] * 3, num_inference_steps=2, **SMALL
    )
    meta = act_map.metadata
    assert (meta["num_source"], meta["num_target"], meta["num_pairs"]) == (3, 6, 6)
    assert "num_source: 3" in act_map.summary()


def test_finding7_set_act_strength_on_a_fused_map_says_it_is_fused(tiny_pipe):
    foldable = _quiet_fit(
        tiny_pipe, SOURCE, TARGET, preset="unet_norms_foldable", num_inference_steps=2, **SMALL
    )
    tiny_pipe.fuse_act(foldable, 1.0)
    try:
        with pytest.raises(ACTInputError, match="fused into the weights.*unfuse_act"):
            tiny_pipe.set_act_strength(0.5)
    finally:
        tiny_pipe.disable_act()
    assert tiny_pipe.act_map is None


def test_finding6_the_largest_seeds_wrap_as_comfyui_does():
    """Seeds up to 2**64 - 1 (ComfyUI's seed widgets) are taken; pair i's noise seed wraps modulo 2**64."""
    import torch

    from act_core.sampling import seeded_noise
    from act_core.validation import check_seed

    noise = seeded_noise((4,), check_seed(2**64 - 1), 2)
    torch.testing.assert_close(noise[0], torch.randn(4, generator=torch.Generator().manual_seed(2**64 - 1)))
    torch.testing.assert_close(noise[1], torch.randn(4, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, None])
def test_finding6_sweeps_refuse_seeds_a_generator_cannot_take(tiny_pipe, seed):
    from helpers import random_map

    from act_core.diffusers.sweep import sweep_images

    with pytest.raises(ACTInputError, match="seed"):
        sweep_images(
            tiny_pipe, random_map({"unet.conv_norm_out": 32}), ["a red circle"], [0.0, 1.0], seed=seed
        )
    assert tiny_pipe.act_map is None
