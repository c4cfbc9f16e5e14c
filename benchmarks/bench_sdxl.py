"""Full-size SDXL benchmark: per-step cost of ACT hooks and fused maps, and where fit_act's time goes.

Run (about 10 minutes and 15 GB of RAM on a 2-core CPU; nothing is downloaded):

    python benchmarks/bench_sdxl.py            # full-size SDXL UNet + CLIP-L / bigG, random weights, fp32
    python benchmarks/bench_sdxl.py --quick    # a small UNet, seconds: a smoke run of the same code

The SDXL UNet is built from diffusers' SDXL-base configuration written out below (no config download),
with random weights, so the timings are those of the real architecture (210 transformer LayerNorms,
46 GroupNorms) but the images would be noise. Step times are UNet forwards at 256x256 (32x32 latents),
on a CFG batch of 2 (the hooks steer the cond half); the variants are interleaved round by round (order rotated), so machine noise from
other processes hits them alike, and ratios are medians of one run. The maps timed are the ones
fitted in the fit benchmark: the default (time-aware, one map per step, per element; the step falls
between two buckets, so the hooks interpolate), the paper's preset (Linear-AcT, source [min, max]
support, spatial mean on feature maps) and the foldable preset (unbounded, per element), which is also
fused into weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import string
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tables import table

from act_core.diffusers import act_pipeline

# diffusers' SDXL base 1.0 UNet configuration (the values of its unet/config.json).
SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,  # 6 * 256 time ids + 1280 pooled text embedding
    sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    upcast_attention=False,
    use_linear_projection=True,
)
# A small UNet of the same structure for --quick (cross-attention width = 768 + 1280 stays).
QUICK_UNET = dict(
    SDXL_UNET,
    attention_head_dim=(2, 4, 8),
    block_out_channels=(32, 64, 128),
    transformer_layers_per_block=(1, 1, 2),
    norm_num_groups=8,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 1280,
)
# CLIP ViT-L/14 text model (SDXL's text_encoder) and OpenCLIP bigG (text_encoder_2).
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
SOURCE = ["a photo of a cat", "a dog on a sofa", "a red car in the street", "a bowl of fruit on a table"]
TARGET = [f"{prompt}, watercolor painting, soft washes" for prompt in SOURCE]
GIB = 1024**3


# ----------------------------------------------------------------------------------------- machine state
def available_gib() -> float:
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024 / GIB


def rss_gib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------- model
def write_tokenizer(folder: Path, max_length: int) -> Any:
    """A character-level CLIP tokenizer (no download); token ids only index embeddings here."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in string.ascii_lowercase + string.digits + ",.!-'":
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def build_pipeline(quick: bool, full_text_encoders: bool) -> Any:
    """An ACT-enabled SDXL pipeline with random weights (a tiny VAE: nothing here decodes images)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel(**(QUICK_UNET if quick else SDXL_UNET)).eval()
    log(
        f"UNet built in {time.perf_counter() - start:.0f} s, {sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B params"
    )
    shrink = {} if full_text_encoders else {"num_hidden_layers": 2, "intermediate_size": 256}
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**CLIP_L, **shrink})).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**CLIP_G, **shrink})).eval()
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],  # 4 levels: vae_scale_factor 8, as SDXL's VAE
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    folder = Path(tempfile.mkdtemp(prefix="act_bench_tok_"))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=write_tokenizer(folder / "t1", 77),
        tokenizer_2=write_tokenizer(folder / "t2", 77),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return act_pipeline(pipe)


# ----------------------------------------------------------------------------------------- fit split
class PhaseClock:
    """Wall-clock spans of text encoder forwards, UNet forwards and map estimation during a fit.

    Lockstep fitting runs batches in concurrent threads, so summing per-call times would count
    overlapping time twice. Instead the fit's wall time is partitioned: an instant counts as
    estimation if a module is being estimated, else as text encoders if one runs, else as UNet if
    one runs, else as other (tokenizing, scheduler, thread start).
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.lock = threading.Lock()
        self.spans: dict[str, list[tuple[float, float]]] = {"estimation": [], "text": [], "unet": []}
        self.calls: dict[str, int] = {"text": 0, "unet": 0}
        self.handles: list[Any] = []
        self.local = threading.local()
        self._originals: list[tuple[type, str, Any]] = []

    def __enter__(self) -> PhaseClock:
        from act_core import fitting

        parts = (("text", [self.pipe.text_encoder, self.pipe.text_encoder_2]), ("unet", [self.pipe.unet]))
        for part, modules in parts:
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(lambda *a, p=part: self._start(p)))
                self.handles.append(module.register_forward_hook(lambda *a, p=part: self._stop(p)))
        # Time estimation by wrapping the session methods that estimate one module (benchmark only): the
        # first-step engine's and the trajectory engine's.
        from act_core import trajectory

        self._originals = [
            (fitting._FitSession, "fit_module", fitting._FitSession.fit_module),
            (trajectory.TrajectoryFit, "_fit", trajectory.TrajectoryFit._fit),
        ]
        clock = self

        for owner, name, original in self._originals:

            def estimate(session: Any, module: str, _original: Any = original) -> Any:
                start = time.perf_counter()
                try:
                    return _original(session, module)
                finally:
                    with clock.lock:
                        clock.spans["estimation"].append((start, time.perf_counter()))

            setattr(owner, name, estimate)
        return self

    def _start(self, part: str) -> None:
        self.local.__dict__[part] = time.perf_counter()

    def _stop(self, part: str) -> None:
        with self.lock:
            self.spans[part].append((self.local.__dict__.pop(part), time.perf_counter()))
            self.calls[part] += 1

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        for owner, name, original in self._originals:
            setattr(owner, name, original)

    def partition(self, start: float, end: float) -> dict[str, float]:
        """Seconds of [start, end] in each phase, by priority estimation > text > unet > other.

        A UNet pass cut short by an exception (group-wise truncation) has no end and is not counted.
        """
        events = sorted({start, end, *(t for spans in self.spans.values() for span in spans for t in span)})
        totals = dict.fromkeys(("estimation", "text", "unet", "other"), 0.0)
        for left, right in zip(events, events[1:], strict=False):
            if right <= start or left >= end:
                continue
            middle = (left + right) / 2
            phase = next(
                (p for p in ("estimation", "text", "unet") if any(a <= middle < b for a, b in self.spans[p])),
                "other",
            )
            totals[phase] += right - left
        return totals


