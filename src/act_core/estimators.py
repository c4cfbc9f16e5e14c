"""Per-unit transport estimators: pure functions on pooled activation samples.

Every estimator takes a source sample ``(N, D)`` and a target sample ``(M, D)`` (torch tensors or numpy
arrays) and returns ``(omega, beta)``, each of shape ``(D,)``, such that the affine map
``T(x) = omega * x + beta`` transports the source distribution of each unit (column) toward the
target's. Everything is computed in float64 (sums of squares of activations lose precision in float32)
and returned as float32 torch tensors, the dtype maps are stored in.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ACTInputError, ACTWarning
from .validation import check_omega_guard

ArrayLike = torch.Tensor | np.ndarray
Estimator = Callable[[ArrayLike, ArrayLike], "tuple[torch.Tensor, torch.Tensor]"]

# Units whose sample variance is below this (relative to their scale) are treated as constant.
_CONSTANT_UNIT_RTOL = 1e-12
# Gaussian-OT leaves units alone when either side's std is below this (the spec's threshold).
GAUSSIAN_MIN_STD = 1e-4

METHODS = ("linear", "mean", "gaussian")
# Robust Linear-AcT (see ``robust_linear_act``): pseudo-samples that pull omega toward 1, and a hard cap.
DEFAULT_SHRINKAGE = 1.0
MAX_OMEGA = 10.0
SUPPORT_SOURCE_RANGE = "range"
SUPPORT_UNBOUNDED = "unbounded"
_QUANTILE_SUPPORT = re.compile(r"^q(?P<lo>\d+(\.\d+)?)-(?P<hi>\d+(\.\d+)?)$")


def _as_float64(name: str, samples: ArrayLike) -> torch.Tensor:
    """Validate one side's samples and return them as a (N, D) float64 CPU tensor."""
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    if not isinstance(samples, torch.Tensor):
        raise ACTInputError(
            f"{name} samples must be a torch tensor or numpy array, got {type(samples).__name__}."
        )
    if samples.ndim != 2:
        raise ACTInputError(
            f"{name} samples must have shape (num_samples, num_units), got {tuple(samples.shape)}. "
            "Pool activations to one vector per prompt before estimating."
        )
    if samples.shape[0] < 2:
        raise ACTInputError(
            f"{name} has {samples.shape[0]} sample(s); transport needs at least 2 per side "
            f"(the paper uses hundreds). Add more prompts to the {name} set."
        )
    samples = samples.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(samples).all():
        bad = (~torch.isfinite(samples)).any(dim=0).nonzero().flatten()[:5].tolist()
        raise ACTInputError(
            f"{name} activations contain NaN or Inf (units {bad}...). The model produced non-finite values: "
            "run it in float32 (fp16 overflows are the usual cause) and check the prompts."
        )
    return samples


