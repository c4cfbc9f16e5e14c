"""Activation memory of every family's denoiser at full size, per batch row, measured without weights.

    python benchmarks/bench_memory.py               # every denoiser, 4 resolutions, 2 attention paths (~2 min)
    python benchmarks/bench_memory.py --validate    # the tracker on real tensors vs fake, and vs the allocator
    python benchmarks/bench_memory.py --projection  # pairs per call of SDXL / FLUX.1 at 1024 px on 12/24/80 GB

Each denoiser is built from its published configuration (written out below) under
``torch._subclasses.fake_tensor.FakeTensorMode``: its parameters are fake tensors (shape, dtype, no storage), so
a 32 B-parameter FLUX.2 transformer costs nothing to build, and one forward runs the real module code on fake
activations. ``MemoryTracker`` (a ``TorchDispatchMode`` under ``torch.no_grad()``, so composite ops such as
``linear`` and ``scaled_dot_product_attention`` reach it decomposed into the kernels that allocate) adds the
bytes of every new storage an op returns and subtracts them when the storage is freed (a ``weakref.finalize``
on the storage), ignoring the model's parameters and buffers: its ``peak`` is the most activation memory alive
at once (the call's inputs included), ``live`` what is alive now. Hooks on every module a preset of the family
hooks on the denoiser read ``live`` when they fire: the state a call paused at a hooked module keeps (hidden
states, a UNet's skip connections, the timestep and text embeddings); the largest is reported.

The dtype is bf16 (what these models run in; fp16 has the same sizes). Attention runs on SDPA's fused path
(flash / memory-efficient: the choice for fp16 / bf16 on CUDA, and the CPU flash kernel here, neither holding
the token x token matrix), and again on its math path (``--no-math`` skips it), which does hold it: the
quadratic term of the fit ``bytes = a + b P + c P^2`` (P = latent pixels = (height / 8) x (width / 8), the
unit of ``act_core.memory``). Kernel workspaces that are not tensors (cuBLAS, the CUDA allocator's rounding and
fragmentation) are not counted; ``act_core.memory.SAFETY_FRACTION`` leaves room for them.

``--validate`` runs models small enough to run for real on this CPU (the shipped SDXL demo UNet, a narrow
SDXL-layout UNet, a FLUX.1-width transformer of 1 + 1 blocks) three ways: the tracker on real tensors, the
tracker on fake tensors, and the CPU allocator's own count (``torch.profiler`` with ``profile_memory``: every
allocation and free with the running total), which also sees what kernels allocate inside.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_flux import FLUX_SCHNELL  # noqa: E402
from bench_sdxl import SDXL_UNET as _SDXL_UNET  # noqa: E402
from tables import table  # noqa: E402

from act_core.families import FAMILIES  # noqa: E402
from act_core.memory import LATENT_PIXEL, SAFETY_FRACTION, denoiser_width, pairs_per_call  # noqa: E402
from act_core.recording import hook_module  # noqa: E402

MIB, GIB = 2**20, 2**30
SIZES = (256, 512, 768, 1024)


# ------------------------------------------------------------------------------------------------ tracker
class MemoryTracker(TorchDispatchMode):
    """Bytes of the storages alive that ops created (``live``) and their most at once (``peak``)."""

    def __init__(self, ignore: Any = (), fake_small: bool = False):
        super().__init__()
        # Under a FakeTensorMode, compute small tensors made from no fake tensor for real (``_runs_real``).
        self.fake_small = fake_small
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.finalize] = {}
        # storages that exist before the call (parameters, buffers) are never counted
        self._ignored = {id(t.untyped_storage()): t for t in ignore}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.fake_small and _runs_real(out, args, kwargs):
            with _disable_current_modes():  # the fake mode below: compute it for real
                out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()  # one Python object per storage (preserved): weakref-able
            key = id(storage)
            if key in self._tracked or key in self._ignored:
                continue
            nbytes = storage.nbytes()
            self._tracked[key] = weakref.finalize(storage, self._freed, key, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


SMALL = 2**16  # elements


def _runs_real(out: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an op's fake result should be computed for real: none of its inputs is fake and its outputs
    are small, or not floating point (masks, position ids, timesteps, a pooled vector). Models read such
    values into Python (Lumina 2: ``attention_mask.sum(1).tolist()``), which fake tensors cannot do; the
    activations (made from the fake latents, text embeddings and weights) stay fake."""
    from torch._subclasses.fake_tensor import FakeTensor

    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if any(isinstance(t, FakeTensor) for t in inputs):
        return False
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return bool(outputs) and all(t.numel() <= SMALL or not t.is_floating_point() for t in outputs)