def timed_fit(pipe: Any, size: int, **options: Any) -> tuple[Any, dict[str, float]]:
    """fit_act with its wall time split into text encoders, UNet passes, estimation and the rest."""
    with PhaseClock(pipe) as clock:
        start = time.perf_counter()
        act_map = pipe.fit_act(SOURCE, TARGET, height=size, width=size, progress=False, **options)
        end = time.perf_counter()
    split = clock.partition(start, end)
    return act_map, {
        "total": end - start,
        "text encoders": split["text"],
        "UNet passes": split["unet"],
        "estimation": split["estimation"],
        "other": split["other"],
        "unet calls": clock.calls["unet"],
    }


def bench_fit(pipe: Any, size: int, steps: int) -> tuple[Any, Any, Any]:
    rows, maps = [], {}
    runs = [
        # at most 2 pairs per UNet call: all 16 rows at once beside the full-size UNet's weights exhausted 24 GB;
        # a split step is exact (the target-side rows first, then the source calls meet at every module)
        (
            "unet_norms",
            {"num_inference_steps": steps, "guidance_scale": 5.0, "max_pairs_per_call": 2},
            f"default: trajectory, {steps} steps",
        ),
        ("unet_norms_first_step", {"batch_size": 4, "num_inference_steps": 30}, "paper preset, first step"),
        ("unet_norms_foldable", {"batch_size": 4, "mode": "at_once"}, "foldable preset, at once"),
        ("text_encoder_norms", {"batch_size": 4}, "text encoder norms"),
    ]
    for preset, options, label in runs:
        log(f"fitting {label} ... ({load()}, RSS {rss_gib():.1f} GiB)")
        act_map, split = timed_fit(pipe, size, preset=preset, **options)
        maps[preset] = act_map
        rows.append(
            [
                label,
                str(len(act_map)),
                f"{split['total']:.1f}",
                f"{split['text encoders']:.1f}",
                f"{split['UNet passes']:.1f}",
                f"{split['estimation']:.2f}",
                f"{split['other']:.1f}",
                str(split["unet calls"]),
            ]
        )
    table(
        f"fit_act time split (s, wall clock; {len(SOURCE)}+{len(TARGET)} prompts, {size}x{size})",
        ["fit", "modules", "total", "text enc", "UNet", "estimation", "other", "UNet calls"],
        rows,
    )
    bench_fit_against_generation(pipe, size, steps)
    return maps["unet_norms_first_step"], maps["unet_norms_foldable"], maps["unet_norms"]