def _check_pair(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    src = _as_float64("source", source)
    tgt = _as_float64("target", target)
    if src.shape[1] != tgt.shape[1]:
        raise ACTInputError(
            f"source has {src.shape[1]} units but target has {tgt.shape[1]}: both must come from the same module."
        )
    return src, tgt


def matched_quantiles(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort both samples per unit and pair them by rank (1-D optimal transport).

    With equal counts this is exactly "sort both and pair". With unequal counts N != M both sorted
    samples are read at the same max(N, M) quantile levels (linear interpolation), so every sample of
    the larger side is used and the pairing is still monotone.
    """
    src, tgt = _check_pair(source, target)
    src_sorted, _ = torch.sort(src, dim=0)
    tgt_sorted, _ = torch.sort(tgt, dim=0)
    if src.shape[0] == tgt.shape[0]:
        return src_sorted, tgt_sorted
    levels = (torch.arange(max(src.shape[0], tgt.shape[0]), dtype=torch.float64) + 0.5) / max(
        src.shape[0], tgt.shape[0]
    )
    return _read_quantiles(src_sorted, levels), _read_quantiles(tgt_sorted, levels)


def _read_quantiles(sorted_samples: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Empirical quantiles (midpoint convention) of column-sorted samples at `levels` in (0, 1)."""
    n = sorted_samples.shape[0]
    position = (levels * n - 0.5).clamp(0, n - 1)
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=n - 1)
    weight = (position - lower).unsqueeze(1)
    return sorted_samples[lower] * (1 - weight) + sorted_samples[upper] * weight


def linear_act(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-AcT: the least-squares affine fit to the rank-paired samples, per unit.

    ``omega = sum((a - mean_a)(b - mean_b)) / sum((a - mean_a)^2)``, ``beta = mean_b - omega * mean_a``,
    with a, b the sorted source and target. Constant source units get omega = 1 (a pure shift).
    """
    a, b = matched_quantiles(source, target)
    a_centered = a - a.mean(dim=0)
    b_centered = b - b.mean(dim=0)
    covariance = (a_centered * b_centered).sum(dim=0)
    variance = (a_centered * a_centered).sum(dim=0)
    constant = variance <= _CONSTANT_UNIT_RTOL * (1.0 + (a * a).sum(dim=0))
    omega = torch.where(
        constant, torch.ones_like(variance), covariance / torch.where(constant, 1.0, variance)
    )
    beta = b.mean(dim=0) - omega * a.mean(dim=0)
    return omega.float(), beta.float()


@dataclass
class Guard:
    """How ``robust_linear_act`` kept omega sane, for the map's metadata."""

    shrinkage: float
    max_omega: float
    clamped_units: int = 0
    shrunk_units: int = 0


def robust_linear_act(
    source: ArrayLike,
    target: ArrayLike,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_omega: float = MAX_OMEGA,
    guard: Guard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-AcT with omega shrunk toward 1 (Mean-AcT) where a unit's source spread is tiny.

    Plain Linear-AcT divides by the source variance, so a unit that barely varies over the (few)
    prompts gets a huge omega (up to 8e4 seen on a full SDXL fitted from 2 + 2 prompts), which
    extrapolates wildly at generation. Here ``shrinkage`` pseudo-pairs lying on the identity, with
    the spread of a typical unit of the module (the median source variance), are added to the
    least-squares fit:

        omega = (sum (a - ma)(b - mb) + s * v) / (sum (a - ma)^2 + s * v),  v = median unit variance

    Units with a normal spread are barely changed (the pseudo-pairs weigh ``s`` of ``N`` samples);
    near-constant units end near omega = 1, a pure shift. omega is then capped at ``max_omega``;
    beta = mean_b - omega * mean_a keeps the means matched exactly. ``guard`` (if given) counts the
    units that were clamped, and those whose omega moved by more than 10%.
    """
    shrinkage, max_omega = check_omega_guard(shrinkage, max_omega)
    a, b = matched_quantiles(source, target)
    a_centered = a - a.mean(dim=0)
    b_centered = b - b.mean(dim=0)
    covariance = (a_centered * b_centered).sum(dim=0)
    variance = (a_centered * a_centered).sum(dim=0)
    typical = variance.median() / a.shape[0]
    prior = shrinkage * typical
    constant = variance + prior <= _CONSTANT_UNIT_RTOL * (1.0 + (a * a).sum(dim=0))
    denominator = torch.where(constant, 1.0, variance + prior)
    omega = torch.where(constant, torch.ones_like(variance), (covariance + prior) / denominator)
    raw = torch.where(variance > 0, covariance / torch.where(variance > 0, variance, 1.0), omega)
    clamped = omega > max_omega
    omega = omega.clamp(max=max_omega)
    if guard is not None:
        guard.clamped_units += int(clamped.sum())
        guard.shrunk_units += int(((omega - raw).abs() > 0.1 * raw.abs().clamp_min(1.0)).sum())
    beta = b.mean(dim=0) - omega * a.mean(dim=0)
    return omega.float(), beta.float()


def mean_act(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-AcT: a pure shift by the difference of means (omega = 1)."""
    src, tgt = _check_pair(source, target)
    beta = tgt.mean(dim=0) - src.mean(dim=0)
    return torch.ones_like(beta).float(), beta.float()


def gaussian_act(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-OT: the optimal map between per-unit Gaussians fitted to each side.

    ``omega = std_b / std_a``, ``beta = mean_b - omega * mean_a``. Units with std below 1e-4 on either
    side are left unchanged (omega = 1, beta = 0): their ratio would be noise.
    """
    src, tgt = _check_pair(source, target)
    std_a, std_b = src.std(dim=0), tgt.std(dim=0)
    degenerate = (std_a < GAUSSIAN_MIN_STD) | (std_b < GAUSSIAN_MIN_STD)
    omega = torch.where(degenerate, 1.0, std_b / torch.where(degenerate, 1.0, std_a))
    beta = torch.where(degenerate, 0.0, tgt.mean(dim=0) - omega * src.mean(dim=0))
    return omega.float(), beta.float()


ESTIMATORS: dict[str, Estimator] = {"linear": linear_act, "mean": mean_act, "gaussian": gaussian_act}


def get_estimator(method: str) -> Estimator:
    """Look up an estimator by name ("linear", "mean" or "gaussian")."""
    try:
        return ESTIMATORS[method]
    except KeyError:
        raise ACTInputError(f"Unknown ACT method {method!r}; choose one of {', '.join(METHODS)}.") from None


def default_support(method: str) -> str:
    """The paper's support per method: source [min, max] for Linear-AcT, unbounded otherwise."""
    return SUPPORT_SOURCE_RANGE if method == "linear" else SUPPORT_UNBOUNDED


def validate_support(support: str) -> str:
    """Check a support spec: "range", "unbounded" or an inner quantile range such as "q0.5-99.5"."""
    if support in (SUPPORT_SOURCE_RANGE, SUPPORT_UNBOUNDED):
        return support
    match = _QUANTILE_SUPPORT.match(support)
    if match and 0 <= float(match["lo"]) < float(match["hi"]) <= 100:
        return support
    raise ACTInputError(
        f"Unknown support {support!r}. Use 'range' (source [min, max], the Linear-AcT default), "
        "'unbounded', or an inner quantile range such as 'q0.5-99.5' or 'q40-60' (percent, low < high)."
    )


def support_bounds(source: ArrayLike, support: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit (low, high) bounds of the support mask, computed from the source sample.

    The mask is ``low < x < high`` (strict, as in the reference), so a constant unit's range is empty and
    the unit is left alone. Unbounded support gives (-inf, +inf).
    """
    support = validate_support(support)
    src = _as_float64("source", source)
    if support == SUPPORT_UNBOUNDED:
        inf = torch.full((src.shape[1],), float("inf"))
        return -inf, inf
    if support == SUPPORT_SOURCE_RANGE:
        return src.min(dim=0).values.float(), src.max(dim=0).values.float()
    match = _QUANTILE_SUPPORT.match(support)
    levels = torch.tensor([float(match["lo"]), float(match["hi"])], dtype=torch.float64) / 100
    bounds = torch.quantile(src, levels, dim=0)
    return bounds[0].float(), bounds[1].float()


class ModuleEstimator:
    """Turns one module's pooled source and target samples into its ``ModuleMap``.

    One place for what every fitting engine (first-step, trajectory) needs: the sample-count and
    balance checks, the estimator (Linear-AcT with the omega guard of ``robust_linear_act``), the
    support, the apply mode, and a record of what the guard did and which modules saw identical
    source and target samples (a map that does nothing).
    """

    def __init__(
        self,
        method: str = "linear",
        support: str | None = None,
        apply_mode: str = "spatial_mean",
        *,
        max_imbalance: float = 4.0,
        shrinkage: float = DEFAULT_SHRINKAGE,
        max_omega: float = MAX_OMEGA,
    ):
        from .maps import APPLY_MODES

        get_estimator(method)
        if apply_mode not in APPLY_MODES:
            raise ACTInputError(f"apply_mode must be one of {APPLY_MODES}, got {apply_mode!r}.")
        self.method = method
        self.support = validate_support(support or default_support(method))
        self.apply_mode = apply_mode
        self.max_imbalance = max_imbalance
        shrinkage, max_omega = check_omega_guard(shrinkage, max_omega)
        self.guard = Guard(shrinkage=shrinkage, max_omega=max_omega)
        self.identical: list[str] = []
        self.sample_counts: tuple[int, int] | None = None

    def __call__(self, name: str, source: torch.Tensor, target: torch.Tensor):
        from .maps import ModuleMap

        n, m = source.shape[0], target.shape[0]
        for side, count in (("source", n), ("target", m)):
            if count < 2:
                raise ACTInputError(
                    f"The {side} set gave {count} sample(s); transport needs at least 2 per side. "
                    f"Add {side} prompts."
                )
        if max(n, m) > self.max_imbalance * min(n, m):
            raise ACTInputError(
                f"Unbalanced prompt sets: {n} source vs {m} target samples (ratio above {self.max_imbalance}). "
                "Give both sides a similar number of prompts, or raise max_imbalance."
            )
        if self.sample_counts is None:
            self.sample_counts = (n, m)
        if n == m and torch.equal(source, target) and name not in self.identical:
            self.identical.append(name)
        try:
            if self.method == "linear":
                omega, beta = robust_linear_act(
                    source, target, self.guard.shrinkage, self.guard.max_omega, self.guard
                )
            else:
                omega, beta = get_estimator(self.method)(source, target)
                clamped = omega > self.guard.max_omega
                if clamped.any():
                    self.guard.clamped_units += int(clamped.sum())
                    omega = omega.clamp(max=self.guard.max_omega)
                    beta = (
                        torch.as_tensor(target, dtype=torch.float64).mean(0)
                        - omega.double() * torch.as_tensor(source, dtype=torch.float64).mean(0)
                    ).float()
            low, high = support_bounds(source, self.support)
        except ACTInputError as error:
            raise ACTInputError(f"Module {name!r}: {error}") from None
        return ModuleMap(omega, beta, low, high, apply_mode=self.apply_mode)

    def metadata(self) -> dict:
        """What the map's metadata records about estimation (method, support, the guard's work)."""
        return {
            "method": self.method,
            "support": self.support,
            "apply_mode": self.apply_mode,
            "omega_guard": {
                "shrinkage_pseudo_samples": self.guard.shrinkage if self.method == "linear" else 0.0,
                "max_omega": self.guard.max_omega,
                "clamped_units": self.guard.clamped_units,
                "shrunk_units": self.guard.shrunk_units,
            },
        }

    def check_not_identical(self, fitted: int) -> None:
        """Warn when every fitted module saw identical source and target samples: the map is a no-op."""
        if fitted and len(self.identical) >= fitted:
            warnings.warn(
                "Source and target activations are identical at every hooked module, so this ACT map does "
                "nothing (lambda 1 equals lambda 0). The two prompt sets are the same to the model: check for "
                "duplicated lists, or prompts that differ only after the tokenizer's length limit.",
                ACTWarning,
                stacklevel=3,
            )
