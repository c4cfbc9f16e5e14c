"""Fitting: causal beats at-once downstream, lockstep is exact, a tiny transformers model, input errors."""

import warnings

import pytest
import torch
from helpers import Stack, w1
from transformers import CLIPTextConfig, CLIPTextModel

from act_core.applying import apply_act
from act_core.errors import ACTInputError
from act_core.fitting import fit, fit_with_stats
from act_core.recording import ActivationRecorder, select_modules, token_mask


def make_data(seed: int = 0, batches: int = 4, size: int = 64):
    generator = torch.Generator().manual_seed(seed)
    source = [torch.randn(size, 16, generator=generator) for _ in range(batches)]
    target = [torch.randn(size, 16, generator=generator) * 1.5 + 0.8 for _ in range(batches)]
    return source, target


def deep_w1(model, act_map, source, target, name):
    module = dict(model.named_modules())[name]
    with torch.no_grad(), ActivationRecorder({name: module}) as goal:
        for batch in target:
            model(batch)
    handle = apply_act(select_modules(model, ["*norm*"]), act_map)
    with torch.no_grad(), ActivationRecorder({name: module}) as moved:
        for batch in source:
            model(batch)
    handle.remove()
    return w1(moved.samples(name), goal.samples(name))


def test_causal_gives_lower_deep_layer_w1_than_at_once():
    model = Stack(depth=6)
    source, target = make_data()
    modules = select_modules(model, ["*norm*"])
    results = {}
    for mode in ("at_once", "causal"):
        act_map = fit(model, source, target, modules, mode=mode)
        results[mode] = deep_w1(model, act_map, source, target, "blocks.5.norm")
    assert results["causal"] < results["at_once"], results


def test_lockstep_equals_the_reference_one_module_per_pass():
    model = Stack(depth=4)
    source, target = make_data(batches=3, size=16)
    modules = select_modules(model, ["*norm*"])
    lockstep, lock_stats = fit_with_stats(model, source, target, modules, causal_strategy="lockstep")
    reference, ref_stats = fit_with_stats(
        model, source, target, modules, causal_strategy="groupwise", num_groups=4
    )
    assert lock_stats.strategy == "lockstep" and ref_stats.strategy == "groupwise"
    assert list(lockstep.modules) == list(reference.modules)
    for name in lockstep.modules:
        torch.testing.assert_close(
            lockstep.modules[name].omega, reference.modules[name].omega, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            lockstep.modules[name].beta, reference.modules[name].beta, rtol=1e-5, atol=1e-6
        )
    assert lock_stats.run_model_calls == 6  # one pass: each batch runs once
    assert ref_stats.run_model_calls == 6 * 4  # reference-style: one (truncated) pass per module


def test_groupwise_fallback_when_batches_exceed_lockstep_limit():
    model = Stack(depth=4)
    source, target = make_data(batches=3, size=16)
    with pytest.warns(UserWarning, match="group-wise"):
        act_map, stats = fit_with_stats(
            model, source, target, select_modules(model, ["*norm*"]), max_lockstep_batches=4, num_groups=2
        )
    assert (
        stats.strategy == "groupwise"
        and stats.groups == 2
        and act_map.metadata["causal_strategy"] == "groupwise"
    )


def test_repeated_modules_fall_back_to_groupwise_without_truncation():
    model = Stack(depth=3)
    source, target = make_data(batches=2, size=16)

    def two_steps(batch):  # like statistics over two denoising steps
        model(batch)
        model(batch * 0.5)

    with pytest.warns(UserWarning, match="falls back"):
        act_map, stats = fit_with_stats(two_steps, source, target, select_modules(model, ["*norm*"]))
    assert stats.strategy == "groupwise"
    assert act_map.metadata["num_source"] == 2 * 2 * 16  # both steps recorded
    with pytest.raises(ACTInputError, match="groupwise"):
        fit(two_steps, source, target, select_modules(model, ["*norm*"]), causal_strategy="lockstep")


