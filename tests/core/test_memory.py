"""Pairs per call from each family's measured activation memory (act_core.memory), and the tracker that measured
it (benchmarks/bench_memory.py): its figure for a small real model equals a fake-tensor run's and the CPU
allocator's."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from act_core import memory
from act_core.diffusers import adapter
from act_core.families import FAMILIES
from act_core.families.structural import STRUCTURAL
from act_core.memory import UNMEASURED, ActivationMemory, activation_bytes, latent_pixels, pairs_per_call
from act_core.sampling import SamplingSettings

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def with_memory(figures: ActivationMemory):
    return dataclasses.replace(FAMILIES["sdxl"], activation_memory=figures)


def test_latent_pixels_are_8x8_image_pixels():
    assert latent_pixels(1024, 1024) == 128 * 128
    assert latent_pixels(768, 1360) == 96 * 170


def test_pairs_per_call_budget_arithmetic():
    family = with_memory(ActivationMemory(0.0, 1000.0, 0.0, 500.0, 64))  # 1000 bytes per latent pixel and row
    budget = dict(latent_pixels=100, itemsize=2, rows_per_pair=4)  # 400 kB per pair
    assert activation_bytes(family, 100, 2, 4) == 400_000
    # SAFETY_FRACTION (0.5) of 4 MB: 5 pairs
    assert pairs_per_call(family, **budget, free_bytes=4_000_000, num_pairs=10) == 5
    assert pairs_per_call(family, **budget, free_bytes=4_000_000, num_pairs=3) == 3  # never more than asked
    assert pairs_per_call(family, **budget, free_bytes=0, num_pairs=10) == 1  # at least 1
    assert pairs_per_call(family, **budget, free_bytes=-5, num_pairs=10) == 1
    # fp32 doubles the measured (bf16) bytes; the per-row term counts once per row
    assert pairs_per_call(family, **dict(budget, itemsize=4), free_bytes=4_000_000, num_pairs=10) == 2
    # a denoiser of half the measured width needs half: 10 pairs
    assert pairs_per_call(family, **budget, free_bytes=4_000_000, num_pairs=20, width=32) == 10
    fixed = with_memory(
        ActivationMemory(50_000.0, 1000.0, 0.0, 0.0, 64)
    )  # (50 kB + 100 kB) x 4 rows = 600 kB
    assert pairs_per_call(fixed, **budget, free_bytes=4_000_000, num_pairs=10) == 3


def test_every_family_has_its_measured_memory():
    for name, family in FAMILIES.items():
        figures = family.activation_memory
        assert isinstance(figures, ActivationMemory), name
        if family is STRUCTURAL:
            assert figures is UNMEASURED  # any DiT: the envelope of the measured families
            continue
        assert figures is not UNMEASURED, name  # its own measured figures
        assert figures.peak_per_latent_pixel > 0 and figures.live_per_latent_pixel > 0, name
        assert figures.peak_per_row > 0 and figures.live_per_row > 0, name
        assert figures.width > 0, name
        for pixels in (latent_pixels(256, 256), latent_pixels(1024, 1024)):
            assert 0 < figures.live_bytes(pixels) < figures.peak_bytes(pixels), name
            for width in (figures.width, 64):  # per unit of width, the envelope holds every family
                assert figures.peak_bytes(pixels, 2, width) <= UNMEASURED.peak_bytes(pixels, 2, width), name
                assert figures.live_bytes(pixels, 2, width) <= UNMEASURED.live_bytes(pixels, 2, width), name
    # a family without the field is budgeted with the envelope
    unmeasured = dataclasses.replace(FAMILIES["flux"], activation_memory=None)
    assert memory.activation_memory(unmeasured) is UNMEASURED


def test_denoiser_width_is_the_width_most_linear_layers_read():
    block = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.Linear(8, 8))
    assert memory.denoiser_width(block) == 8
    assert (
        memory.denoiser_width(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(6, 2))) == 6
    )  # tie
    assert memory.denoiser_width(torch.nn.Conv2d(1, 1, 1)) == 0


def test_diffusers_pairs_per_call_reads_free_memory(monkeypatch):
    family = with_memory(ActivationMemory(0.0, 1000.0, 0.0, 500.0, 64))
    unet = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(64, 16))  # width 64, fp32
    # 80 x 80 px: 100 latent pixels
    settings = SamplingSettings(num_inference_steps=2, guidance_scale=5.0, height=80, width=80)
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4000}  # 4 MB free
    monkeypatch.setattr(adapter.os, "sysconf", pages.__getitem__)
    pipe = SimpleNamespace(_execution_device=torch.device("cpu"), unet=unet)
    unet.dtype = torch.float32
    # fp32 UNet of the measured width: 800 kB per pair of 4 rows, 0.5 x 4 MB -> 2
    assert adapter.pairs_per_call(pipe, family, 10, settings, 4) == 2
    # a quarter of the width: 200 kB per pair -> 10
    pipe.unet = torch.nn.Sequential(torch.nn.Linear(16, 4))
    pipe.unet.dtype = torch.float32
    assert adapter.pairs_per_call(pipe, family, 20, settings, 4) == 10


def test_a_split_step_holds_the_paused_calls_state(monkeypatch):
    """A split step's source calls run together: one at its peak, the others paused with their live state.
    pairs_held_together budgets that, and the diffusers host warns when the prompts exceed it."""
    from act_core.errors import ACTWarning

    family = with_memory(ActivationMemory(0.0, 1000.0, 0.0, 500.0, 64))
    sizes = dict(latent_pixels=100, itemsize=2)  # peak 100 kB, live 50 kB per row
    # 0.5 x 4 MB = 2 MB: one row at its peak (100 kB) + 38 paused rows (1.9 MB)
    assert memory.pairs_held_together(family, **sizes, free_bytes=4_000_000) == 39
    assert memory.pairs_held_together(family, **sizes, free_bytes=0) == 1
    unet = torch.nn.Sequential(torch.nn.Linear(64, 16))
    unet.dtype = torch.float32  # fp32: twice the bytes, so 19 pairs held
    pipe = SimpleNamespace(_execution_device=torch.device("cpu"), unet=unet)
    settings = SamplingSettings(num_inference_steps=2, guidance_scale=5.0, height=80, width=80)
    monkeypatch.setattr(adapter.os, "sysconf", {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4000}.__getitem__)
    with pytest.warns(ACTWarning, match="use at most 19 prompt pairs"):
        assert adapter.pairs_per_call(pipe, family, 30, settings, 4) == 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ACTWarning)
        assert adapter.pairs_per_call(pipe, family, 19, settings, 4) == 2  # split, and held: no warning


def test_tracker_fake_equals_real_and_the_allocator():
    """A small FLUX.1-layout transformer at 512 px: the tracker's peak on fake tensors equals its peak on real
    tensors, and the CPU allocator's own peak (torch.profiler) within 2 %."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_memory as bench
    finally:
        sys.path.remove(str(BENCHMARKS))
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = dict(
        bench.FLUX1, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4
    )
    config.update(axes_dims_rope=(8, 12, 12), joint_attention_dim=256, pooled_projection_dim=64)

    def inputs() -> dict:
        h, text = 512 // 8, 64
        txt_ids, img_ids = bench._flux_ids(h, text)
        return dict(
            hidden_states=torch.randn(1, (h // 2) ** 2, 64),
            encoder_hidden_states=torch.randn(1, text, 256),
            pooled_projections=torch.randn(1, 64),
            timestep=torch.ones(1),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )

    real_model = bench.build("FluxTransformer2DModel", config, torch.float32)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    fake_model = bench.build("FluxTransformer2DModel", config, torch.float32, fake)
    real = bench.measure(real_model, inputs).peak
    faked = bench.measure(fake_model, inputs, fake).peak
    allocated = bench.allocator_peak(lambda: bench.forward(real_model, inputs))
    assert real > 4 * 2**20  # activations dominate (1024 image tokens of width 128, an MLP of 512)
    assert faked == pytest.approx(real, rel=0.01)
    assert faked == pytest.approx(allocated, rel=0.02)
