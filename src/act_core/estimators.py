"""Per-unit transport estimators: pure functions on pooled activation samples.

Every estimator takes a source sample ``(N, D)`` and a target sample ``(M, D)`` (torch tensors or numpy
arrays) and returns ``(omega, beta)``, each of shape ``(D,)``, such that the affine map
``T(x) = omega * x + beta`` transports the source distribution of each unit (column) toward the
target's. Results are float32 torch tensors (the dtype maps are stored in) on the samples' device.

Where the numbers are computed. Estimation runs on the samples' device (a fit's pooled activations stay
where the model ran them): sorting is done in float32 (half-precision samples are upcast to float32; float64
samples, e.g. numpy input, stay float64), which is exact (a sort moves values, it does not round them).
The moments (means, sums of squares and products) lose precision in float32 when activations are large and
spread little (values ~1e2 varying by ~1e-3: a naive float32 variance is noise), so they are accumulated in
float64 where the device has it (CPU, CUDA) and, where it does not (MPS), in float32 around a pivot (a sample of
each unit is subtracted first, exactly for nearby values, and the means are carried as pivot + offset): the
rounding error then scales with the spread of a unit, not its magnitude.

Tolerance against the float64-CPU reference (``tests/core/test_estimation_device.py``, on values ~1e2 whose
units vary by 1e-3..1; beta is compared on the scale of the terms the map adds when applied, |beta| +
|omega| * max|x|, because an error in omega moves beta by omega's error times the mean):

* float64 moments (CPU, CUDA): the sums are the reference's (float32 samples upcast; only the summation
  order may differ on another device): omega relative 1e-6, beta 1e-6 of that scale, support bounds within
  one float32 ulp. On CPU the results are bit-identical to the reference.
* float32 pivot moments (MPS): omega relative 2e-6, beta 2e-6 of that scale, bounds within two float32
  ulps. Measured on CPU: 3.6e-7, 2.3e-7 and 2 ulps (a few float32 roundings); the margin is for another
  device's summation order. 2e-6 is ~16 float32 ulps of the terms, where applying the map in float32
  (``x * omega + beta``) rounds by one; one-pass float32 moments on the same data are off by ~100%.

``ModuleEstimator`` (what the fitting engines call, once per hooked module and step) reads nothing back to the
host while it estimates: the checks that need values (non-finite samples, identical source and target, the
omega guard's counts) are kept on the device and read once, in one transfer, when the next step starts (a
module is estimated again) or when the fit asks for them (``check_not_identical``, ``metadata``). The pure
functions below (``linear_act``, ...) check their input at once: they are for single estimates, not fits.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .apply_modes import APPLY_MODES
from .errors import ACTInputError, ACTWarning
from .maps import ModuleMap
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
# Device types without float64 arithmetic: their moments use the float32 pivot form (module docstring).
_NO_FLOAT64 = frozenset({"mps"})
_NON_FINITE = (
    "{side} activations contain NaN or Inf (units {units}...). The model produced non-finite values: "
    "run it in float32 (fp16 overflows are the usual cause) and check the prompts."
)


def _moments_dtype(device: torch.device) -> torch.dtype:
    """The dtype the moments accumulate in on ``device``: float64 where the device has it, else float32."""
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


def _as_samples(name: str, samples: ArrayLike) -> torch.Tensor:
    """Validate one side's samples (shape only: free) and return them as a (N, D) float tensor on their device.

    float64 stays float64 (the reference path); everything else becomes float32.
    """
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
    samples = samples.detach()
    return samples if samples.dtype == torch.float64 else samples.to(torch.float32)


def _non_finite_units(samples: torch.Tensor) -> torch.Tensor:
    """(D,) bool: the units with a NaN or Inf sample (on the device, no host read)."""
    return ~torch.isfinite(samples).all(dim=0)


def _non_finite_error(side: str, bad_units: torch.Tensor) -> ACTInputError:
    units = bad_units.nonzero().flatten()[:5].tolist()
    return ACTInputError(_NON_FINITE.format(side=side, units=units))


def _check_finite(side: str, samples: torch.Tensor) -> None:
    """Raise at once on non-finite samples (the pure functions; fits defer this, see ``ModuleEstimator``)."""
    bad = _non_finite_units(samples)
    if bad.any():
        raise _non_finite_error(side, bad)


def _check_pair(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape-checked source and target on the source's device (no host read)."""
    src = _as_samples("source", source)
    tgt = _as_samples("target", target)
    if src.shape[1] != tgt.shape[1]:
        raise ACTInputError(
            f"source has {src.shape[1]} units but target has {tgt.shape[1]}: both must come from the same module."
        )
    if tgt.device != src.device:
        tgt = tgt.to(src.device)
    if tgt.dtype != src.dtype:
        src, tgt = src.double(), tgt.double()
    return src, tgt