def test_progress_reports_and_interrupts_cleanly():
    model = Stack(depth=4)
    source, target = make_data(batches=2, size=8)
    seen = []
    fit(
        model, source, target, select_modules(model, ["*norm*"]), progress=lambda d, t, s: seen.append((d, t))
    )
    assert seen[-1][0] == seen[-1][1] == 4

    class Interrupted(Exception):
        pass

    def interrupt(done, total, description):
        if done >= 2:
            raise Interrupted

    for strategy in ("lockstep", "groupwise"):
        with pytest.raises(Interrupted):
            fit(
                model,
                source,
                target,
                select_modules(model, ["*norm*"]),
                causal_strategy=strategy,
                progress=interrupt,
            )
        assert all(not m._forward_hooks for m in model.modules()), "hooks removed after an interrupt"


def tiny_clip(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def token_batches(seed: int, offset: int, count: int = 4, size: int = 8):
    """Random "prompts": token ids from one half of the vocabulary, with padding after a random length."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(offset, offset + 30, (size, 12), generator=generator)
        lengths = torch.randint(4, 13, (size,), generator=generator)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask + 1 * (1 - mask), "attention_mask": mask})
    return batches


def test_tiny_transformers_text_model_fit_and_steer():
    model = tiny_clip()

    def run(batch):
        with token_mask(batch["attention_mask"]):
            return model(input_ids=batch["input_ids"])

    modules = select_modules(model, ["*layer_norm*"], prefix="text_encoder.")
    source, target = token_batches(0, offset=2), token_batches(1, offset=33)
    act_map = fit(run, source, target, modules, method="linear", mode="causal")
    assert list(act_map.modules)[0].endswith("encoder.layers.0.layer_norm1")
    assert act_map.metadata["num_source"] == 32 and act_map.metadata["mode"] == "causal"
    last = "text_encoder." + [n for n in dict(model.named_modules()) if n.endswith("layers.2.layer_norm2")][0]
    raw = last[len("text_encoder.") :]
    plain, steered = (
        deep_w1_clip(model, run, None, source, target, raw),
        deep_w1_clip(model, run, act_map, source, target, raw),
    )
    assert steered < 0.5 * plain, (plain, steered)


def deep_w1_clip(model, run, act_map, source, target, name):
    module = dict(model.named_modules())[name]
    with torch.no_grad(), ActivationRecorder({name: module}) as goal:
        for batch in target:
            run(batch)
    handle = (
        apply_act(select_modules(model, ["*layer_norm*"], prefix="text_encoder."), act_map)
        if act_map
        else None
    )
    with torch.no_grad(), ActivationRecorder({name: module}) as moved:
        for batch in source:
            run(batch)
    if handle:
        handle.remove()
    return w1(moved.samples(name), goal.samples(name))


def test_input_errors_name_problem_and_fix():
    model = Stack(depth=2)
    modules = select_modules(model, ["*norm*"])
    source, target = make_data(batches=2, size=8)
    with pytest.raises(ACTInputError, match="source set is empty"):
        fit(model, [], target, modules)
    with pytest.raises(ACTInputError, match="target set gave 1 sample.*Add target prompts"):
        fit(model, source, [torch.randn(1, 16)], modules)
    with pytest.raises(ACTInputError, match="Unbalanced.*raise max_imbalance"):
        fit(model, source, [torch.randn(2, 16)], modules)
    with pytest.raises(ACTInputError, match="NaN or Inf.*float32"):
        fit(model, [torch.full((4, 16), float("nan"))] * 2, target, modules, mode="at_once")
    with pytest.raises(ACTInputError, match="matched nothing"):
        fit(model, source, target, {})
    with pytest.raises(ACTInputError, match="Unknown ACT method"):
        fit(model, source, target, modules, method="wasserstein")
    with pytest.raises(ACTInputError, match="None of the selected modules ran"):
        fit(lambda batch: None, source, target, modules, mode="at_once")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, source, target, modules)  # a clean fit warns about nothing