def bench_fit_against_generation(pipe: Any, size: int, steps: int, rounds: int = 2) -> None:
    """The default fit against a plain generation of the same source prompts at the same steps, guidance and
    size (latents out: the fit decodes nothing), both in calls of at most 2 pairs, run back to back twice
    (order swapped) and compared by their medians. The row floor is 2x: four rows per pair against two."""
    options = {"num_inference_steps": steps, "guidance_scale": 5.0, "height": size, "width": size}
    fits, generations, estimation = [], [], []
    for round_ in range(rounds):
        order = ("fit", "generate") if round_ % 2 == 0 else ("generate", "fit")
        for what in order:
            log(f"{what} (round {round_ + 1}/{rounds}) ... ({load()})")
            if what == "fit":
                _, split = timed_fit(
                    pipe, size, num_inference_steps=steps, guidance_scale=5.0, max_pairs_per_call=2
                )
                fits.append(split["total"])
                estimation.append(split["estimation"])
            else:
                start = time.perf_counter()
                for first in range(0, len(SOURCE), 2):
                    pipe(SOURCE[first : first + 2], output_type="latent", **options)
                generations.append(time.perf_counter() - start)
    fit, generation = statistics.median(fits), statistics.median(generations)
    table(
        f"default fit against a plain generation of the same {len(SOURCE)} prompts ({steps} steps, {size}x{size}; "
        f"medians of {rounds} rounds)",
        ["fit (s)", "generation (s)", "fit / generation", "estimation (s)", "estimation share of the fit"],
        [
            [
                f"{fit:.1f}",
                f"{generation:.1f}",
                f"{fit / generation:.2f}x",
                f"{statistics.median(estimation):.2f}",
                f"{statistics.median(estimation) / fit:.1%}",
            ]
        ],
    )


