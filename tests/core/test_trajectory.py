"""The trajectory engine (act_core.trajectory) and time-aware maps, on plain torch models."""

import json

import pytest
import torch
from helpers import Stack

from act_core.applying import apply_act, bucket_position
from act_core.calibration import calibration_alignment, calibration_gain
from act_core.errors import ACTInputError
from act_core.estimators import ModuleEstimator, robust_linear_act
from act_core.maps import ACTMap, ModuleMap
from act_core.recording import select_modules
from act_core.trajectory import TrajectoryFit

N = 12  # prompt pairs
LEVELS = (0.9, 0.5, 0.1)


def rows(n=N):
    return slice(n, 2 * n), slice(0, n)  # source rows, target rows of a [target; source] batch


def data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(N, 16, generator=generator)
    target = torch.randn(N, 16, generator=generator) * 1.5 + 0.7
    return source, target


def run_steps(model, session, source, target, levels=LEVELS, split=1):
    """A toy sampler: each step feeds [target; source] rows (as ``split`` calls) at one noise level."""
    outputs = []
    for level in levels:
        x_t, x_s = target * (1 + level), source * (1 + level)
        chunk = N // split
        for k in range(split):
            part = slice(k * chunk, (k + 1) * chunk)
            batch = torch.cat([x_t[part], x_s[part]])
            source_rows, target_rows = slice(chunk, 2 * chunk), slice(0, chunk)
            with torch.no_grad(), session.call(level, source=source_rows, target=target_rows):
                outputs.append(model(batch))
    return outputs


def fitted(model, mode="causal", split=1, levels=LEVELS):
    modules = select_modules(model, ["*norm*"])
    session = TrajectoryFit(
        modules, ModuleEstimator("linear", "unbounded", "per_element"), num_pairs=N, mode=mode
    )
    source, target = data()
    with session:
        run_steps(model, session, source, target, levels, split)
    return session, session.result({"test": True}), modules


def test_one_map_per_step_keyed_by_noise_level_exact_causal():
    model = Stack(depth=3)
    session, act_map, modules = fitted(model)
    assert act_map.buckets == LEVELS and session.stats.strategy == "exact" and session.stats.steps == 3
    assert act_map.metadata["causal_strategy"] == "exact" and act_map.metadata["test"] is True
    first = next(iter(act_map.modules))
    assert act_map.modules[first].omega.shape == (3, 16)
    # The first module at each step sees no earlier map: its map is Linear-AcT of the raw pooled rows.
    source, target = data()
    with torch.no_grad():
        block = model.blocks[0]
        for k, level in enumerate(LEVELS):
            a = block.norm(block.linear(source * (1 + level)))
            b = block.norm(block.linear(target * (1 + level)))
            omega, beta = robust_linear_act(a, b)
            torch.testing.assert_close(act_map.modules[first].omega[k], omega)
            torch.testing.assert_close(act_map.modules[first].beta[k], beta)


