"""Estimation where the activations are (issue 19): parity with a float64 CPU reference, no host reads.

The reference below is the estimators' float64 CPU behaviour written in numpy (every input upcast to float64
first). The tolerances are the ones ``act_core.estimators`` states, on activations of the kind that defeat
float32 moments: values ~1e2 whose units vary by 1e-3..1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import act_core.estimators as estimators
from act_core.apply_modes import APPLY_MODES
from act_core.errors import ACTInputError, ACTWarning
from act_core.estimators import DeviceModuleMap, ModuleEstimator, on_host
from act_core.maps import ModuleMap
from act_core.recording import pool, positions, select_modules, token_mask
from act_core.trajectory import TrajectoryFit

SUPPORTS = ("range", "unbounded", "q5-95")
# (source count, target count): trajectory pairs, the first-step engine's unequal sets, "positions" samples
COUNTS = ((96, 96), (48, 96), (1536, 1536))
# The estimators' docstring: omega relative; beta relative to |beta| + |omega| max|x|; bounds in float32 ulps
TOLERANCE = {"float64": (1e-6, 1e-6, 1), "float32": (2e-6, 2e-6, 2)}
# CUDA joins every device test where there is one (test_cuda_variants_run_where_there_is_cuda says when not).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the cuda variants of this file's device tests did not run",
)
def test_cuda_variants_run_where_there_is_cuda():
    assert "cuda" in DEVICES


def reference(method, support, source, target, shrinkage=1.0, max_omega=10.0):
    """(omega, beta, low, high) as float32 and the guard's counts, all computed in float64 on the CPU."""
    s, t = np.asarray(source, np.float64), np.asarray(target, np.float64)
    clamped = shrunk = 0
    if method == "linear":
        a, b = np.sort(s, axis=0), np.sort(t, axis=0)
        if a.shape[0] != b.shape[0]:  # read both at the same midpoint quantile levels
            count = max(a.shape[0], b.shape[0])
            a, b = (_quantiles(x, count) for x in (a, b))
        ma, mb = a.mean(0), b.mean(0)
        cov, var = ((a - ma) * (b - mb)).sum(0), ((a - ma) ** 2).sum(0)
        prior = shrinkage * np.sort(var)[(var.size - 1) // 2] / a.shape[0]  # torch's median: the lower one
        constant = var + prior <= 1e-12 * (1.0 + (a * a).sum(0))
        omega = np.where(constant, 1.0, (cov + prior) / np.where(constant, 1.0, var + prior))
        raw = np.where(var > 0, cov / np.where(var > 0, var, 1.0), omega)
        clamped = int((omega > max_omega).sum())
        omega = np.minimum(omega, max_omega)
        shrunk = int((np.abs(omega - raw) > 0.1 * np.maximum(np.abs(raw), 1.0)).sum())
        beta = mb - omega * ma
    elif method == "mean":
        beta = t.mean(0) - s.mean(0)
        omega = np.ones_like(beta)
    else:
        std_a, std_b = s.std(0, ddof=1), t.std(0, ddof=1)
        degenerate = (std_a < 1e-4) | (std_b < 1e-4)
        omega = np.where(degenerate, 1.0, std_b / np.where(degenerate, 1.0, std_a))
        beta = np.where(degenerate, 0.0, t.mean(0) - omega * s.mean(0))
        capped = omega > max_omega
        clamped = int(capped.sum())
        omega = np.minimum(omega, max_omega)
        beta = np.where(capped, t.mean(0) - omega * s.mean(0), beta)
    if support == "unbounded":
        low, high = np.full(s.shape[1], -np.inf), np.full(s.shape[1], np.inf)
    elif support == "range":
        low, high = s.min(0), s.max(0)
    else:
        low, high = np.quantile(s, [float(p) / 100 for p in support[1:].split("-")], axis=0)
    return [x.astype(np.float32) for x in (omega, beta, low, high)], (clamped, shrunk)


def _quantiles(sorted_samples, count):
    n = sorted_samples.shape[0]
    position = np.clip((np.arange(count) + 0.5) / count * n - 0.5, 0, n - 1)
    lower = np.floor(position).astype(np.int64)
    weight = (position - lower)[:, None]
    return sorted_samples[lower] * (1 - weight) + sorted_samples[np.minimum(lower + 1, n - 1)] * weight


def activations(n, m, width=160, seed=0):
    """float32 samples around +-1e2 with per-unit spreads 1e-3..1; a few units whose target spread is 20x
    (omega gets capped), one constant unit (shifted only)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-200, 200, width)
    spread = 10 ** rng.uniform(-3, 0, width)
    ratio = rng.uniform(0.5, 2.0, width)
    ratio[:3] = 20.0
    source = base + spread * rng.standard_normal((n, width))
    target = base + spread * rng.uniform(-2, 2, width) + spread * ratio * rng.standard_normal((m, width))
    source[:, 5], target[:, 5] = base[5], base[5] + 0.25
    return source.astype(np.float32), target.astype(np.float32)


@pytest.fixture
def float32_moments(monkeypatch):
    """The moments of a device without float64 (MPS), run on this machine."""
    monkeypatch.setattr(estimators, "_moments_dtype", lambda device: torch.float32)


def assert_within(module_map, expected, source, tolerance):
    omega_rtol, beta_rtol, ulps = tolerance
    omega, beta, low, high = (getattr(module_map, f).cpu().numpy() for f in ("omega", "beta", "low", "high"))
    ref_omega, ref_beta, ref_low, ref_high = expected
    np.testing.assert_array_less(np.abs(omega - ref_omega), omega_rtol * np.abs(ref_omega))
    scale = np.abs(ref_beta) + np.abs(ref_omega) * np.abs(source).max(0)  # the terms x * omega + beta adds
    np.testing.assert_array_less(np.abs(beta - ref_beta), beta_rtol * scale)
    for got, want in ((low, ref_low), (high, ref_high)):  # range bounds are exact, quantiles interpolated
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[~finite], want[~finite])
        spacing = np.spacing(np.abs(want[finite]))
        np.testing.assert_array_less(np.abs(got[finite] - want[finite]), ulps * spacing * 1.01)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("moments", ["float64", "float32"])
@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("apply_mode", APPLY_MODES)
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("method", estimators.METHODS)
def test_on_device_estimates_match_the_float64_cpu_reference(
    method, support, apply_mode, counts, moments, device, request
):
    if moments == "float32":
        request.getfixturevalue("float32_moments")
    source, target = activations(*counts)
    estimator = ModuleEstimator(method, support, apply_mode)
    module_map = estimator("unit", torch.from_numpy(source).to(device), torch.from_numpy(target).to(device))
    assert isinstance(module_map, DeviceModuleMap) and module_map.apply_mode == apply_mode
    assert all(getattr(module_map, f).device.type == device for f in ("omega", "beta", "low", "high"))
    assert module_map.omega.dtype == torch.float32 and module_map.unbounded == (support == "unbounded")
    expected, counts_expected = reference(method, support, source, target)
    assert_within(module_map, expected, source, TOLERANCE[moments])
    guard = estimator.metadata()["omega_guard"]
    assert (guard["clamped_units"], guard["shrunk_units"]) == counts_expected
    saved = on_host(module_map)
    assert type(saved) is ModuleMap and saved.omega.device.type == "cpu" and saved.omega.is_contiguous()


@pytest.mark.parametrize("estimate", [estimators.linear_act, estimators.mean_act, estimators.gaussian_act])
def test_pure_estimators_on_numpy_float64_are_the_reference(estimate):
    """numpy input (float64) runs in float64 end to end: the reference itself, to float32 rounding."""
    source, target = activations(96, 96)
    if estimate is estimators.linear_act:  # the plain estimator: no guard, and no cap
        ref_omega, ref_beta = _plain_linear_reference(source, target)
    else:
        method = "mean" if estimate is estimators.mean_act else "gaussian"
        (ref_omega, ref_beta, _, _), _ = reference(method, "unbounded", source, target, max_omega=1e9)
    omega, beta = estimate(source.astype(np.float64), target.astype(np.float64))
    assert omega.device.type == "cpu" and omega.dtype == torch.float32
    np.testing.assert_allclose(omega.numpy(), ref_omega, rtol=1e-6)
    np.testing.assert_allclose(beta.numpy(), ref_beta, rtol=1e-6, atol=1e-6 * 200)


def _plain_linear_reference(source, target):
    a, b = np.sort(source.astype(np.float64), 0), np.sort(target.astype(np.float64), 0)
    ma, mb = a.mean(0), b.mean(0)
    var = ((a - ma) ** 2).sum(0)
    constant = var <= 1e-12 * (1.0 + (a * a).sum(0))
    omega = np.where(constant, 1.0, ((a - ma) * (b - mb)).sum(0) / np.where(constant, 1.0, var))
    return omega.astype(np.float32), (mb - omega * ma).astype(np.float32)


def test_the_data_defeats_naive_float32_moments():
    """What the tolerance is for: one-pass float32 sums on these activations are off by far more."""
    source, _ = activations(1536, 1536)
    a = np.sort(source, 0)  # float32
    n = np.float32(a.shape[0])
    naive_var = (a * a).sum(0, dtype=np.float32) - (a.sum(0, dtype=np.float32) ** 2) / n
    true_var = ((a.astype(np.float64) - a.astype(np.float64).mean(0)) ** 2).sum(0)
    varies = true_var > 0  # all but the constant unit
    error = np.abs(naive_var - true_var)[varies] / true_var[varies]
    assert np.median(error) > 0.1 > 1000 * TOLERANCE["float32"][0]


# ------------------------------------------------------------------------------------------ host reads
class Dispatched(TorchDispatchMode):
    """Records the aten ops dispatched (and the devices their copies go to) while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.copies_to: list[torch.device] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(func.overloadpacket.__name__)
        if func.overloadpacket.__name__ in ("_to_copy", "to") and kwargs.get("device") is not None:
            self.copies_to.append(torch.device(kwargs["device"]))
        return func(*args, **kwargs)


HOST_READS = {"_local_scalar_dense", "item", "equal", "is_nonzero"}


@pytest.mark.parametrize("method", estimators.METHODS)
def test_estimation_dispatches_no_host_read_and_no_copy(method):
    """On CPU the dispatch stream still shows what asks for a host value (.item(), bool(), torch.equal)."""
    source, target = (torch.from_numpy(x) for x in activations(48, 96, width=16))
    for support in SUPPORTS:
        estimator = ModuleEstimator(method, support)
        with Dispatched() as dispatched:
            for name in ("a", "b", "c"):
                estimator(name, source, target)
                estimator(name + "2", target[:48], target[:48])  # equal counts: the identical-samples flag
        assert HOST_READS.isdisjoint(dispatched.ops), sorted(HOST_READS & set(dispatched.ops))
        assert all(device.type == "cpu" for device in dispatched.copies_to)


@pytest.mark.parametrize("method", estimators.METHODS)
def test_estimation_runs_on_the_meta_device(method):
    """Meta tensors have no data: any host read or copy to the host raises, so this pins the hot path."""
    for support in SUPPORTS:
        for counts in ((48, 96), (64, 64)):
            estimator = ModuleEstimator(method, support, "per_element")
            module_map = estimator(
                "m", torch.empty(counts[0], 32, device="meta"), torch.empty(counts[1], 32, device="meta")
            )
            assert module_map.omega.device.type == "meta" and module_map.low.shape == (32,)


def fake_reads(monkeypatch) -> list[int]:
    """Replace the one host read of the deferred checks: count it, answer "all clear"."""
    reads = []

    def read(values):
        reads.append(values.shape[0])
        return [[0] * values.shape[1] for _ in range(values.shape[0])]

    monkeypatch.setattr(estimators, "_read_host", read)
    return reads


def toy_fit(model, device, steps, statistic="mean", estimator=None, pairs=4):
    modules = select_modules(model, ["1", "2", "3"])
    estimator = estimator or ModuleEstimator("linear", None, "spatial_mean")
    session = TrajectoryFit(modules, estimator, num_pairs=pairs, statistic=statistic)
    with session, torch.no_grad():
        for step in range(steps):
            level = 1.0 - step / steps
            with session.call(level, source=slice(pairs, 2 * pairs), target=slice(0, pairs)):
                model(torch.empty(2 * pairs, 3, 8, 8, device=device).normal_())
    return session, estimator


def conv_model(device):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
    ).to(device)


