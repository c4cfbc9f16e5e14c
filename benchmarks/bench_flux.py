"""FLUX.1 benchmark: the share of a full-width FLUX transformer step spent inside ACT's hooks.

Run (a few minutes and about 6 GB of RAM on a 2-core CPU with the default depth; nothing is downloaded):

    python benchmarks/bench_flux.py                 # FLUX.1-schnell widths, 2 double + 4 single blocks
    python benchmarks/bench_flux.py --double 19 --single 38   # the full depth (about 48 GB in fp32)
    python benchmarks/bench_flux.py --quick         # a narrow transformer, seconds: a smoke run

The transformer is diffusers' ``FluxTransformer2DModel`` with FLUX.1-schnell's configuration written out
below (width 3072, 24 heads of 128, T5 width 4096, no guidance embedding) and random weights. The full
depth (19 double-stream + 38 single-stream blocks, 12 B parameters) does not fit this machine's 24 GB in
fp32, so by default the depth is cut to 2 + 4 blocks: ACT's hook work and the blocks' own work both grow
one block at a time, so the share per step is what the full model would show (the embedders and the
final layer, unhooked, are a smaller share at full depth). The text encoders are tiny (their width
matches the transformer's inputs); only the transformer step is timed. Maps are fitted with
``pipe.fit_act`` (the default ``pooled_text_and_blocks`` preset, the reference's ``transformer_blocks`` and ``transformer_norms``), then step times
of base and hooked variants are interleaved round by round; "in hooks" is measured directly by timing
the hook calls.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from bench_sdxl import HookSelfTime, Variant, interleaved_rounds, load, log, rss_gib, write_tokenizer
from tables import table

from act_core.diffusers import act_pipeline

# diffusers' FLUX.1-schnell transformer configuration (the values of its transformer/config.json).
FLUX_SCHNELL = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
QUICK = dict(FLUX_SCHNELL, attention_head_dim=16, num_attention_heads=4, axes_dims_rope=(4, 6, 6))
SOURCE = ["a photo of a cat", "a red car in the street"]
TARGET = [f"{prompt}, watercolor painting" for prompt in SOURCE]


def build_pipeline(quick: bool, double: int, single: int) -> Any:
    """An ACT FluxPipeline: FLUX.1-schnell widths at the chosen depth, tiny text encoders and VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = dict(QUICK if quick else FLUX_SCHNELL, num_layers=double, num_single_layers=single)
    start = time.perf_counter()
    transformer = FluxTransformer2DModel(**config).eval()
    params = sum(p.numel() for p in transformer.parameters()) / 1e9
    log(
        f"transformer built in {time.perf_counter() - start:.0f} s: {double} double + {single} single blocks, "
        f"{params:.2f} B params, RSS {rss_gib():.1f} GiB"
    )
    folder = Path(tempfile.mkdtemp(prefix="act_bench_flux_tok_"))
    tokenizer = write_tokenizer(folder / "clip", 77)
    tokenizer_2 = write_tokenizer(folder / "t5", 512)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config["pooled_projection_dim"],
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=config["joint_attention_dim"],
            d_kv=16,
            d_ff=256,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=1,
            eos_token_id=1,
        )
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],  # vae_scale_factor 8, as FLUX's VAE; never run here
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=config["in_channels"] // 4,
        norm_num_groups=4,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return act_pipeline(pipe)


def fit_maps(pipe: Any, size: int, steps: int, sequence: int) -> dict[str, Any]:
    maps, rows = {}, []
    for preset in ("pooled_text_and_blocks", "transformer_blocks", "transformer_norms"):
        start = time.perf_counter()
        maps[preset] = pipe.fit_act(
            SOURCE,
            TARGET,
            preset=preset,
            num_inference_steps=steps,
            height=size,
            width=size,
            max_sequence_length=sequence,
            progress=False,
        )
        rows.append([preset, str(len(maps[preset])), f"{time.perf_counter() - start:.1f}"])
        log(f"fitted {preset} ({load()}, RSS {rss_gib():.1f} GiB)")
    table(
        f"fit_act ({len(SOURCE)}+{len(TARGET)} prompts, {steps} steps, {size}x{size})",
        ["preset", "maps", "seconds"],
        rows,
    )
    return maps


def bench_steps(pipe: Any, maps: dict[str, Any], size: int, sequence: int, rounds: int) -> None:
    """One transformer step (batch 1: FLUX has no CFG batch) per variant, interleaved."""
    from act_core.diffusers import active_pipeline

    latent = size // 8
    generator = torch.Generator().manual_seed(0)
    config = pipe.transformer.config
    hidden = pipe._pack_latents(
        torch.randn(1, config.in_channels // 4, latent, latent, generator=generator),
        1,
        config.in_channels // 4,
        latent,
        latent,
    )
    inputs = {
        "hidden_states": hidden,
        "encoder_hidden_states": torch.randn(1, sequence, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "txt_ids": torch.zeros(sequence, 3),
        "img_ids": pipe._prepare_latent_image_ids(1, latent // 2, latent // 2, "cpu", torch.float32),
        "return_dict": False,
    }
    levels = sorted(maps["pooled_text_and_blocks"].buckets)
    timestep = torch.tensor([(levels[0] + levels[1]) / 2])  # between two buckets: the hooks interpolate

    def step() -> tuple[float, float]:
        # FLUX: no CFG batch
        with active_pipeline(pipe, cfg_batch=False), HookSelfTime() as hooks, torch.no_grad():
            start = time.perf_counter()
            pipe.transformer(timestep=timestep, **inputs)
            elapsed = time.perf_counter() - start
        return elapsed, hooks.seconds

    variants: list[Variant] = [("base (no ACT)", lambda: None, lambda: None)]
    for preset, act_map in maps.items():
        variants.append((f"hook: {preset}", lambda m=act_map: pipe.enable_act(m, 1.0), pipe.disable_act))
    log(f"timing transformer steps: {len(variants)} variants x {rounds} rounds, interleaved ({load()})")
    times, inside = interleaved_rounds(variants, step, rounds)
    base = times[variants[0][0]]
    rows = []
    for name, _, _ in variants:
        paired = statistics.median(t / b for t, b in zip(times[name], base, strict=True))
        share = statistics.median(s / t for s, t in zip(inside[name], times[name], strict=True))
        rows.append([name, f"{statistics.median(times[name]):.3f}", f"{paired:.3f}", f"{100 * share:.2f}%"])
    table(
        f"transformer step ({size}x{size}: {hidden.shape[1]} image + {sequence} text tokens, batch 1, fp32, "
        f"{torch.get_num_threads()} threads; {rounds} interleaved rounds)",
        ["variant", "median s", "paired ratio", "in hooks"],
        rows,
    )
    log(
        "paired ratio = median of per-round ratios to base; in hooks = median share of the step inside ACT's hooks"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow transformer, 3 rounds: a smoke run")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--size", type=int, default=128, help="image size (latents size/8, 2x2 patches)")
    parser.add_argument("--sequence", type=int, default=64, help="T5 tokens (FLUX.1-schnell samples 256)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the fits")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The tokenizer does not know")  # character tokenizers here
    log(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, {load()}")
    pipe = build_pipeline(args.quick, args.double, args.single)
    maps = fit_maps(pipe, args.size, args.steps, args.sequence)
    bench_steps(pipe, maps, args.size, args.sequence, args.rounds or (3 if args.quick else 9))


if __name__ == "__main__":
    main()