def test_causal_transport_reaches_the_target_at_every_hooked_module():
    """At lambda 1 with the step's noise level, the transported source rows match the target's moments."""
    model = Stack(depth=3)
    _, act_map, modules = fitted(model)
    source, target = data()
    last = list(act_map.modules)[-1]
    seen = {}
    act = apply_act(modules, act_map, 1.0)  # hooks run in order: this one sees the transported output
    handle = modules[last].register_forward_hook(lambda m, a, out: seen.setdefault("x", out.detach()))
    try:
        for level in LEVELS:
            seen.clear()
            act.set_call(rows=slice(N, 2 * N), noise_level=level)
            with torch.no_grad():
                model(torch.cat([target * (1 + level), source * (1 + level)]))
            steered, goal = seen["x"][N:], seen["x"][:N]
            torch.testing.assert_close(steered.mean(0), goal.mean(0), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(steered.std(0), goal.std(0), atol=0.1, rtol=0.1)
    finally:
        act.remove()
        handle.remove()


def test_split_calls_fall_back_to_lagged_and_stay_close():
    """Lagged fitting steers with the previous step's maps: close to exact when steps change little."""
    model = Stack(depth=3)
    levels = tuple(0.9 - 0.05 * k for k in range(12))
    _, exact, _ = fitted(model, levels=levels)
    session, lagged, _ = fitted(model, split=3, levels=levels)
    assert session.stats.strategy == "lagged" and lagged.metadata["causal_strategy"] == "lagged"
    first = next(iter(exact.modules))
    # the first module is never transported upstream: lagged equals exact there
    torch.testing.assert_close(lagged.modules[first].omega, exact.modules[first].omega, rtol=1e-4, atol=1e-4)
    for name in exact.modules:
        gap = (lagged.modules[name].beta[1:] - exact.modules[name].beta[1:]).abs().mean()
        assert gap < 0.25 * exact.modules[name].beta.abs().mean() + 0.02, name


def fitted_together(model, calls_of_sources=3, member_splits=1, levels=LEVELS, fail_in=None):
    """Each step as a split host runs it: the target rows in one call, then the source rows in
    ``calls_of_sources`` calls that meet at every module (``run_together``); a member may itself run its
    rows as ``member_splits`` calls one after the other (what ComfyUI does when memory is short)."""
    modules = select_modules(model, ["*norm*"])
    session = TrajectoryFit(modules, ModuleEstimator("linear", "unbounded", "per_element"), num_pairs=N)
    source, target = data()
    chunk = N // calls_of_sources
    with session, torch.no_grad():
        for level in levels:
            with session.call(level, source=None, target=slice(0, N)):
                model(target * (1 + level))

            def member(k, level=level):
                rows = source[k * chunk : (k + 1) * chunk] * (1 + level)
                if k == fail_in:
                    raise RuntimeError("out of memory in member")
                if member_splits == 1:
                    return model(rows)
                part = chunk // member_splits
                outputs = []
                for j in range(member_splits):
                    with session.call(level, source=slice(0, part), target=None):
                        outputs.append(model(rows[j * part : (j + 1) * part]))
                return torch.cat(outputs)

            def opened(k, level=level):
                with session.call(level, source=slice(0, chunk), target=None):
                    return member(k)

            runs = [
                lambda k=k: member(k) if member_splits > 1 else opened(k) for k in range(calls_of_sources)
            ]
            outputs = session.run_together(runs)
            assert torch.cat(outputs).shape == (N, 16)
    return session, session.result()


@pytest.mark.parametrize("calls", [2, 3, 12])
def test_source_calls_that_meet_at_every_module_give_the_one_call_maps(calls):
    """Exact fitting at any memory budget: the step's source rows over several calls (one pair each at
    most), meeting at every module, give the maps of one call holding all rows."""
    model = Stack(depth=4)
    _, exact, _ = fitted(model)
    session, together = fitted_together(model, calls_of_sources=calls)
    assert session.stats.strategy == "exact" and together.metadata["causal_strategy"] == "exact"
    assert session.stats.concurrent_calls == calls * len(LEVELS)
    for name, module_map in exact.modules.items():
        torch.testing.assert_close(together.modules[name].omega, module_map.omega, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.modules[name].beta, module_map.beta, rtol=1e-5, atol=1e-6)


def test_a_member_that_splits_its_rows_falls_back_to_lagged_without_deadlock():
    """A member running its rows as calls one after the other cannot bring them to a module together: the
    rendezvous notices that every live member waits, releases them (lagged), and the fit completes."""
    model = Stack(depth=3)
    session, act_map = fitted_together(model, calls_of_sources=2, member_splits=2)
    assert session.stats.strategy == "lagged" and act_map.buckets == LEVELS


def test_a_failing_member_stops_the_group_and_raises_its_error():
    model = Stack(depth=3)
    with pytest.raises(RuntimeError, match="out of memory in member"):
        fitted_together(model, calls_of_sources=3, fail_in=1)


def test_at_once_never_transports_while_fitting():
    model = Stack(depth=3)
    session, act_map, _ = fitted(model, mode="at_once")
    assert act_map.metadata["mode"] == "at_once" and act_map.metadata["causal_strategy"] is None
    _, causal, _ = fitted(model)
    last = list(act_map.modules)[-1]
    assert not torch.allclose(act_map.modules[last].beta, causal.modules[last].beta)


def test_repeated_levels_are_steered_not_recorded():
    model = Stack(depth=2)
    session, act_map, _ = fitted(model, levels=(0.9, 0.5, 0.5, 0.1))
    assert act_map.buckets == (0.9, 0.5, 0.1) and session.stats.steps == 3


def test_bad_use_is_refused():
    model = Stack(depth=2)
    modules = select_modules(model, ["*norm*"])
    estimate = ModuleEstimator("linear", "unbounded", "per_element")
    with pytest.raises(ACTInputError, match="at least 2 prompt pairs"):
        TrajectoryFit(modules, estimate, num_pairs=1)
    session = TrajectoryFit(modules, estimate, num_pairs=N)
    source, target = data()
    with (
        session,
        pytest.raises(ACTInputError, match="more than once in one model call"),
        session.call(0.5, source=slice(N, 2 * N), target=slice(0, N)),
    ):
        model(torch.cat([target, source]))
        model(torch.cat([target, source]))
    session = TrajectoryFit(modules, estimate, num_pairs=N)
    with (
        session,
        pytest.raises(ACTInputError, match="in \\[0, 1\\]"),
        session.call(2.0, source=slice(0, 1), target=slice(1, 2)),
    ):
        pass
    session = TrajectoryFit(modules, estimate, num_pairs=N)
    with session:
        with session.call(0.5, source=slice(N // 2, N), target=slice(0, N // 2)):
            model(torch.cat([target[: N // 2], source[: N // 2]]))
        with pytest.raises(ACTInputError, match="every pair must run at every step"):
            session.result()


def _bucketed(levels=(0.8, 0.2)):
    omega = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    beta = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    inf = torch.full((2, 2), float("inf"))
    return ACTMap({"n": ModuleMap(omega, beta, -inf, inf)}, {"method": "linear"}, levels)


def test_hooks_interpolate_between_buckets_and_clamp_outside():
    assert bucket_position((0.8, 0.2), 0.5) == (1, 0, pytest.approx(0.5))
    assert bucket_position((0.8, 0.2), 0.95) == (0, 0, 0.0)
    assert bucket_position((0.8, 0.2), 0.0) == (1, 1, 0.0)
    layer = torch.nn.Identity()
    handle = apply_act({"n": layer}, _bucketed(), 1.0)
    x = torch.ones(1, 2)
    try:
        handle.set_call(noise_level=0.8)
        torch.testing.assert_close(layer(x), torch.tensor([[2.0, 2.0]]))
        handle.set_call(noise_level=0.2)
        torch.testing.assert_close(layer(x), torch.tensor([[2.0, 3.0]]))
        handle.set_call(noise_level=0.5)  # halfway: omega (1.5, 2), beta (0.5, 0.5)
        torch.testing.assert_close(layer(x), torch.tensor([[2.0, 2.5]]))
        handle.set_call(noise_level=1.0)  # beyond the fitted range: the nearest bucket
        torch.testing.assert_close(layer(x), torch.tensor([[2.0, 2.0]]))
    finally:
        handle.remove()


def test_bucketed_maps_round_trip_and_version_one_files_load(tmp_path):
    act_map = _bucketed()
    loaded = ACTMap.load(act_map.save(tmp_path / "timed.safetensors"))
    assert loaded.equal(act_map) and loaded.buckets == (0.8, 0.2)
    assert "2, noise levels 0.800 .. 0.200" in loaded.summary()

    from safetensors.torch import save_file

    # A file as version 0.1.0 wrote it (format_version 1, no buckets entry).
    ones = torch.ones(3)
    tensors = {"n.omega": 2 * ones, "n.beta": ones.clone(), "n.low": -ones, "n.high": ones.clone()}
    header = {
        "format": "act_map",
        "format_version": "1",
        "modules": json.dumps([{"name": "n", "width": 3, "apply_mode": "per_element"}]),
        "metadata": json.dumps({"method": "linear", "act_version": "0.1.0"}),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    old = ACTMap.load(tmp_path / "old.safetensors")
    assert old.buckets is None and old.modules["n"].omega.tolist() == [2.0, 2.0, 2.0]


def test_time_aware_maps_do_not_fold():
    from act_core.applying import fold_act

    with pytest.raises(ACTInputError, match="time-aware"):
        fold_act({"n": torch.nn.Linear(2, 2)}, _bucketed(), 1.0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_calls_run_together_in_the_callers_grad_mode(mode):
    """Grad mode is per thread: members run in the caller's (a member with grad on would keep every
    activation of its forward alive as an autograd graph: memory)."""
    model = Stack(depth=2)
    session = TrajectoryFit(
        select_modules(model, ["*norm*"]), ModuleEstimator("linear", "unbounded", "per_element"), num_pairs=N
    )
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[
        mode
    ]

    def member():
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), model(torch.randn(2, 16)).grad_fn

    with context():
        results = session.run_together([member, member])
    for grad, inference, grad_fn in results:
        assert grad == (mode == "grad") and inference == (mode == "inference_mode")
        assert (grad_fn is not None) == (mode == "grad")


def test_calibration_rules_match_the_target_move_by_projection_or_by_norm():
    plain = torch.zeros(2, 4)
    transported = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # the target moves 2 along the transport's direction and 2 across it: cosine 1/sqrt(2)
    target = torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert calibration_gain(target, transported, plain, "projection") == pytest.approx(2.0)
    assert calibration_gain(target, transported, plain) == pytest.approx(8**0.5)  # "norm", the default
    assert calibration_alignment(target, transported, plain) == pytest.approx(2**-0.5)
    assert calibration_gain(100 * target, transported, plain, "norm") == 3.0  # clamped
    assert calibration_gain(target, plain, plain, "norm") == 1.0  # no move: no gain
    with pytest.raises(ACTInputError, match="calibration must be one of"):
        calibration_gain(target, transported, plain, "cosine")
    with pytest.raises(ACTInputError, match="calibration must be one of"):
        TrajectoryFit({"m": torch.nn.Identity()}, None, num_pairs=2, calibration="cosine")