# ----------------------------------------------------------------------------------------- step times
class HookSelfTime:
    """Seconds spent inside ACT's hooks (transport hooks and the UNet step gate) during a block.

    Measured by wrapping the hook classes' ``__call__`` (benchmark only). Under CPU contention from
    other processes, whole-step ratios wobble by several percent; the hooks' own time is a direct
    measurement of what ACT adds, and the fused variant (same operations as base) shows the noise floor.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: list[tuple[type, Any]] = []

    def __enter__(self) -> HookSelfTime:
        from act_core.applying import TransportHook
        from act_core.diffusers.pipeline import DenoiserStepGate

        for cls in (TransportHook, DenoiserStepGate):
            original = cls.__call__
            self._saved.append((cls, original))

            def timed(hook: Any, *args: Any, _original: Any = original) -> Any:
                start = time.perf_counter()
                try:
                    return _original(hook, *args)
                finally:
                    self.seconds += time.perf_counter() - start

            cls.__call__ = timed
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, original in self._saved:
            cls.__call__ = original


Variant = tuple[str, Callable[[], None], Callable[[], None]]  # name, set up, tear down


def interleaved_rounds(
    variants: list[Variant], step: Callable[[], tuple[float, float]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(step seconds, seconds inside hooks) per variant: a warm-up of each, then ``rounds`` rounds with the
    order rotated, so machine noise from other processes hits every variant alike."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    inside: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _name, setup, teardown in variants:  # warm-up, also checks every variant runs
        setup()
        step()
        teardown()
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for name, setup, teardown in variants[shift:] + variants[:shift]:
            setup()
            elapsed, hooked = step()
            times[name].append(elapsed)
            inside[name].append(hooked)
            teardown()
    return times, inside


def bench_steps(pipe: Any, paper_map: Any, foldable_map: Any, timed_map: Any, size: int, rounds: int) -> None:
    """UNet steps on a CFG batch [uncond; cond] (batch 2), as a pipeline runs them."""
    from act_core.diffusers import active_pipeline

    latent = size // 8
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=generator)
    hidden = torch.randn(2, 77, 2048, generator=generator)
    added = {
        "text_embeds": torch.randn(2, 1280, generator=generator),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32),
    }
    # between two of the time-aware map's buckets, so the hooks interpolate
    levels = sorted(timed_map.buckets)
    timestep = torch.tensor(500 * (levels[0] + levels[1]))

    def step() -> tuple[float, float]:
        # a CFG batch [uncond; cond]: the gate steers the cond half
        with active_pipeline(pipe, cfg_batch=True), HookSelfTime() as hooks, torch.no_grad():
            start = time.perf_counter()
            pipe.unet(
                sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
            )
            elapsed = time.perf_counter() - start
        return elapsed, hooks.seconds

    variants: list[Variant] = [
        ("base (no ACT)", lambda: None, lambda: None),
        ("hook: time-aware map (default)", lambda: pipe.enable_act(timed_map, 1.0), pipe.disable_act),
        ("hook: paper map", lambda: pipe.enable_act(paper_map, 1.0), pipe.disable_act),
        ("hook: foldable map", lambda: pipe.enable_act(foldable_map, 1.0), pipe.disable_act),
        ("fused: foldable map", lambda: pipe.fuse_act(foldable_map, 1.0), pipe.unfuse_act),
    ]
    log(f"timing UNet steps: {len(variants)} variants x {rounds} rounds, interleaved ({load()})")
    times, self_times = interleaved_rounds(variants, step, rounds)
    base_name = variants[0][0]
    base, base_min = statistics.median(times[base_name]), min(times[base_name])
    rows = []
    for name, _, _ in variants:
        median = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times[base_name], strict=True))
        inside = statistics.median(s / t for s, t in zip(self_times[name], times[name], strict=True))
        goal = {
            "hook: time-aware map (default)": "in hooks <= 3%",
            "hook: paper map": "<= 1.03",
            "fused: foldable map": "<= 1.01",
        }.get(name, "")
        rows.append(
            [
                name,
                f"{median:.3f}",
                f"{min(times[name]):.3f}",
                f"{median / base:.3f}",
                f"{paired:.3f}",
                f"{min(times[name]) / base_min:.3f}",
                f"{100 * inside:.2f}%",
                goal,
            ]
        )
    table(
        f"UNet step time ({size}x{size}, CFG batch 2, fp32, {torch.get_num_threads()} threads; {rounds} "
        "interleaved rounds)",
        ["variant", "median s", "min s", "ratio", "paired ratio", "min ratio", "in hooks", "goal"],
        rows,
    )
    log(
        "ratio = median / base median; paired = median of per-round ratios; min ratio = min / base min; "
        "in hooks = median share of the step spent inside ACT's hooks"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small UNet and text encoders, few rounds")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 15, quick 3)"
    )
    parser.add_argument("--size", type=int, default=256, help="image size (latents are size/8)")
    parser.add_argument(
        "--steps", type=int, default=4, help="sampling steps of the default (trajectory) fit (default 4)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). Use 1 when another process keeps a core busy: "
        "OpenMP threads that wait for a busy core make every step slower and noisier",
    )
    parser.add_argument(
        "--fit-vs-generation",
        type=int,
        default=None,
        metavar="ROUNDS",
        help="only the default fit against a plain generation, this many rounds (the issue-19 figures)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    rounds = args.rounds or (3 if args.quick else 15)
    free = available_gib()
    full_text = not args.quick and free >= 19.0
    log(
        f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    log(f"available memory {free:.1f} GiB; {load()}")
    log(
        "text encoders: "
        + ("full-size CLIP-L + bigG" if full_text else "2-layer CLIP-L/bigG widths (memory or --quick)")
    )
    pipe = build_pipeline(args.quick, full_text)
    log(f"RSS after building: {rss_gib():.1f} GiB; {load()}")
    if args.fit_vs_generation:
        bench_fit_against_generation(pipe, args.size, args.steps, args.fit_vs_generation)
        return
    paper_map, foldable_map, timed_map = bench_fit(pipe, args.size, args.steps)
    bench_steps(pipe, paper_map, foldable_map, timed_map, args.size, rounds)
    log(f"\nRSS {rss_gib():.1f} GiB; {load()} (other processes share these cores: see load averages)")


if __name__ == "__main__":
    main()
