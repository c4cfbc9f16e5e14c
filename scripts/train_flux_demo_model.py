#!/usr/bin/env python
"""Train the shipped tiny FLUX.1-architecture shapes model (``models/shapes-flux``) from scratch.

    python scripts/train_flux_demo_model.py               # full run, ~20 CPU minutes on one core
    python scripts/train_flux_demo_model.py --variant b   # the second FLUX model (models/shapes-flux-b)
    python scripts/train_flux_demo_model.py --smoke       # seconds; writes to outputs/flux_train_smoke/

Rectified flow on the same procedural shapes as the SDXL demo model, in the latent space of the shipped
SDXL demo model's VAE, with the caption tokenizer for both text encoders (``demo/flux_model.py``). The
shipped attribute classifier scores its samples. Checkpoints go to --work-dir; rerunning resumes.

The second model (``--variant b``) exists so that FLUX defaults are not tuned to the first: another seed,
the SDXL model b's data (palette, diagonal stripes) and VAE, other sizes (2 double + 6 single blocks, width
96), more captions naming the style, and sampled with 25 steps; its classifier is ``shapes-classifier-b``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from diffusers import AutoencoderKL, FluxPipeline  # noqa: E402

from demo.evaluation import sample_accuracy, sample_grid  # noqa: E402
from demo.export import folder_size, replace_dir  # noqa: E402
from demo.flux_model import MAX_SEQUENCE_LENGTH, FluxDemoConfig, flux_pool, save_flux_dir, train_transformer  # noqa: E402
from demo.paths import load_demo_classifier  # noqa: E402
from demo.tokenizer import save_tokenizer  # noqa: E402
from demo.training import Checkpointer, TrainConfig  # noqa: E402


@dataclass(frozen=True)
class FluxVariant:
    """One trained FLUX model: seed, sizes, data, VAE, classifier, outputs, how it is sampled."""

    seed: int
    model: FluxDemoConfig
    train: dict = field(default_factory=dict)
    suffix: str = ""
    vae_model: str = "shapes-sdxl"
    classifier: str = "shapes-classifier"
    eval_steps: int = 20


VARIANTS = {
    "shipped": FluxVariant(4, FluxDemoConfig()),
    "b": FluxVariant(
        5,
        FluxDemoConfig(double_blocks=2, single_blocks=6, heads=6, clip_hidden=48, t5_layers=3),
        {"draw_style": "b", "cond_dropout": 0.15, "explicit_style_prob": 0.5},
        "-b",
        "shapes-sdxl-b",
        "shapes-classifier-b",
        25,
    ),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="shipped")
    parser.add_argument("--out", type=Path, default=None, help="default: models/shapes-flux<suffix>")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: outputs/flux_train<suffix>")
    parser.add_argument("--samples-png", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=None, help="override the variant's seed")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variant = VARIANTS[args.variant]
    suffix = variant.suffix
    args.out = args.out or REPO / "models" / f"shapes-flux{suffix}"
    args.work_dir = args.work_dir or REPO / "outputs" / f"flux_train{suffix}"
    args.samples_png = args.samples_png or REPO / "docs" / "images" / f"demo_samples_flux{suffix}.png"
    args.seed = variant.seed if args.seed is None else args.seed
    cfg = variant.model
    train = {"unet_steps": 4000, "unet_lr": 5e-4, "cond_dropout": 0.1, **variant.train}
    tc = TrainConfig(seed=args.seed, **train)
    eval_steps, guidances, repeats = variant.eval_steps, (1.0, 3.0), 2
    if args.smoke:
        tc = TrainConfig(
            seed=args.seed, **{**train, "unet_steps": 3, "latent_pool": 128, "checkpoint_every": 2}
        )
        root = REPO / "outputs" / "flux_train_smoke"
        args.out, args.work_dir, args.samples_png = root / "shapes-flux", root / "work", root / "samples.png"
        eval_steps, guidances, repeats = 2, (1.0,), 1
    ckpt = Checkpointer(args.work_dir)
    log(f"config {asdict(cfg)}")
    log(f"train {asdict(tc)}")
    times = {}
    start = time.time()
    vae_path = REPO / "models" / variant.vae_model / "vae"
    vae = AutoencoderKL.from_pretrained(vae_path, local_files_only=True).float().eval()
    tokenizer = save_tokenizer(args.work_dir / "tokenizer")
    pool = ckpt.load("pool")
    if pool is None:
        pool = flux_pool(vae, 32, tc, log)
        ckpt.save("pool", pool)
    scaling = float(pool["scaling_factor"])
    transformer, clip, t5 = train_transformer(cfg, tc, tokenizer, pool, ckpt, log)
    times["train_s"] = time.time() - start
    tmp = save_flux_dir(args.out, vae, transformer, clip, t5, tokenizer, scaling)
    pipe = FluxPipeline.from_pretrained(tmp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_demo_classifier(REPO / "models" / variant.classifier)
    results = {}
    t = time.time()
    for true_cfg in guidances:
        extra = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "height": 32, "width": 32}
        if true_cfg > 1.0:
            extra.update(true_cfg_scale=true_cfg, negative_prompt="")
        acc = sample_accuracy(pipe, classifier, repeats=repeats, steps=eval_steps, guidance=1.0, **extra)
        results[f"steps{eval_steps}_true_cfg{true_cfg}"] = acc
        log(f"classifier on model samples, {eval_steps} steps, true_cfg {true_cfg}: {acc}")
    best = max(guidances, key=lambda g: results[f"steps{eval_steps}_true_cfg{g}"]["all"])
    extra = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "height": 32, "width": 32}
    if best > 1.0:
        extra.update(true_cfg_scale=best, negative_prompt="")
    sample_grid(
        pipe,
        args.samples_png,
        title=f"shapes-flux{suffix} (true CFG {best:g})",
        steps=eval_steps,
        guidance=1.0,
        **extra,
    )
    times["eval_s"] = time.time() - t
    info = {
        "command": " ".join(["python", *sys.argv]),
        "variant": args.variant,
        "model_config": asdict(cfg),
        "train_config": asdict(tc),
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("transformer", transformer), ("text_encoder", clip), ("text_encoder_2", t5))
        },
        "vae": f"the {variant.vae_model} VAE, scaling_factor refitted",
        "vae_scaling_factor": scaling,
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "sample_accuracy": results,
        "best_true_cfg": best,
        "torch": torch.__version__,
    }
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    del pipe
    replace_dir(tmp, args.out)
    log(
        f"wrote {args.out} ({folder_size(args.out) / 1e6:.2f} MB) and {args.samples_png}; {info['wall_time_s']}"
    )
    if args.smoke:
        shutil.rmtree(REPO / "outputs" / "flux_train_smoke")


if __name__ == "__main__":
    main()
