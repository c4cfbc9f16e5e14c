"""Estimators against closed forms and a plain numpy version written here."""

import numpy as np
import pytest
import torch

from act_core.errors import ACTInputError
from act_core.estimators import gaussian_act, linear_act, matched_quantiles, mean_act, support_bounds


def numpy_linear_act(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort both, pair by rank, least squares per column (equal counts)."""
    a, b = np.sort(a, axis=0).astype(np.float64), np.sort(b, axis=0).astype(np.float64)
    am, bm = a.mean(0), b.mean(0)
    omega = ((a - am) * (b - bm)).sum(0) / ((a - am) ** 2).sum(0)
    return omega, bm - omega * am


@pytest.fixture
def normal_pair():
    rng = np.random.default_rng(0)
    source = rng.normal(0.0, 1.0, size=(4000, 6))
    target = rng.normal(0.5, 2.0, size=(4000, 6))
    return source, target


def test_linear_act_maps_standard_normal_to_shifted_scaled_normal(normal_pair):
    omega, beta = linear_act(*normal_pair)
    assert omega.shape == beta.shape == (6,)
    np.testing.assert_allclose(omega.numpy(), 2.0, atol=0.08)
    np.testing.assert_allclose(beta.numpy(), 0.5, atol=0.08)


def test_linear_act_matches_numpy(normal_pair):
    source, target = normal_pair
    omega, beta = linear_act(torch.from_numpy(source).float(), torch.from_numpy(target).float())
    ref_omega, ref_beta = numpy_linear_act(source.astype(np.float32), target.astype(np.float32))
    np.testing.assert_allclose(omega.numpy(), ref_omega, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(beta.numpy(), ref_beta, rtol=1e-5, atol=1e-6)


def test_mean_and_gaussian_closed_forms(normal_pair):
    source, target = normal_pair
    omega, beta = mean_act(source, target)
    np.testing.assert_array_equal(omega.numpy(), 1.0)
    np.testing.assert_allclose(beta.numpy(), target.mean(0) - source.mean(0), rtol=1e-5, atol=1e-6)
    omega, beta = gaussian_act(source, target)
    ratio = target.std(0, ddof=1) / source.std(0, ddof=1)
    np.testing.assert_allclose(omega.numpy(), ratio, rtol=1e-5)
    np.testing.assert_allclose(beta.numpy(), target.mean(0) - ratio * source.mean(0), rtol=1e-5, atol=1e-6)


def test_unequal_counts_match_quantiles():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(300, 4))
    target = rng.normal(1.0, 3.0, size=(500, 4))
    a, b = matched_quantiles(source, target)
    assert a.shape == b.shape == (500, 4)
    levels = (np.arange(500) + 0.5) / 500
    np.testing.assert_allclose(b.numpy(), np.sort(target, axis=0), rtol=1e-12)
    expected_a = np.stack([np.quantile(source[:, j], levels, method="hazen") for j in range(4)], axis=1)
    np.testing.assert_allclose(a.numpy(), expected_a, rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(4)
    omega, beta = linear_act(rng.normal(size=(3000, 4)), rng.normal(1.0, 3.0, size=(5000, 4)))
    np.testing.assert_allclose(omega.numpy(), 3.0, atol=0.15)
    np.testing.assert_allclose(beta.numpy(), 1.0, atol=0.15)


def test_constant_units_give_identity_scale_and_no_nan():
    source = np.ones((10, 3))
    source[:, 2] = np.arange(10)
    target = np.random.default_rng(2).normal(size=(10, 3))
    for estimator in (linear_act, mean_act, gaussian_act):
        omega, beta = estimator(source, target)
        assert torch.isfinite(omega).all() and torch.isfinite(beta).all()
        if estimator is not mean_act:
            assert omega[0] == 1.0 and omega[1] == 1.0


def test_supports():
    source = np.random.default_rng(3).normal(size=(1000, 5))
    low, high = support_bounds(source, "range")
    np.testing.assert_allclose(low.numpy(), source.min(0), rtol=1e-6)
    np.testing.assert_allclose(high.numpy(), source.max(0), rtol=1e-6)
    low, high = support_bounds(source, "q5-95")
    np.testing.assert_allclose(low.numpy(), np.quantile(source, 0.05, axis=0), rtol=1e-5)
    np.testing.assert_allclose(high.numpy(), np.quantile(source, 0.95, axis=0), rtol=1e-5)
    low, high = support_bounds(source, "unbounded")
    assert torch.isneginf(low).all() and torch.isposinf(high).all()


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (np.zeros((1, 3)), np.zeros((4, 3)), "at least 2"),
        (np.zeros((0, 3)), np.zeros((4, 3)), "at least 2"),
        (np.full((4, 3), np.nan), np.zeros((4, 3)), "NaN"),
        (np.zeros((4, 3)), np.zeros((4, 2)), "same module"),
        (np.zeros(4), np.zeros(4), "shape"),
    ],
)
def test_bad_samples_raise_clear_errors(source, target, message):
    with pytest.raises(ACTInputError, match=message):
        linear_act(source, target)


def test_bad_support_names_the_choices():
    with pytest.raises(ACTInputError, match="q0.5-99.5"):
        support_bounds(np.zeros((4, 2)), "minmax")