def allocator_peak(run: Callable[[], Any]) -> int:
    """The CPU allocator's peak during ``run()`` above what was allocated before (``torch.profiler``)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append(
                    (node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated)
                )
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    if not events:
        return 0
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


# ------------------------------------------------------------------------------------------------ models
# diffusers' UNet of SDXL base 1.0 (its unet/config.json): the one benchmarks/bench_sdxl.py builds.
SDXL_UNET = _SDXL_UNET
# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json): 8 heads, conv projections.
SD15_UNET = dict(
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    in_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1): head width 64, OpenCLIP-H width, linear projections.
SD21_UNET = dict(
    SD15_UNET,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    sample_size=96,
    use_linear_projection=True,
)
# FLUX.1 (its transformer/config.json: benchmarks/bench_flux.py's schnell, no guidance embedder; -dev adds it).
FLUX1 = FLUX_SCHNELL
# Stable Diffusion 3 medium, 3.5 medium (MMDiT-X: dual attention in its first 13 blocks, QK RMSNorm) and 3.5
# large (their transformer/config.json).
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
SD35_MEDIUM = dict(
    SD3_MEDIUM, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"
)
SD35_LARGE = dict(
    SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"
)
# Chroma1-HD: diffusers' ChromaTransformer2DModel defaults are its configuration (FLUX.1 widths, 19 + 38 blocks,
# the distilled modulation approximator of 5 layers of 5120).
CHROMA = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    axes_dims_rope=(16, 56, 56),
    approximator_num_channels=64,
    approximator_hidden_dim=5120,
    approximator_layers=5,
)
# Lumina-Image-2.0 (Alpha-VLLM/Lumina-Image-2.0 transformer/config.json): Gemma 2 2B captions (width 2304).
LUMINA2 = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    hidden_size=2304,
    num_layers=26,
    num_refiner_layers=2,
    num_attention_heads=24,
    num_kv_heads=8,
    multiple_of=256,
    norm_eps=1e-5,
    axes_dim_rope=(32, 32, 32),
    axes_lens=(300, 512, 512),
    cap_feat_dim=2304,
)
# Z-Image(-Turbo): diffusers' ZImageTransformer2DModel defaults (dim 3840, 30 + 2 + 2 blocks, Qwen3-4B captions,
# width 2560). Not checked against the published config.json (no download here); axes_lens only sizes the
# RoPE tables, which are not activations.
ZIMAGE = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    qk_norm=True,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
)
# Qwen-Image (Qwen/Qwen-Image transformer/config.json = diffusers' defaults): 60 blocks, Qwen2.5-VL 7B captions.
QWEN_IMAGE = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)
# FLUX.2 [dev] (diffusers' Flux2Transformer2DModel defaults): 8 double + 48 single blocks of 48 x 128, Mistral
# Small 3.1 captions (3 hidden layers of 5120 stacked: 15360).
FLUX2 = dict(
    patch_size=1,
    in_channels=128,
    num_layers=8,
    num_single_layers=48,
    attention_head_dim=128,
    num_attention_heads=48,
    joint_attention_dim=15360,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
)


def _unet_inputs(text_width: int, sdxl: bool) -> Callable[..., dict]:
    def inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
        h = size // LATENT_PIXEL
        kwargs = dict(
            sample=torch.randn(batch, 4, h, h, dtype=dtype),
            timestep=torch.full((batch,), 999.0),
            encoder_hidden_states=torch.randn(batch, 77, text_width, dtype=dtype),
            return_dict=False,
        )
        if sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, 1280, dtype=dtype),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype),
            }
        return kwargs

    return inputs


def _flux_ids(h: int, text: int, axes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's position ids: (text, 3) zeros and (h/2 * h/2, 3) rows (0, row, column)."""
    side = h // 2
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(
        -1, 2
    )
    image = torch.cat([torch.zeros(side * side, axes - 2), grid.float()], 1)
    return torch.zeros(text, axes), image