def _checked_pair(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    src, tgt = _check_pair(source, target)
    _check_finite("source", src)
    _check_finite("target", tgt)
    return src, tgt


@dataclass
class _Side:
    """One side's samples as the moments need them, in the moments' dtype.

    ``shifted`` is the samples minus ``pivot`` (the samples themselves when ``pivot`` is None: float64). In
    float32 the pivot is one sample of each unit, so ``samples - pivot`` is exact for nearby values and the
    sums (and quantile interpolation) see the spread of a unit, not its magnitude; the mean is carried as
    ``pivot + offset``.
    """

    shifted: torch.Tensor
    pivot: torch.Tensor | None

    def __post_init__(self) -> None:
        self.offset = self.shifted.mean(dim=0)
        self.centered = self.shifted - self.offset

    @property
    def values(self) -> torch.Tensor:
        return self.shifted if self.pivot is None else self.shifted + self.pivot

    @property
    def mean(self) -> torch.Tensor:
        return self.offset if self.pivot is None else self.pivot + self.offset

    def std(self) -> torch.Tensor:
        """Per-unit sample standard deviation (ddof 1)."""
        return self.shifted.std(dim=0)

    def square_sum(self) -> torch.Tensor:
        """Per-unit sum of the squared samples (the scale the constant-unit test compares the variance to)."""
        values = self.values
        return (values * values).sum(dim=0)


def _side(values: torch.Tensor, dtype: torch.dtype, count: int | None = None) -> _Side:
    """``values`` (N, D) as a ``_Side``; ``count`` reads sorted ``values`` at that many quantile levels."""
    values = values.to(dtype)
    pivot = None if dtype == torch.float64 else values[values.shape[0] // 2]
    shifted = values if pivot is None else values - pivot
    if count is not None and count != shifted.shape[0]:
        shifted = _read_quantiles(shifted, count)
    return _Side(shifted, pivot)


def _beta(omega: torch.Tensor, a: _Side, b: _Side) -> torch.Tensor:
    """``mean_b - omega * mean_a``, the large pivot terms apart from the small offsets in float32."""
    beta = b.offset - omega * a.offset
    if a.pivot is not None:
        beta = (b.pivot - omega * a.pivot) + beta
    return beta


def _read_quantiles(sorted_samples: torch.Tensor, count: int) -> torch.Tensor:
    """Empirical quantiles (midpoint convention) of column-sorted samples at ``count`` levels in (0, 1)."""
    n = sorted_samples.shape[0]
    levels = (torch.arange(count, dtype=sorted_samples.dtype, device=sorted_samples.device) + 0.5) / count
    position = (levels * n - 0.5).clamp(0, n - 1)
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=n - 1)
    weight = (position - lower).unsqueeze(1)
    if sorted_samples.dtype == torch.float64:
        return sorted_samples[lower] * (1 - weight) + sorted_samples[upper] * weight
    return torch.lerp(sorted_samples[lower], sorted_samples[upper], weight)


def _sorted(samples: torch.Tensor) -> torch.Tensor:
    """``samples`` sorted per unit (column), values only.

    On CPU numpy sorts (values only, vectorised): ~10x faster than ``torch.sort``, which also computes the
    indices (measured on a fit's (96..1536, 32..256) float32 samples, one thread). Elsewhere ``torch.sort``
    on the samples' device. Either way the values are the same: a sort does not round.
    """
    if samples.device.type == "cpu":
        return torch.from_numpy(np.sort(samples.numpy(), axis=0))
    return torch.sort(samples, dim=0).values


def _matched(src: torch.Tensor, tgt: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, _Side, _Side]:
    """The source sorted per unit (its own dtype), and both sides rank-paired (see matched_quantiles)."""
    src_sorted, tgt_sorted = _sorted(src), _sorted(tgt)
    count = max(src.shape[0], tgt.shape[0])
    return src_sorted, _side(src_sorted, dtype, count), _side(tgt_sorted, dtype, count)


def matched_quantiles(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort both samples per unit and pair them by rank (1-D optimal transport).

    With equal counts this is exactly "sort both and pair". With unequal counts N != M both sorted
    samples are read at the same max(N, M) quantile levels (linear interpolation), so every sample of
    the larger side is used and the pairing is still monotone. Returned in the moments' dtype (float64
    on CPU and CUDA) on the samples' device.
    """
    src, tgt = _checked_pair(source, target)
    _, a, b = _matched(src, tgt, _moments_dtype(src.device))
    return a.values, b.values


def _linear(a: _Side, b: _Side) -> torch.Tensor:
    covariance = (a.centered * b.centered).sum(dim=0)
    variance = (a.centered * a.centered).sum(dim=0)
    constant = variance <= _CONSTANT_UNIT_RTOL * (1.0 + a.square_sum())
    return torch.where(constant, torch.ones_like(variance), covariance / torch.where(constant, 1.0, variance))


def linear_act(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-AcT: the least-squares affine fit to the rank-paired samples, per unit.

    ``omega = sum((a - mean_a)(b - mean_b)) / sum((a - mean_a)^2)``, ``beta = mean_b - omega * mean_a``,
    with a, b the sorted source and target. Constant source units get omega = 1 (a pure shift).
    """
    src, tgt = _checked_pair(source, target)
    _, a, b = _matched(src, tgt, _moments_dtype(src.device))
    omega = _linear(a, b)
    return omega.float(), _beta(omega, a, b).float()


@dataclass
class Guard:
    """How ``robust_linear_act`` kept omega sane, for the map's metadata."""

    shrinkage: float
    max_omega: float
    clamped_units: int = 0
    shrunk_units: int = 0


def _robust_linear(
    a: _Side, b: _Side, shrinkage: float, max_omega: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """omega, beta (moments' dtype) and the counts of clamped and shrunk units (0-d tensors, on the device)."""
    covariance = (a.centered * b.centered).sum(dim=0)
    variance = (a.centered * a.centered).sum(dim=0)
    typical = variance.median() / a.shifted.shape[0]
    prior = shrinkage * typical
    constant = variance + prior <= _CONSTANT_UNIT_RTOL * (1.0 + a.square_sum())
    denominator = torch.where(constant, 1.0, variance + prior)
    omega = torch.where(constant, torch.ones_like(variance), (covariance + prior) / denominator)
    raw = torch.where(variance > 0, covariance / torch.where(variance > 0, variance, 1.0), omega)
    clamped = omega > max_omega
    omega = omega.clamp(max=max_omega)
    shrunk = (omega - raw).abs() > 0.1 * raw.abs().clamp_min(1.0)
    return omega, _beta(omega, a, b), clamped.sum(), shrunk.sum()


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
    src, tgt = _checked_pair(source, target)
    _, a, b = _matched(src, tgt, _moments_dtype(src.device))
    omega, beta, clamped, shrunk = _robust_linear(a, b, shrinkage, max_omega)
    if guard is not None:
        guard.clamped_units += int(clamped)
        guard.shrunk_units += int(shrunk)
    return omega.float(), beta.float()


def _mean(a: _Side, b: _Side) -> tuple[torch.Tensor, torch.Tensor]:
    omega = torch.ones_like(a.offset)
    return omega, _beta(omega, a, b)


def mean_act(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-AcT: a pure shift by the difference of means (omega = 1)."""
    src, tgt = _checked_pair(source, target)
    dtype = _moments_dtype(src.device)
    omega, beta = _mean(_side(src, dtype), _side(tgt, dtype))
    return omega.float(), beta.float()


def _gaussian(a: _Side, b: _Side) -> tuple[torch.Tensor, torch.Tensor]:
    std_a, std_b = a.std(), b.std()
    degenerate = (std_a < GAUSSIAN_MIN_STD) | (std_b < GAUSSIAN_MIN_STD)
    omega = torch.where(degenerate, 1.0, std_b / torch.where(degenerate, 1.0, std_a))
    beta = torch.where(degenerate, 0.0, _beta(omega, a, b))
    return omega, beta


def gaussian_act(source: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-OT: the optimal map between per-unit Gaussians fitted to each side.

    ``omega = std_b / std_a``, ``beta = mean_b - omega * mean_a``. Units with std below 1e-4 on either
    side are left unchanged (omega = 1, beta = 0): their ratio would be noise.
    """
    src, tgt = _checked_pair(source, target)
    dtype = _moments_dtype(src.device)
    omega, beta = _gaussian(_side(src, dtype), _side(tgt, dtype))
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


def _bounds(
    src: torch.Tensor, support: str, src_sorted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``support_bounds`` on checked samples; ``src_sorted`` (the source sorted per unit) saves a sort."""
    if support == SUPPORT_UNBOUNDED:
        inf = torch.full((src.shape[1],), float("inf"), device=src.device)
        return -inf, inf
    if support == SUPPORT_SOURCE_RANGE:
        if src_sorted is not None:
            return src_sorted[0].float(), src_sorted[-1].float()
        low, high = torch.aminmax(src, dim=0)
        return low.float(), high.float()
    if src_sorted is None:
        src_sorted = _sorted(src)
    values = src_sorted.to(_moments_dtype(src.device))
    n = values.shape[0]
    match = _QUANTILE_SUPPORT.match(support)
    bounds = []
    for percent in (match["lo"], match["hi"]):
        rank = float(percent) / 100 * (n - 1)  # torch.quantile's "linear" rule, read off the sorted samples
        below = int(rank)
        bounds.append(torch.lerp(values[below], values[math.ceil(rank)], rank - below).float())
    return bounds[0], bounds[1]


def support_bounds(source: ArrayLike, support: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit (low, high) bounds of the support mask, computed from the source sample.

    The mask is ``low < x < high`` (strict, as in the reference), so a constant unit's range is empty and
    the unit is left alone. Unbounded support gives (-inf, +inf).
    """
    support = validate_support(support)
    src = _as_samples("source", source)
    _check_finite("source", src)
    return _bounds(src, support)


@dataclass(eq=False)
class DeviceModuleMap(ModuleMap):
    """A module's map as ``ModuleEstimator`` returns it: float32, on the device of the samples it was fitted on.

    During a fit the maps stay on the activations' device: the fitting hooks transport with them there
    (``applying.transport`` moves nothing when the devices match) and nothing is copied to the host per
    module. Unlike a ``ModuleMap`` it is not validated on construction (that reads values back to the host):
    the estimator checks the samples it came from once per step instead (``ModuleEstimator``). A fit's
    result is made of plain ``ModuleMap``s, on CPU, contiguous and validated: ``TrajectoryFit.result`` stacks
    the per-step maps into them, the first-step engine calls ``on_host``.
    """

    unbounded_support: bool = False

    def __post_init__(self) -> None:
        shapes = set()
        for name in ("omega", "beta", "low", "high"):
            value = getattr(self, name)
            if value.dtype != torch.float32 or value.requires_grad or not value.is_contiguous():
                setattr(self, name, value.detach().to(torch.float32).contiguous())
            shapes.add(tuple(value.shape))
        if len(shapes) != 1 or len(next(iter(shapes))) not in (1, 2):
            raise ACTInputError(
                f"omega, beta, low and high must have one (D,) or (K, D) shape, got {sorted(shapes)}."
            )
        if self.apply_mode not in APPLY_MODES:
            raise ACTInputError(f"apply_mode must be one of {APPLY_MODES}, got {self.apply_mode!r}.")
        self._unbounded = self.unbounded_support  # known from the support spec: no host read

    def on_host(self) -> ModuleMap:
        """The validated ``ModuleMap`` on CPU (what maps are saved as)."""
        return ModuleMap(self.omega, self.beta, self.low, self.high, self.apply_mode)


def on_host(module_map: ModuleMap) -> ModuleMap:
    """``module_map`` as a CPU ``ModuleMap`` (a ``DeviceModuleMap`` is moved and validated; others are already)."""
    return module_map.on_host() if isinstance(module_map, DeviceModuleMap) else module_map


@dataclass
class _Pending:
    """What one estimate left to check on the device: [source non-finite, target non-finite, identical,
    clamped units, shrunk units] as one int64 vector, and the non-finite units of each side (for the error)."""

    module: str
    flags: torch.Tensor
    bad_source: torch.Tensor
    bad_target: torch.Tensor


def _read_host(values: torch.Tensor) -> list[list[int]]:
    """The one device-to-host read of a batch of deferred checks (a function of its own, so tests count it)."""
    return values.tolist()


class ModuleEstimator:
    """Turns one module's pooled source and target samples into its ``ModuleMap``.

    One place for what every fitting engine (first-step, trajectory) needs: the sample-count and
    balance checks, the estimator (Linear-AcT with the omega guard of ``robust_linear_act``), the
    support, the apply mode, and a record of what the guard did and which modules saw identical
    source and target samples (a map that does nothing).

    Estimation stays on the samples' device and reads nothing back to the host (module docstring): maps are
    ``DeviceModuleMap``s, and the checks that need values are kept as device flags and read in one transfer
    (``_resolve``) when a module is estimated a second time (a fit's next step), or when the fit reads them:
    ``check_not_identical`` (which raises first if a module saw NaN or Inf), ``metadata``, ``identical``.
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
        get_estimator(method)
        if apply_mode not in APPLY_MODES:
            raise ACTInputError(f"apply_mode must be one of {APPLY_MODES}, got {apply_mode!r}.")
        self.method = method
        self.support = validate_support(support or default_support(method))
        self.apply_mode = apply_mode
        self.max_imbalance = max_imbalance
        shrinkage, max_omega = check_omega_guard(shrinkage, max_omega)
        self.guard = Guard(shrinkage=shrinkage, max_omega=max_omega)
        self._identical: list[str] = []
        self.sample_counts: tuple[int, int] | None = None
        self._pending: list[_Pending] = []
        self._since_resolve: set[str] = set()
        self._lock = threading.Lock()  # the lockstep engine estimates from its batch threads

    def __call__(self, name: str, source: ArrayLike, target: ArrayLike) -> DeviceModuleMap:
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
        if name in self._since_resolve:  # a module estimated again: a new step; check the last one's flags
            self._resolve()
        try:
            src, tgt = _check_pair(source, target)
        except ACTInputError as error:
            raise ACTInputError(f"Module {name!r}: {error}") from None
        if self.sample_counts is None:
            self.sample_counts = (n, m)
        dtype = _moments_dtype(src.device)
        src_sorted = None
        if self.method == "linear":
            src_sorted, a, b = _matched(src, tgt, dtype)
            omega, beta, clamped, shrunk = _robust_linear(a, b, self.guard.shrinkage, self.guard.max_omega)
        else:
            a, b = _side(src, dtype), _side(tgt, dtype)
            omega, beta = (_mean if self.method == "mean" else _gaussian)(a, b)
            clamped = omega > self.guard.max_omega
            omega = omega.clamp(max=self.guard.max_omega)
            beta = torch.where(clamped, _beta(omega, a, b), beta)  # means stay matched where omega is capped
            clamped = clamped.sum()
            shrunk = torch.zeros_like(clamped)
        low, high = _bounds(src, self.support, src_sorted)
        bad_source, bad_target = _non_finite_units(src), _non_finite_units(tgt)
        checks = [bad_source.any(), bad_target.any()]
        checks.append((src == tgt).all() if src.shape == tgt.shape else torch.zeros_like(checks[0]))
        flags = torch.stack([c.to(torch.int64) for c in [*checks, clamped, shrunk]])
        with self._lock:
            self._pending.append(_Pending(name, flags, bad_source, bad_target))
            self._since_resolve.add(name)
        return DeviceModuleMap(
            omega.float(),
            beta.float(),
            low,
            high,
            apply_mode=self.apply_mode,
            unbounded_support=self.support == SUPPORT_UNBOUNDED,
        )

    def _resolve(self) -> None:
        """Read the deferred checks of the estimates so far (one transfer per device) and raise on non-finite
        samples, naming the first module (in estimation order) that saw them."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._since_resolve = set()
        by_device: dict[torch.device, list[_Pending]] = {}
        for item in pending:
            by_device.setdefault(item.flags.device, []).append(item)
        rows = {}
        for items in by_device.values():
            for item, row in zip(items, _read_host(torch.stack([item.flags for item in items])), strict=True):
                rows[id(item)] = row
        error = None
        for item in pending:
            bad_source, bad_target, identical, clamped, shrunk = rows[id(item)]
            self.guard.clamped_units += clamped
            self.guard.shrunk_units += shrunk
            if identical and item.module not in self._identical:
                self._identical.append(item.module)
            if error is None and (bad_source or bad_target):
                side, bad = ("source", item.bad_source) if bad_source else ("target", item.bad_target)
                error = ACTInputError(f"Module {item.module!r}: {_non_finite_error(side, bad)}")
        if error is not None:
            raise error

    @property
    def identical(self) -> list[str]:
        """Modules whose source and target samples were identical (in estimation order)."""
        self._resolve()
        return self._identical

    def metadata(self) -> dict:
        """What the map's metadata records about estimation (method, support, the guard's work)."""
        self._resolve()
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
        """Read the deferred checks (raising if a module saw NaN or Inf), then warn when every fitted module saw
        identical source and target samples: the map is a no-op."""
        if fitted and len(self.identical) >= fitted:
            warnings.warn(
                "Source and target activations are identical at every hooked module, so this ACT map does "
                "nothing (lambda 1 equals lambda 0). The two prompt sets are the same to the model: check for "
                "duplicated lists, or prompts that differ only after the tokenizer's length limit.",
                ACTWarning,
                stacklevel=3,
            )
