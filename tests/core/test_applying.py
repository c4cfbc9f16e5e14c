"""Hooks and folding: exactness at lam = 0, the fitted moments at lam = 1, hook == fold, unfold exact."""

import pytest
import torch
from helpers import ConvNet, Stack, random_map

from act_core.applying import apply_act, fold_act, folded_diffs, remove_act
from act_core.errors import ACTInputError, ACTModelMismatchError
from act_core.fitting import fit
from act_core.recording import ActivationRecorder, select_modules


def norms(model):
    return select_modules(model, ["*norm*"])


def test_lam_zero_is_bit_identical_and_remove_restores():
    model = Stack()
    x = torch.randn(7, 16)
    with torch.no_grad():
        reference = model(x)
        handle = apply_act(
            norms(model), random_map({n: 16 for n in norms(model)}, bounded=True), strength=0.0
        )
        assert torch.equal(model(x), reference)
        handle.set_strength(1.0)
        assert not torch.equal(model(x), reference)
        handle.remove()
        assert torch.equal(model(x), reference)


def test_lam_one_transports_source_to_target_moments_at_first_module():
    torch.manual_seed(0)
    model = Stack()
    source = [torch.randn(64, 16) for _ in range(4)]
    target = [torch.randn(64, 16) * 2 + 1 for _ in range(4)]
    modules = norms(model)
    act_map = fit(model, source, target, modules, method="linear", support="unbounded")
    first = next(iter(act_map.modules))
    with torch.no_grad(), ActivationRecorder({first: modules[first]}) as plain_target:
        for batch in target:
            model(batch)
    handle = apply_act(modules, act_map, strength=1.0)
    with torch.no_grad(), ActivationRecorder({first: modules[first]}) as steered:
        for batch in source:
            model(batch)
    handle.remove()
    moved, goal = steered.samples(first), plain_target.samples(first)
    torch.testing.assert_close(moved.mean(0), goal.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moved.std(0), goal.std(0), atol=0.02, rtol=0.02)


def test_hook_and_fold_agree_and_unfold_restores_bits():
    torch.manual_seed(1)
    for model, shape in ((Stack(), (5, 16)), (ConvNet(), (2, 3, 8, 8))):
        modules = select_modules(model, ["*norm*", "*linear*", "*conv*"])
        widths = {name: (m.weight.shape[0]) for name, m in modules.items()}
        act_map = random_map(widths, seed=3)
        x = torch.randn(*shape)
        originals = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            handle = apply_act(modules, act_map, strength=0.7)
            hooked = model(x)
            handle.remove()
            folded_handle = fold_act(modules, act_map, strength=0.7)
            folded = model(x)
            folded_handle.unfold()
        relative = (hooked - folded).norm() / hooked.norm()
        assert relative < 1e-5
        for key, value in model.state_dict().items():
            assert torch.equal(value, originals[key]), key


def test_folded_diffs_are_linear_in_strength():
    model = Stack()
    modules = norms(model)
    act_map = random_map({n: 16 for n in modules})
    one, half = folded_diffs(modules, act_map, 1.0), folded_diffs(modules, act_map, 0.5)
    assert set(one) == {f"{n}.{p}" for n in modules for p in ("weight", "bias")}
    for key in one:
        torch.testing.assert_close(half[key], 0.5 * one[key])


def test_fold_refuses_bounded_maps_and_active_hooks():
    model = Stack()
    modules = norms(model)
    with pytest.raises(ACTInputError, match="support='unbounded'"):
        fold_act(modules, random_map({n: 16 for n in modules}, bounded=True))
    apply_act(modules, random_map({n: 16 for n in modules}))
    with pytest.raises(ACTInputError, match="remove them before folding"):
        fold_act(modules, random_map({n: 16 for n in modules}))
    assert remove_act(modules)


def test_applying_again_replaces_instead_of_stacking():
    model = Stack()
    modules = norms(model)
    act_map = random_map({n: 16 for n in modules})
    x = torch.randn(3, 16)
    with torch.no_grad():
        apply_act(modules, random_map({n: 16 for n in modules}, seed=9))
        apply_act(modules, act_map, strength=0.5)
        twice = model(x)
        remove_act(modules)
        apply_act(modules, act_map, strength=0.5)
        once = model(x)
        remove_act(modules)
    assert torch.equal(twice, once)
    assert all(not m._forward_hooks for m in modules.values())


def test_strength_changes_live_and_per_part():
    layer_a, layer_b = torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)
    modules = {"unet.a": layer_a, "text_encoder.b": layer_b}
    handle = apply_act(modules, random_map({"unet.a": 4, "text_encoder.b": 4}), strength=1.0)
    x = torch.randn(2, 4)
    with torch.no_grad():
        full = layer_a(x)
        handle.set_strength({"unet": 0.0})
        assert torch.equal(layer_a(x), torch.nn.functional.layer_norm(x, (4,)))
        assert not torch.equal(layer_b(x), torch.nn.functional.layer_norm(x, (4,)))
        handle.set_strength(1.0)
        assert torch.equal(layer_a(x), full)
        handle.set_enabled(False)
        assert torch.equal(layer_a(x), torch.nn.functional.layer_norm(x, (4,)))
    with pytest.raises(ACTInputError, match="no part"):
        handle.set_strength({"vae": 1.0})
    handle.remove()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "strong"])
def test_non_finite_strength_is_refused(bad):
    modules = {"n": torch.nn.LayerNorm(4)}
    with pytest.raises(ACTInputError, match="strength must be"):
        apply_act(modules, random_map({"n": 4}), strength=bad)


def test_rows_restrict_transport_to_part_of_the_batch():
    layer = torch.nn.LayerNorm(4)
    handle = apply_act({"n": layer}, random_map({"n": 4}))
    x = torch.randn(4, 3, 4)
    with torch.no_grad():
        plain = torch.nn.functional.layer_norm(x, (4,))
        handle.set_call(rows=slice(2, 4))
        out = layer(x)
    assert torch.equal(out[:2], plain[:2]) and not torch.equal(out[2:], plain[2:])
    handle.remove()


def test_spatial_mean_mode_shifts_every_position_equally():
    norm = torch.nn.GroupNorm(2, 4)
    act_map = random_map({"n": 4}, apply_mode="spatial_mean")
    handle = apply_act({"n": norm}, act_map)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        plain = torch.nn.functional.group_norm(x, 2)
        delta = norm(x) - plain
    handle.remove()
    module_map = act_map.modules["n"]
    mean = plain.mean(dim=(2, 3))
    expected = (module_map.omega - 1) * mean + module_map.beta
    torch.testing.assert_close(delta, expected[:, :, None, None].expand_as(delta), atol=1e-5, rtol=1e-5)


def test_support_mask_leaves_values_outside_alone():
    from act_core.maps import ACTMap, ModuleMap

    act_map = ACTMap({"n": ModuleMap(torch.full((1,), 2.0), torch.ones(1), torch.zeros(1), torch.ones(1))})
    layer = torch.nn.Identity()
    handle = apply_act({"n": layer}, act_map)
    out = layer(torch.tensor([[-0.5], [0.5], [1.0], [2.0]]))
    handle.remove()
    assert out.flatten().tolist() == [-0.5, 2.0, 1.0, 2.0]


def test_map_for_another_model_is_refused_at_apply():
    model = Stack(width=16)
    with pytest.raises(ACTModelMismatchError, match="has 16 units but the map has 8"):
        apply_act(norms(model), random_map({n: 8 for n in norms(model)}))
    with pytest.raises(ACTModelMismatchError, match="missing"):
        apply_act(norms(model), random_map({"unet.other": 16}))