def _flux_inputs(text: int, guidance: bool) -> Callable[..., dict]:
    def inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
        h = size // LATENT_PIXEL
        txt_ids, img_ids = _flux_ids(h, text)
        return dict(
            hidden_states=torch.randn(batch, (h // 2) ** 2, 64, dtype=dtype),
            encoder_hidden_states=torch.randn(batch, text, 4096, dtype=dtype),
            pooled_projections=torch.randn(batch, 768, dtype=dtype),
            timestep=torch.full((batch,), 1.0, dtype=dtype),
            guidance=torch.full((batch,), 3.5) if guidance else None,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )

    return inputs


def _sd3_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
    h = size // LATENT_PIXEL
    return dict(
        hidden_states=torch.randn(batch, 16, h, h, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, 77 + 256, 4096, dtype=dtype),  # CLIP L+G 77, T5 256
        pooled_projections=torch.randn(batch, 2048, dtype=dtype),
        timestep=torch.full((batch,), 999.0),
        return_dict=False,
    )


def _chroma_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
    h, text = size // LATENT_PIXEL, 512
    txt_ids, img_ids = _flux_ids(h, text)
    tokens = (h // 2) ** 2
    return dict(
        hidden_states=torch.randn(batch, tokens, 64, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, 4096, dtype=dtype),
        timestep=torch.full((batch,), 1.0, dtype=dtype),
        txt_ids=txt_ids,
        img_ids=img_ids,
        # ChromaPipeline's mask: the T5 tokens up to the first pad, then every image token
        attention_mask=torch.ones(batch, text + tokens, dtype=torch.bool),
        return_dict=False,
    )


def _lumina2_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
    h, text = size // LATENT_PIXEL, 256
    return dict(
        hidden_states=torch.randn(batch, 16, h, h, dtype=dtype),
        timestep=torch.full((batch,), 0.5, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, 2304, dtype=dtype),
        encoder_attention_mask=torch.ones(batch, text, dtype=torch.bool),
        return_dict=False,
    )


def _zimage_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
    h, text = size // LATENT_PIXEL, 512
    return dict(
        x=[torch.randn(16, 1, h, h, dtype=dtype) for _ in range(batch)],
        t=torch.full((batch,), 0.5, dtype=dtype),
        cap_feats=[torch.randn(text, 2560, dtype=dtype) for _ in range(batch)],
        return_dict=False,
    )


def _qwen_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
    h, text = size // LATENT_PIXEL, 512
    return dict(
        hidden_states=torch.randn(batch, (h // 2) ** 2, 64, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, 3584, dtype=dtype),
        encoder_hidden_states_mask=None,  # the pipeline passes none when no token is padding
        timestep=torch.full((batch,), 1.0, dtype=dtype),
        img_shapes=[[(1, h // 2, h // 2)]] * batch,
        return_dict=False,
    )


def _flux2_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
    h, text = size // LATENT_PIXEL, 512
    txt_ids, img_ids = _flux_ids(h, text, axes=4)
    return dict(
        hidden_states=torch.randn(batch, (h // 2) ** 2, 128, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, 15360, dtype=dtype),
        timestep=torch.full((batch,), 1.0, dtype=dtype),
        guidance=torch.full((batch,), 4.0),
        txt_ids=txt_ids[None],
        img_ids=img_ids[None],
        return_dict=False,
    )


@dataclass(frozen=True)
class Denoiser:
    """A published denoiser: its family, diffusers class, configuration and one call's inputs."""

    name: str
    family: str
    cls: str
    config: dict
    inputs: Callable[[int, int, torch.dtype], dict]
    text_tokens: int
    note: str = ""


DENOISERS = (
    Denoiser("SDXL base 1.0 UNet", "sdxl", "UNet2DConditionModel", SDXL_UNET, _unet_inputs(2048, True), 77),
    Denoiser("SD 1.5 UNet", "sdxl", "UNet2DConditionModel", SD15_UNET, _unet_inputs(768, False), 77),
    Denoiser("SD 2.1 UNet", "sdxl", "UNet2DConditionModel", SD21_UNET, _unet_inputs(1024, False), 77),
    Denoiser(
        "FLUX.1-dev",
        "flux",
        "FluxTransformer2DModel",
        dict(FLUX1, guidance_embeds=True),
        _flux_inputs(512, True),
        512,
    ),
    Denoiser("FLUX.1-schnell", "flux", "FluxTransformer2DModel", FLUX1, _flux_inputs(256, False), 256),
    Denoiser("SD3 medium", "sd3", "SD3Transformer2DModel", SD3_MEDIUM, _sd3_inputs, 333),
    Denoiser("SD3.5 medium", "sd3", "SD3Transformer2DModel", SD35_MEDIUM, _sd3_inputs, 333),
    Denoiser("SD3.5 large", "sd3", "SD3Transformer2DModel", SD35_LARGE, _sd3_inputs, 333),
    Denoiser("Chroma1-HD", "chroma", "ChromaTransformer2DModel", CHROMA, _chroma_inputs, 512),
    Denoiser("Lumina-Image-2.0", "lumina2", "Lumina2Transformer2DModel", LUMINA2, _lumina2_inputs, 256),
    Denoiser(
        "Z-Image",
        "zimage",
        "ZImageTransformer2DModel",
        ZIMAGE,
        _zimage_inputs,
        512,
        "config: diffusers defaults",
    ),
    Denoiser("Qwen-Image", "qwenimage", "QwenImageTransformer2DModel", QWEN_IMAGE, _qwen_inputs, 512),
    Denoiser(
        "FLUX.2 [dev]",
        "flux2",
        "Flux2Transformer2DModel",
        FLUX2,
        _flux2_inputs,
        512,
        "config: diffusers defaults",
    ),
)


# ------------------------------------------------------------------------------------------- measurement
@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(cls_name: str, config: dict, dtype: torch.dtype, fake: Any = None) -> torch.nn.Module:
    """The diffusers denoiser with this configuration, in ``dtype``; fake parameters under ``fake``."""
    import diffusers

    with fake or nullcontext(), default_dtype(dtype):
        torch.manual_seed(0)
        return getattr(diffusers, cls_name)(**config).eval()


def denoiser_presets(family_name: str) -> list[str]:
    """The family's presets that hook its denoiser."""
    family = FAMILIES[family_name]
    return [name for name, preset in family.presets.items() if family.denoiser in preset.patterns]


def hooked_modules(family_name: str, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules any of the family's presets hooks on this denoiser (each once): where a fit's call can pause."""
    family = FAMILIES[family_name]
    candidates = family.diffusers_modules(family.denoiser, model)
    unique: dict[int, torch.nn.Module] = {}
    for name in denoiser_presets(family_name):
        for entry in family.presets[name].select(family.denoiser, candidates).values():
            module = hook_module(entry)
            unique.setdefault(id(module), module)
    return list(unique.values())


@dataclass
class Measured:
    peak: int  # bytes
    live_at_hooks: list[int] = field(default_factory=list)  # bytes alive each time a hooked module returned

    @property
    def live(self) -> int:
        """The largest state a call paused at a hooked module keeps (0 where the preset hooks no module)."""
        return max(self.live_at_hooks, default=0)


def measure(
    model: torch.nn.Module,
    inputs: Callable[[], dict],
    fake: Any = None,
    hooked: list[torch.nn.Module] = (),
    math_attention: bool = False,
) -> Measured:
    """One forward of ``model`` on ``inputs()`` (made inside, so counted) under the tracker."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tracker = MemoryTracker(ignore=[*model.parameters(), *model.buffers()], fake_small=fake is not None)
    result = Measured(0)
    handles = [m.register_forward_hook(lambda *_: result.live_at_hooks.append(tracker.live)) for m in hooked]
    attention = sdpa_kernel([SDPBackend.MATH]) if math_attention else nullcontext()
    try:
        with torch.no_grad(), attention, fake or nullcontext(), tracker:
            out = model(**inputs())
            del out
    finally:
        for handle in handles:
            handle.remove()
    result.peak = tracker.peak
    return result


def fit_scaling(pixels: list[int], values: list[float], quadratic: bool) -> tuple[float, float, float, float]:
    """Least squares ``a + b P (+ c P^2)`` through (P, bytes); returns (a, b, c, worst relative residual)."""
    import numpy as np

    p = np.asarray(pixels, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    columns = [np.ones_like(p), p] + ([p * p] if quadratic else [])
    coef, *_ = np.linalg.lstsq(np.stack(columns, 1), y, rcond=None)
    a, b, c = (*coef, 0.0) if not quadratic else coef
    fitted = a + b * p + c * p * p
    return float(a), float(b), float(c), float(np.max(np.abs(fitted - y) / y))


def upper_line(pixels: list[int], values: list[float]) -> tuple[float, float]:
    """A line ``a + b P`` on or above every point: b the slope between the two largest P, a the least
    intercept that keeps every point under it (where the peak moves from the text tokens' work to the image
    tokens' as P grows, the points bend, and a least-squares line would pass under some of them)."""
    (p1, v1), (p2, v2) = sorted(zip(pixels, values, strict=True))[-2:]
    b = (v2 - v1) / (p2 - p1)
    return max(v - b * p for p, v in zip(pixels, values, strict=True)), b


def ceil3(value: float) -> int:
    """``value`` rounded up to 3 significant digits."""
    if value <= 0:
        return 0
    step = 10 ** max(0, math.floor(math.log10(value)) - 2)
    return int(math.ceil(value / step) * step)


def latent_pixels(size: int) -> int:
    return (size // LATENT_PIXEL) ** 2


def run_family_table(denoisers: tuple[Denoiser, ...], sizes: tuple[int, ...], math_path: bool) -> dict:
    """Measure every denoiser at every size (batch 1 and 2), print the tables, return the fits."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch.bfloat16
    rows, fits, hook_rows = [], {}, []
    for spec in denoisers:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        start = time.perf_counter()
        model = build(spec.cls, spec.config, dtype, fake)
        params = sum(p.numel() for p in model.parameters())
        hooked = hooked_modules(spec.family, model)
        peaks, lives, maths = [], [], []
        for size in sizes:
            one = measure(model, partial(spec.inputs, 1, size, dtype), fake, hooked)
            two = measure(model, partial(spec.inputs, 2, size, dtype), fake)
            peaks.append(one.peak)
            lives.append(one.live)
            math_peak = None
            if math_path:
                math_peak = measure(
                    model, partial(spec.inputs, 1, size, dtype), fake, math_attention=True
                ).peak
                maths.append(math_peak)
            rows.append(
                [
                    spec.name,
                    f"{params / 1e9:.2f}",
                    str(size),
                    str(latent_pixels(size)),
                    f"{one.peak / MIB:.0f}",
                    f"{two.peak / one.peak:.2f}",
                    f"{one.peak / latent_pixels(size):.0f}",
                    f"{one.live / MIB:.0f}",
                    f"{math_peak / MIB:.0f}" if math_peak else "-",
                ]
            )
        pixels = [latent_pixels(s) for s in sizes]
        fits[spec.name] = {
            "family": spec.family,
            "upper": upper_line(pixels, peaks),
            "live_upper": upper_line(pixels, lives) if any(lives) else (0.0, 0.0),
            "peak": fit_scaling(pixels, peaks, quadratic=False),
            "peak_quadratic": fit_scaling(pixels, peaks, quadratic=True),
            "live": fit_scaling(pixels, lives, quadratic=False) if any(lives) else (0.0, 0.0, 0.0, 0.0),
            "math": fit_scaling(pixels, maths, quadratic=True) if maths else None,
            "hooked": len(hooked),
            "width": denoiser_width(model),
            "seconds": time.perf_counter() - start,
        }
        hook_rows.append([spec.name, spec.family, ", ".join(denoiser_presets(spec.family)), str(len(hooked))])
        del model
    table(
        "Peak activation memory of one bf16 forward, batch 1 (fake tensors; MiB = 2^20 bytes; inputs included)",
        [
            "denoiser",
            "B params",
            "px",
            "latent px",
            "peak MiB",
            "x2 rows",
            "B / latent px",
            "live MiB",
            "math MiB",
        ],
        rows,
    )
    fit_rows = []
    for name, fit in fits.items():
        a, b, _, err = fit["peak"]
        qa, qb, qc, qerr = fit["peak_quadratic"]
        la, lb, _, lerr = fit["live"]
        math_fit = fit["math"]
        fit_rows.append(
            [
                name,
                fit["family"],
                f"{a / MIB:.1f}",
                f"{b:.0f}",
                f"{err:.1%}",
                f"{qc:.3g}",
                f"{la / MIB:.1f}",
                f"{lb:.0f}",
                f"{math_fit[2]:.3g}" if math_fit else "-",
                str(fit["width"]),
                f"{fit['seconds']:.1f}",
            ]
        )
    table(
        "Fitted per row: peak = a + b P (P latent pixels, bf16), worst residual; c of a + b P + c P^2 fitted to the "
        "same peaks (fused attention) and to the math path's; live state at the hooked modules (largest) = a + b P",
        [
            "denoiser",
            "family",
            "a MiB",
            "b B/px",
            "lin. resid",
            "c (fused)",
            "live a MiB",
            "live b B/px",
            "c (math)",
            "width",
            "s",
        ],
        fit_rows,
    )
    table(
        "Hook points of the live-state columns (every module a preset of the family hooks on the denoiser)",
        ["denoiser", "family", "presets", "modules"],
        hook_rows,
    )
    family_rows = []
    for family in [*dict.fromkeys(spec.family for spec in denoisers), "(envelope)"]:
        members = (
            [n for n, fit in fits.items() if fit["family"] == family]
            if family != "(envelope)"
            else list(fits)
        )
        width = max(fits[name]["width"] for name in members)
        # each term per unit of width, the largest of the members', at the widest member's width
        terms = [
            width * max(fits[name][key][index] / fits[name]["width"] for name in members)
            for key, index in (("upper", 0), ("upper", 1), ("live_upper", 0), ("live_upper", 1))
        ]
        field = ", ".join(f"{ceil3(v):_}" for v in terms)
        names = (
            ", ".join(members) if family != "(envelope)" else "all of the above (act_core.memory.UNMEASURED)"
        )
        family_rows.append([family, names, f"ActivationMemory({field}, {width})"])
    table(
        "Per family: ActivationMemory(peak_per_row, peak_per_latent_pixel, live_per_row, live_per_latent_pixel, "
        "width), bytes at 2 bytes per element: each term the largest per unit of width (act_core.memory."
        "denoiser_width) of its members' lines on or above every measured point, at the widest member's width",
        ["family", "members", "figures (rounded up to 3 significant digits)"],
        family_rows,
    )
    return fits


# -------------------------------------------------------------------------------------------- validation
def tiny_flux() -> tuple[str, dict]:
    return "FluxTransformer2DModel", dict(FLUX1, num_layers=1, num_single_layers=1, guidance_embeds=True)


def validation_models() -> list[tuple[str, str, dict, Callable[..., dict], tuple[int, ...]]]:
    """(name, class, config, inputs, sizes) of models small enough to run for real here."""
    import json

    shipped_config = json.loads(
        (Path(__file__).resolve().parents[1] / "models" / "shapes-sdxl" / "unet" / "config.json").read_text()
    )
    shipped_config = {k: v for k, v in shipped_config.items() if not k.startswith("_")}
    narrow = dict(
        SDXL_UNET,
        block_out_channels=(64, 128, 256),
        attention_head_dim=(1, 2, 4),
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=16,
    )

    def shipped_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
        h = size // LATENT_PIXEL
        return dict(
            sample=torch.randn(batch, 4, h, h, dtype=dtype),
            timestep=torch.full((batch,), 999.0),
            encoder_hidden_states=torch.randn(batch, 77, 96, dtype=dtype),
            added_cond_kwargs={
                "text_embeds": torch.randn(batch, 32, dtype=dtype),
                "time_ids": torch.zeros(batch, 6, dtype=dtype),
            },
            return_dict=False,
        )

    return [
        ("shipped SDXL demo UNet", "UNet2DConditionModel", shipped_config, shipped_inputs, (64, 256)),
        ("narrow SDXL-layout UNet", "UNet2DConditionModel", narrow, _unet_inputs(2048, True), (256, 512)),
        ("FLUX.1-dev widths, 1 + 1 blocks", *tiny_flux(), _flux_inputs(512, True), (256, 512)),
    ]


def forward(model: torch.nn.Module, inputs: Callable[[], dict]) -> None:
    with torch.no_grad():
        model(**inputs())


def run_validation(dtypes: tuple[torch.dtype, ...]) -> list[list[str]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows = []
    for name, cls_name, config, inputs, sizes in validation_models():
        for dtype in dtypes:
            real_model = build(cls_name, config, dtype)
            fake = FakeTensorMode(allow_non_fake_inputs=True)
            fake_model = build(cls_name, config, dtype, fake)
            for size in sizes:
                make = partial(inputs, 1, size, dtype)
                real = measure(real_model, make).peak
                faked = measure(fake_model, make, fake).peak
                allocated = allocator_peak(partial(forward, real_model, make))
                rows.append(
                    [
                        name,
                        str(dtype).removeprefix("torch."),
                        str(size),
                        f"{real / MIB:.2f}",
                        f"{faked / MIB:.2f}",
                        f"{faked / real - 1:+.2%}",
                        f"{allocated / MIB:.2f}",
                        f"{faked / allocated - 1:+.2%}",
                    ]
                )
            del real_model, fake_model
    table(
        "Tracker validation: one forward, batch 1 (MiB); fake vs real tensors, and vs the CPU allocator's peak",
        ["model", "dtype", "px", "tracker real", "tracker fake", "fake/real", "allocator", "fake/allocator"],
        rows,
    )
    return rows


# -------------------------------------------------------------------------------------------- projection
def parameter_count(build_module: Callable[[], torch.nn.Module]) -> int:
    """Parameters of a module built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build_module()
    return sum(p.numel() for p in module.parameters())


def own_line(name: str, sizes: tuple[int, ...] = (768, 1024)) -> tuple[float, float, int]:
    """One denoiser's own peak line (``upper_line`` of its batch-1 peaks at ``sizes``), measured here, and its
    width."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = next(d for d in DENOISERS if d.name == name)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = build(spec.cls, spec.config, torch.bfloat16, fake)
    peaks = [measure(model, partial(spec.inputs, 1, size, torch.bfloat16), fake).peak for size in sizes]
    return (*upper_line([latent_pixels(size) for size in sizes], peaks), denoiser_width(model))


@dataclass(frozen=True)
class Setup:
    """A model as a user runs it: its family, rows per pair, the weights on the GPU and their bytes each."""

    label: str
    family: str
    denoiser: str  # its entry in DENOISERS
    rows_per_pair: int
    guided: bool
    weights: tuple[str, ...]  # parameter counts' keys resident on the GPU
    weight_bytes: int


def run_projection(
    gpus: tuple[int, ...] = (12, 24, 80), size: int = 1024, pairs: tuple[int, ...] = (6, 12, 24)
):
    """PROJECTION: weights, free memory, pairs per call and the calls of a step of SDXL and FLUX.1 at ``size``
    px on GPUs of ``gpus`` GiB, from the families' measured activation memory."""
    import diffusers
    from bench_sdxl import CLIP_G, CLIP_L
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from act_core.memory import activation_memory
    from act_core.sampling import split_step_calls

    vae = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )
    # google/t5-v1_1-xxl's encoder (FLUX.1's text_encoder_2)
    t5_xxl = dict(
        vocab_size=32128,
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
    )
    counts = {
        "SDXL UNet": parameter_count(lambda: diffusers.UNet2DConditionModel(**SDXL_UNET)),
        "FLUX.1 transformer": parameter_count(
            lambda: diffusers.FluxTransformer2DModel(**dict(FLUX1, guidance_embeds=True))
        ),
        "CLIP-L": parameter_count(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
        "OpenCLIP bigG": parameter_count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
        "T5-XXL encoder": parameter_count(lambda: T5EncoderModel(T5Config(**t5_xxl))),
        "VAE (SDXL)": parameter_count(lambda: diffusers.AutoencoderKL(**vae, latent_channels=4)),
        "VAE (FLUX)": parameter_count(
            lambda: diffusers.AutoencoderKL(
                **vae, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False
            )
        ),
    }
    table(
        "Parameters (built on the meta device from the published configurations)",
        ["module", "parameters", "GiB at 2 bytes"],
        [[name, f"{n / 1e9:.3f} B", f"{2 * n / GIB:.2f}"] for name, n in counts.items()],
    )
    sdxl_all = ("SDXL UNet", "CLIP-L", "OpenCLIP bigG", "VAE (SDXL)")
    flux_all = ("FLUX.1 transformer", "CLIP-L", "T5-XXL encoder", "VAE (FLUX)")
    setups = [
        Setup("SDXL fp16, all on GPU", "sdxl", "SDXL base 1.0 UNet", 4, True, sdxl_all, 2),
        Setup("SDXL fp16, UNet only", "sdxl", "SDXL base 1.0 UNet", 4, True, sdxl_all[:1], 2),
        Setup("FLUX.1 bf16, all on GPU", "flux", "FLUX.1-dev", 3, False, flux_all, 2),
        Setup("FLUX.1 bf16, transformer only", "flux", "FLUX.1-dev", 3, False, flux_all[:1], 2),
        Setup("FLUX.1 fp8 weights, all on GPU", "flux", "FLUX.1-dev", 3, False, flux_all, 1),
        Setup("FLUX.1 fp8 weights, transformer only", "flux", "FLUX.1-dev", 3, False, flux_all[:1], 1),
    ]
    pixels = latent_pixels(size)
    own = {name: own_line(name) for name in dict.fromkeys(setup.denoiser for setup in setups)}
    fit_rows, step_rows = [], []
    for setup in setups:
        family = FAMILIES[setup.family]
        figures = activation_memory(family)
        own_a, own_b, width = own[setup.denoiser]
        peak_row, live_row = figures.peak_bytes(pixels, 2, width), figures.live_bytes(pixels, 2, width)
        own_family = dataclasses.replace(
            family,
            activation_memory=dataclasses.replace(
                figures, peak_per_row=own_a, peak_per_latent_pixel=own_b, width=width
            ),
        )
        weights = setup.weight_bytes * sum(counts[name] for name in setup.weights)
        for gpu in gpus:
            free = gpu * GIB - weights
            cells = [setup.label, str(gpu), f"{weights / GIB:.1f}"]
            if free <= 0:
                fit_rows.append(cells + ["does not fit", "-", "-", "-"])
                continue
            budget = dict(
                latent_pixels=pixels,
                itemsize=2,
                rows_per_pair=setup.rows_per_pair,
                free_bytes=free,
                width=width,
            )
            k = pairs_per_call(family, **budget, num_pairs=10**6)
            fit_rows.append(
                cells
                + [
                    f"{free / GIB:.1f}",
                    f"{setup.rows_per_pair * peak_row / GIB:.2f}",
                    str(k),
                    str(pairs_per_call(own_family, **budget, num_pairs=10**6)),
                ]
            )
            for n in pairs:
                phases = split_step_calls(n, min(k, n), setup.guided, calibrate=True)
                calls = [len(phase) for phase in phases]
                if len(phases) == 1:
                    need = n * setup.rows_per_pair * peak_row
                else:  # the source calls run together: one at its peak, the others paused at a module
                    rows_per_call = max(len(chunk) for chunk, _ in phases[-1])
                    need = rows_per_call * peak_row + (n - rows_per_call) * live_row
                step_rows.append(
                    [
                        setup.label,
                        str(gpu),
                        str(n),
                        str(min(k, n)),
                        " + ".join(map(str, calls)),
                        f"{need / GIB:.2f}",
                        f"{need / free:.0%}",
                    ]
                )
    table(
        f"PROJECTION, {size}x{size}: free = GPU - weights (nothing else counted); pairs per call = "
        f"act_core.memory.pairs_per_call ({SAFETY_FRACTION:.0%} of free / (rows per pair x the family's measured peak "
        "per row, bf16 activations)); SDXL 4 rows per pair (uncond, target, source, plain), FLUX.1 3; 'own' = with "
        "the denoiser's own measured line instead of its family's",
        ["setup", "GPU GiB", "weights GiB", "free GiB", "GiB / pair", "pairs / call", "own"],
        fit_rows,
    )
    table(
        f"PROJECTION, {size}x{size}: the denoiser calls of one step (act_core.sampling.split_step_calls: all rows in one "
        "call, or target-side calls + source calls run together) and the activation memory of the step's largest "
        "phase (split: one source call at its peak + the other source rows' live state, paused at a module)",
        ["setup", "GPU GiB", "pairs", "pairs / call", "calls / step", "phase GiB", "of free"],
        step_rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true", help="only the tracker validation")
    parser.add_argument("--projection", action="store_true", help="only the projection table")
    parser.add_argument("--only", default="", help="comma-separated denoiser names (substring match)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--no-math", action="store_true", help="skip the math attention path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}")
    if args.validate:
        run_validation((torch.float32, torch.bfloat16))
        return
    if args.projection:
        run_projection()
        return
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    denoisers = tuple(d for d in DENOISERS if not wanted or any(w in d.name.lower() for w in wanted))
    run_family_table(denoisers, tuple(int(s) for s in args.sizes.split(",")), not args.no_math)


if __name__ == "__main__":
    main()
