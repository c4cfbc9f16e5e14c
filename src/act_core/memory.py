"""How many prompt pairs one denoiser call can take: each family's measured activation memory against free memory.

A family's ``ModelFamily.activation_memory`` is what ``benchmarks/bench_memory.py`` measured on its published
denoisers at full size (fake tensors, no weights; a bf16 forward, batch 1, at 256-1024 px): the peak activation
bytes of one forward per batch row, ``peak_per_row + peak_per_latent_pixel * P`` with P the latent pixels
(``latent_pixels``), and the largest state alive when a module one of its presets hooks returns (what a call
paused there keeps), in the same form. Activations grow with the denoiser's width (hidden states, MLPs and
attention all are multiples of it), so the figures are given at a ``width`` (``denoiser_width``: the input
width of most of its Linear layers) and scale with the width of the denoiser at hand: a smaller variant of the family (SD3
medium beside SD3.5 large) or a small test model gets its share, not the full-size model's memory. Attention on SDPA's fused path (flash / memory-efficient: PyTorch's choice for fp16 / bf16 on CUDA)
holds no token x token matrix, so both are linear in P (the benchmark fits the quadratic term too: it is nil).

``SAFETY_FRACTION`` of the free memory is given to a call's activations. The rest is for what the measurement
does not count: the CUDA allocator's rounding and fragmentation, kernel workspaces (cuBLAS, cuDNN), the
temporaries of ACT's own hooks (a transported copy of a hooked module's output, the recorded statistics), and
attention run on the math path (no fused kernel for the dtype or mask), which holds the token x token matrix.
It is a margin, not a measured figure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from torch import nn

# Image pixels per latent pixel along each side: the unit of the measured figures. Every family's VAE
# downsamples 8x (FLUX-layout and DiT families then pack or patchify 2x2 latent pixels into one token, which the
# per-latent-pixel figure already includes).
LATENT_PIXEL = 8
# Bytes per element the figures were measured at (bf16); other dtypes scale them.
MEASURED_ITEMSIZE = 2
# Share of the free memory one call's activations may take (see the module docstring).
SAFETY_FRACTION = 0.5


@dataclass(frozen=True)
class ActivationMemory:
    """Measured activation bytes of one denoiser forward per batch row, at 2 bytes per element and a denoiser
    of ``width`` (``denoiser_width``): ``peak_per_row + peak_per_latent_pixel * P`` at its peak,
    ``live_per_row + live_per_latent_pixel * P`` alive when a module a preset hooks returns, the largest
    (P = latent pixels)."""

    peak_per_row: float
    peak_per_latent_pixel: float
    live_per_row: float
    live_per_latent_pixel: float
    width: int

    def _scale(self, itemsize: int, width: int | None) -> float:
        return itemsize / MEASURED_ITEMSIZE * (width / self.width if width else 1.0)

    def peak_bytes(
        self, latent_pixels: int, itemsize: int = MEASURED_ITEMSIZE, width: int | None = None
    ) -> float:
        """Peak activation bytes of one batch row at this latent size and element size, for a denoiser of
        ``width`` (None: the measured one's)."""
        return (self.peak_per_row + self.peak_per_latent_pixel * latent_pixels) * self._scale(itemsize, width)

    def live_bytes(
        self, latent_pixels: int, itemsize: int = MEASURED_ITEMSIZE, width: int | None = None
    ) -> float:
        """Bytes one batch row keeps alive at a hooked module (a paused call's state)."""
        return (self.live_per_row + self.live_per_latent_pixel * latent_pixels) * self._scale(itemsize, width)


# For a denoiser that was not measured (the structural family's DiTs, a ModelFamily without the field): each
# term the largest per unit of width measured on any family, at FLUX.2 [dev]'s width (benchmarks/bench_memory.py,
# 2026-12-03: FLUX.2's per-row terms, the SD 1.5 UNet's per-pixel peak, the SDXL-family UNets' live state).
UNMEASURED = ActivationMemory(156_000_000, 81_000, 54_800_000, 33_900, 6144)


class ModelFamily(Protocol):
    """What this module reads of an ``act_core.families.ModelFamily`` (not imported: the families import this)."""

    activation_memory: ActivationMemory | None


def latent_pixels(height: int, width: int) -> int:
    """Latent pixels of an image of ``height`` x ``width`` image pixels (the unit of the measured figures)."""
    return (int(height) // LATENT_PIXEL) * (int(width) // LATENT_PIXEL)


def denoiser_width(denoiser: nn.Module) -> int:
    """The input width most of the denoiser's Linear layers have (the larger on a tie): a transformer's hidden
    width, a UNet's deepest attention width; the same for diffusers' and ComfyUI's modules. 0: no Linear."""
    widths = Counter(m.in_features for m in denoiser.modules() if isinstance(m, nn.Linear))
    return max(widths, key=lambda width: (widths[width], width), default=0)


def activation_memory(family: ModelFamily) -> ActivationMemory:
    """The family's measured figures (``UNMEASURED``'s envelope where it has none)."""
    return family.activation_memory or UNMEASURED


def activation_bytes(
    family: ModelFamily, latent_pixels: int, itemsize: int, rows: int, width: int | None = None
) -> float:
    """Peak activation bytes of one call of ``rows`` batch rows (rows times one row's peak: an upper bound), for
    a denoiser of ``width`` (``denoiser_width``; None: the measured one's)."""
    return rows * activation_memory(family).peak_bytes(latent_pixels, itemsize, width)


def pairs_held_together(
    family: ModelFamily,
    *,
    latent_pixels: int,
    itemsize: int,
    free_bytes: float,
    width: int | None = None,
) -> int:
    """How many prompt pairs a split step can hold exactly: its source calls run together, one at its peak and
    the others paused at a module with their live state, so N pairs need ``peak + (N - 1) * live`` of one row
    each (at one source row per call, the least) within ``SAFETY_FRACTION`` of ``free_bytes``. At least 1."""
    figures = activation_memory(family)
    peak = figures.peak_bytes(latent_pixels, itemsize, width)
    live = figures.live_bytes(latent_pixels, itemsize, width)
    budget = SAFETY_FRACTION * max(0.0, float(free_bytes)) - peak
    return max(1, 1 + int(budget // max(1.0, live)))


def pairs_per_call(
    family: ModelFamily,
    *,
    latent_pixels: int,
    itemsize: int,
    rows_per_pair: int,
    free_bytes: float,
    num_pairs: int,
    width: int | None = None,
) -> int:
    """How many prompt pairs (``rows_per_pair`` batch rows each) one denoiser call can take: as many as fit in
    ``SAFETY_FRACTION`` of ``free_bytes``, at least 1 and at most ``num_pairs``; ``width``: the denoiser's
    (``denoiser_width``; None: the measured one's)."""
    per_pair = activation_bytes(family, latent_pixels, itemsize, rows_per_pair, width)
    fit = int(SAFETY_FRACTION * max(0.0, float(free_bytes)) // max(1.0, per_pair))
    return max(1, min(int(num_pairs), fit))