@pytest.mark.parametrize("statistic", ["mean", "positions"])
def test_a_trajectory_fit_reads_the_host_once_per_step_not_per_module(monkeypatch, statistic):
    """Hooks, pooling, estimation and transport of a 3-step fit on meta tensors: the deferred checks are read
    once when each new step starts (3 modules, 3 steps: 2 reads), and nothing else reads a value."""
    reads = fake_reads(monkeypatch)
    session, _ = toy_fit(conv_model("meta"), "meta", steps=3, statistic=statistic)
    assert session.stats.steps == 3 and len(session.maps) == 3
    assert reads == [3, 3]
    assert all(m.omega.device.type == "meta" for maps in session.maps.values() for m in maps)


def test_a_cpu_fit_keeps_its_maps_until_the_result_and_saves_them_on_cpu(monkeypatch, tmp_path):
    reads = []
    real_read = estimators._read_host
    monkeypatch.setattr(estimators, "_read_host", lambda values: reads.append(1) or real_read(values))
    session, estimator = toy_fit(conv_model("cpu"), "cpu", steps=4)
    estimator.check_not_identical(len(session.maps))
    estimator.metadata()
    assert len(reads) == 4  # three step starts and the end of the fit
    act_map = session.result(estimator.metadata())
    assert all(type(m) is ModuleMap and m.omega.shape == (4, m.width) for m in act_map.modules.values())
    act_map.save(tmp_path / "map.safetensors")


