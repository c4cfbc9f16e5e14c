"""diffusers integration on a tiny SDXL pipeline built offline (random weights, generated tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from act_core import ACTMap, ModuleMap
from act_core.diffusers import act_pipeline
from act_core.errors import ACTInputError, ACTModelMismatchError

SOURCE = [f"a red circle number {i}" for i in range(8)]
TARGET = [f"a blue square, striped, number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.disable_act()


@pytest.fixture(scope="module")
def unet_map(pipe):
    """The paper's protocol (first-step statistics, one map for every step)."""
    return pipe.fit_act(SOURCE, TARGET, preset="unet_norms_first_step", batch_size=4, progress=False)


@pytest.fixture(scope="module")
def foldable_map(pipe):
    return pipe.fit_act(SOURCE, TARGET, preset="unet_norms_foldable", batch_size=4, progress=False)


def generate(pipe, prompt="a red circle", guidance_scale=5.0, seed=0, steps=2):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        height=32,
        width=32,
        output_type="np",
    ).images


def test_act_pipeline_shares_modules_and_keeps_dtype(pipe):
    assert type(pipe).__name__ == "ACTStableDiffusionXLPipeline"
    assert pipe.dtype == torch.float32
    assert act_pipeline(pipe) is pipe


def test_fit_from_two_by_eight_prompts(unet_map):
    assert unet_map.parts() == ["unet"]
    names = list(unet_map.modules)
    assert all("norm" in name for name in names)
    # Execution order: the mid block runs before the up blocks (it is registered after them).
    assert names.index("unet.mid_block.resnets.0.norm1") < names.index("unet.up_blocks.0.resnets.0.norm1")
    meta = unet_map.metadata
    assert meta["num_source"] == meta["num_target"] == 8 and meta["preset"] == "unet_norms_first_step"
    assert meta["causal_strategy"] == "lockstep" and meta["method"] == "linear" and meta["support"] == "range"


def test_lam_zero_is_bit_identical_lam_one_changes_disable_restores(pipe, unet_map):
    base = generate(pipe)
    pipe.enable_act(unet_map, strength=0.0)
    assert np.array_equal(generate(pipe), base)
    pipe.set_act_strength(1.0)
    steered = generate(pipe)
    assert np.abs(steered - base).max() > 1e-3
    pipe.disable_act()
    assert np.array_equal(generate(pipe), base)


def test_fuse_matches_hooks_and_unfuse_restores_weights(pipe, foldable_map):
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.enable_act(foldable_map, strength=0.8)
    hooked = generate(pipe, guidance_scale=1.0)
    pipe.fuse_act()
    assert pipe.act_map is foldable_map
    fused = generate(pipe, guidance_scale=1.0)
    np.testing.assert_allclose(fused, hooked, atol=1e-4)
    pipe.unfuse_act()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert np.array_equal(generate(pipe, guidance_scale=1.0), hooked)  # hooks came back
    pipe.disable_act()


def test_fuse_refuses_bounded_maps(pipe, unet_map):
    with pytest.raises(ACTInputError, match="unet_norms_foldable|support='unbounded'"):
        pipe.fuse_act(unet_map)


def test_text_encoder_preset_runs_no_unet(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        act_map = pipe.fit_act(SOURCE, TARGET, preset="text_encoder_norms", batch_size=4, progress=False)
    finally:
        handle.remove()
    assert calls == []
    assert act_map.parts() == ["text_encoder", "text_encoder_2"]
    # Encoder 1's last layer and final LayerNorm cannot reach the UNet (SDXL reads hidden_states[-2]).
    last = pipe.text_encoder.config.num_hidden_layers - 1
    assert not any(f"text_encoder.text_model.encoder.layers.{last}." in n for n in act_map.modules)
    assert "text_encoder.text_model.final_layer_norm" not in act_map.modules
    assert all(
        n.startswith(("text_encoder.text_model.", "text_encoder_2.text_model.")) for n in act_map.modules
    )
    base = generate(pipe)
    pipe.enable_act(act_map, strength=1.0)
    assert np.abs(generate(pipe) - base).max() > 1e-3
    pipe.disable_act()


def test_fit_encoding_matches_the_pipeline(pipe):
    from act_core.diffusers.adapter import tokenize
    from act_core.diffusers.sdxl import _encode_tokens

    tokens = tokenize(pipe, SOURCE[:3])
    embeds, added = _encode_tokens(pipe, tokens, 32, 32)
    ref, _, pooled, _ = pipe.encode_prompt(SOURCE[:3], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, ref)
    torch.testing.assert_close(added["text_embeds"], pooled)


def test_per_part_strength_window_and_cfg_rows(pipe, unet_map):
    base = generate(pipe)
    pipe.enable_act(unet_map, strength={"unet": 1.0})
    full = generate(pipe)
    pipe.enable_act(unet_map, strength=1.0, start=0.4, end=1.0)  # 2 trailing steps: t=999, 499
    late = generate(pipe)
    assert not np.array_equal(late, base) and not np.array_equal(late, full)
    pipe.enable_act(unet_map, strength=1.0, cfg_rows="all")
    assert not np.array_equal(generate(pipe), full)
    pipe.disable_act()
    with pytest.raises(ACTInputError, match="start <= end"):
        pipe.enable_act(unet_map, start=0.8, end=0.2)
    with pytest.raises(ACTInputError, match="strength must be finite"):
        pipe.enable_act(unet_map, strength=float("nan"))
    assert pipe.act_map is None


def test_from_pipe_shares_act_state(pipe, unet_map):
    other = act_pipeline(type(pipe).__mro__[2].from_pipe(pipe, dtype=pipe.dtype))
    assert other.unet is pipe.unet
    pipe.enable_act(unet_map)
    assert other.act_map is unet_map
    other.disable_act()
    assert pipe.act_map is None


def test_enable_from_file_and_wrong_model(pipe, unet_map, tmp_path):
    path = unet_map.save(tmp_path / "map.safetensors")
    pipe.enable_act(str(path), strength=0.0)
    assert pipe.act_map.equal(ACTMap.load(path))
    pipe.disable_act()
    narrow = {n: m for n, m in unet_map.modules.items()}
    first = next(iter(narrow))
    from act_core.maps import ModuleMap

    narrow[first] = ModuleMap(torch.ones(3), torch.zeros(3), -torch.ones(3), torch.ones(3))
    with pytest.raises(ACTModelMismatchError, match="has 32 units but the map has 3"):
        pipe.enable_act(ACTMap(narrow, {"model": "another"}))


def test_prompt_validation(pipe):
    with pytest.raises(ACTInputError, match="at least 2"):
        pipe.fit_act(["a cat"], TARGET, progress=False)
    with pytest.raises(ACTInputError, match="list of prompts"):
        pipe.fit_act("a cat", TARGET, progress=False)
    with pytest.raises(ACTInputError, match="Unknown ACT preset"):
        pipe.fit_act(SOURCE, TARGET, preset="everything", progress=False)


# ------------------------------------------------------------------------------------------ trajectory protocol
@pytest.fixture(scope="module")
def timed_map(pipe):
    """The default: time-aware maps along the guided trajectory of the sampling settings given."""
    return pipe.fit_act(
        SOURCE, TARGET, num_inference_steps=3, guidance_scale=5.0, height=32, width=32, progress=False
    )


def test_default_fit_follows_the_sampling_settings(pipe, timed_map):
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    expected = tuple(float(t) / 1000 for t in scheduler.timesteps)
    assert timed_map.buckets == pytest.approx(expected)
    meta = timed_map.metadata
    assert meta["preset"] == "unet_norms" and meta["protocol"] == "trajectory" and meta["cfg_rows"] == "cond"
    assert meta["causal_strategy"] == "exact" and meta["support"] == "unbounded"
    assert meta["apply_mode"] == "per_element" and meta["num_source"] == 8
    assert meta["sampling"]["num_inference_steps"] == 3 and meta["sampling"]["guidance_scale"] == 5.0
    assert (
        meta["sampling"]["trajectory"] == "steered"
        and meta["sampling"]["scheduler"] == type(pipe.scheduler).__name__
    )
    assert "omega_guard" in meta and meta["omega_guard"]["max_omega"] == 10.0
    assert meta["statistic"].startswith("every position") and len(meta["calibration_gains"]) == 3
    assert all(0.5 <= gain <= 3.0 for gain in meta["calibration_gains"])
    assert meta["calibration"] == "norm" and len(meta["calibration_alignment"]) == 3
    assert all(-1.0 <= cosine <= 1.0 for cosine in meta["calibration_alignment"])
    first = next(iter(timed_map.modules))
    assert timed_map.modules[first].omega.shape[0] == 3


def test_default_fit_runs_one_unet_call_per_step(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        pipe.fit_act(
            SOURCE, TARGET, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, progress=False
        )
    finally:
        handle.remove()
    # [uncond; target; source; plain source] rows, all pairs in one call (the plain rows calibrate the step)
    assert calls == [4 * len(SOURCE)] * 4


def test_time_aware_map_applies_at_other_step_counts_lam_zero_exact(pipe, timed_map):
    for steps in (2, 5):
        base = generate(pipe, steps=steps)
        pipe.enable_act(timed_map, strength=0.0)
        assert np.array_equal(generate(pipe, steps=steps), base)
        pipe.set_act_strength(1.0)
        assert np.abs(generate(pipe, steps=steps) - base).max() > 1e-3
        pipe.disable_act()
        assert np.array_equal(generate(pipe, steps=steps), base)


def test_a_fit_split_over_calls_equals_the_one_call_fit(pipe):
    """At any memory budget the fit is exact: the target-side rows first, then the source rows in calls that
    meet at every module, give the one-call maps (no lagged warning)."""
    import warnings

    from act_core.errors import ACTWarning

    settings = {"num_inference_steps": 2, "height": 32, "width": 32, "progress": False}
    whole = pipe.fit_act(SOURCE, TARGET, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ACTWarning)
        split = pipe.fit_act(SOURCE, TARGET, max_pairs_per_call=1, **settings)
    assert not [w for w in caught if "lagged" in str(w.message)]
    assert split.metadata["causal_strategy"] == "exact" and split.metadata["pairs_per_call"] == 1
    assert whole.metadata["pairs_per_call"] > 1
    for name, module_map in whole.modules.items():
        torch.testing.assert_close(split.modules[name].omega, module_map.omega, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(split.modules[name].beta, module_map.beta, rtol=1e-4, atol=1e-5)
    with pytest.raises(ACTInputError, match="max_pairs_per_call"):
        pipe.fit_act(SOURCE, TARGET, max_pairs_per_call=0, **settings)


def test_fit_refuses_a_steered_pipeline_and_identical_prompts(pipe, timed_map):
    pipe.enable_act(timed_map)
    with pytest.raises(ACTInputError, match="disable_act"):
        pipe.fit_act(SOURCE, TARGET, num_inference_steps=2, progress=False)
    pipe.disable_act()
    with pytest.raises(ACTInputError, match="same to the model"):
        pipe.fit_act(SOURCE, list(SOURCE), num_inference_steps=2, progress=False)
    long = "a red circle " + "x" * 40  # the tiny tokenizer stops at 32 tokens
    with pytest.raises(ACTInputError, match="truncation"):
        pipe.fit_act(
            [long + "a", long + "b"], [long + "c", long + "d"], num_inference_steps=2, progress=False
        )


def test_a_plain_pipeline_on_steered_modules_is_refused_clearly(pipe, timed_map):
    from act_core.errors import ACTError

    plain = type(pipe).__mro__[2].from_pipe(pipe, dtype=pipe.dtype)
    pipe.enable_act(timed_map)
    try:
        with pytest.raises(ACTError, match="outside an ACT pipeline"):
            plain("a red circle", num_inference_steps=2, height=32, width=32, output_type="np")
    finally:
        pipe.disable_act()


def test_foldable_map_hooks_and_fused_weights_agree_under_cfg(pipe, foldable_map):
    assert foldable_map.metadata["cfg_rows"] == "all"
    pipe.enable_act(foldable_map, strength=0.8)
    hooked = generate(pipe, guidance_scale=5.0)
    pipe.fuse_act()
    fused = generate(pipe, guidance_scale=5.0)
    pipe.disable_act()
    np.testing.assert_allclose(fused, hooked, atol=1e-4)
    assert pipe.act_map is None


def test_fusing_a_cond_rows_map_warns(pipe):
    from act_core.errors import ACTWarning

    cond_map = pipe.fit_act(
        SOURCE, TARGET, preset="unet_norms_first_step", support="unbounded", batch_size=4, progress=False
    )
    relabelled = ACTMap(
        {n: ModuleMap(m.omega, m.beta, m.low, m.high, "per_element") for n, m in cond_map.modules.items()},
        cond_map.metadata,
    )
    with pytest.warns(ACTWarning, match="cond rows"):
        pipe.fuse_act(relabelled)
    pipe.disable_act()


def test_fits_are_reproducible_with_a_stochastic_sampler(pipe):
    from diffusers import EulerAncestralDiscreteScheduler

    original = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        fits = [
            pipe.fit_act(SOURCE[:4], TARGET[:4], num_inference_steps=3, height=32, width=32, progress=False)
            for _ in range(2)
        ]
    finally:
        pipe.scheduler = original
    assert (
        fits[0].equal(fits[1])
        and fits[0].metadata["sampling"]["scheduler"] == "EulerAncestralDiscreteScheduler"
    )