def test_non_finite_samples_raise_naming_the_module_and_the_fix_once_read():
    estimator = ModuleEstimator("linear")
    source, target = torch.randn(8, 6), torch.randn(8, 6)
    source[2, [1, 4]] = float("nan")
    estimator("clean", torch.randn(8, 6), torch.randn(8, 6))
    module_map = estimator("unet.mid.norm", source, target)  # no host read here: no error yet
    assert isinstance(module_map, DeviceModuleMap)
    message = (
        r"Module 'unet.mid.norm': source activations contain NaN or Inf \(units \[1, 4\]\.\.\.\).*float32"
    )
    with pytest.raises(ACTInputError, match=message):
        estimator.check_not_identical(2)
    estimator("unet.mid.norm", torch.randn(8, 6), target.clone().fill_(float("inf")))
    with pytest.raises(ACTInputError, match="Module 'unet.mid.norm': target activations"):
        estimator("unet.mid.norm", torch.randn(8, 6), torch.randn(8, 6))  # the next step reads the last one


def test_identical_samples_are_found_when_read():
    estimator = ModuleEstimator("mean")
    samples = torch.randn(6, 4)
    estimator("a", samples, samples.clone())
    assert estimator.identical == ["a"]
    with pytest.warns(ACTWarning, match="identical at every hooked module"):
        estimator.check_not_identical(1)


# ------------------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("device", ["meta", *DEVICES])
def test_pooled_samples_stay_on_the_activation_device_in_float32(device):
    for shape in ((4, 8), (4, 5, 8), (4, 8, 3, 3)):
        activation = torch.ones(shape, device=device, dtype=torch.float16)
        for summarise in (pool, positions):
            samples = summarise(activation)
            assert samples.device == activation.device and samples.dtype == torch.float32
            assert samples.shape[-1] == 8


def test_pooled_samples_do_not_alias_the_activation():
    for activation in (torch.randn(4, 8), torch.randn(4, 5, 8)):
        kept = [pool(activation), positions(activation)]
        before = [k.clone() for k in kept]
        activation.add_(1.0)
        for k, b in zip(kept, before, strict=True):
            assert torch.equal(k, b)


def test_a_token_mask_is_moved_to_the_device_once_per_forward():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    activations_ = [torch.randn(2, 3, 4, device="meta") for _ in range(3)]
    with token_mask(mask), Dispatched() as dispatched:
        for activation in activations_:
            pool(activation)
    assert dispatched.copies_to.count(torch.device("meta")) == 1
