#!/usr/bin/env python
"""Train the tiny Z-Image-architecture shapes model (``models/shapes-zimage``) from scratch.

    python scripts/train_zimage_demo_model.py           # full run, ~32 CPU minutes on one (shared) core
    python scripts/train_zimage_demo_model.py --smoke   # seconds; writes to outputs/zimage_train_smoke/

Rectified flow on the same procedural shapes as the SDXL demo model, in the latent space of the shipped
SDXL demo model's VAE (as ``shapes-flux``), with a Qwen3 text encoder on the chat-templated captions
(``demo/zimage_model.py``). The shipped attribute classifier scores its samples. Checkpoints go to
--work-dir; rerunning resumes. The saved folder is a plain ``ZImagePipeline`` folder (fp16 weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from diffusers import AutoencoderKL, ZImagePipeline  # noqa: E402

from demo.evaluation import sample_accuracy, sample_grid  # noqa: E402
from demo.export import folder_size, replace_dir  # noqa: E402
from demo.flux_model import flux_pool  # noqa: E402
from demo.paths import load_demo_classifier  # noqa: E402
from demo.training import Checkpointer, TrainConfig  # noqa: E402
from demo.zimage_model import (  # noqa: E402
    MAX_SEQUENCE_LENGTH,
    ZImageDemoConfig,
    save_tokenizer,
    save_zimage_dir,
    train_transformer,
)

SEED = 6
STEPS = 2500  # 0.8-1 s a step on one shared core beside another training (batch 64)
EVAL_STEPS = 20
# ZImagePipeline's guidance_scale: 0 samples unguided (Z-Image-Turbo's way), g > 0 guides cond + g (cond - uncond)
GUIDANCES = (0.0, 2.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "models" / "shapes-zimage")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "zimage_train")
    parser.add_argument(
        "--samples-png", type=Path, default=REPO / "docs" / "images" / "demo_samples_zimage.png"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = ZImageDemoConfig()
    train = {"unet_steps": args.steps, "unet_lr": 5e-4, "cond_dropout": 0.1}
    tc = TrainConfig(seed=args.seed, **train)
    eval_steps, guidances, repeats = EVAL_STEPS, GUIDANCES, 2
    if args.smoke:
        tc = TrainConfig(
            seed=args.seed, **{**train, "unet_steps": 3, "latent_pool": 128, "checkpoint_every": 2}
        )
        root = REPO / "outputs" / "zimage_train_smoke"
        args.out, args.work_dir, args.samples_png = (
            root / "shapes-zimage",
            root / "work",
            root / "samples.png",
        )
        eval_steps, guidances, repeats = 2, (0.0,), 1
    ckpt = Checkpointer(args.work_dir)
    log(f"config {asdict(cfg)}")
    log(f"train {asdict(tc)}")
    times = {}
    start = time.time()
    vae = AutoencoderKL.from_pretrained(REPO / "models" / "shapes-sdxl" / "vae", local_files_only=True)
    vae = vae.float().eval()
    tokenizer = save_tokenizer(args.work_dir / "tokenizer")
    pool = ckpt.load("pool")
    if pool is None:
        pool = flux_pool(vae, 32, tc, log)
        ckpt.save("pool", pool)
    scaling = float(pool["scaling_factor"])
    transformer, text_encoder = train_transformer(cfg, tc, tokenizer, pool, ckpt, log)
    times["train_s"] = time.time() - start
    tmp = save_zimage_dir(args.out, vae, transformer, text_encoder, tokenizer, scaling)
    pipe = ZImagePipeline.from_pretrained(tmp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_demo_classifier()
    sampling = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "height": 32, "width": 32}
    results = {}
    t = time.time()
    for guidance in guidances:
        acc = sample_accuracy(
            pipe, classifier, repeats=repeats, steps=eval_steps, guidance=guidance, **sampling
        )
        results[f"steps{eval_steps}_guidance{guidance}"] = acc
        log(f"classifier on model samples, {eval_steps} steps, guidance {guidance}: {acc}")
    best = max(guidances, key=lambda g: results[f"steps{eval_steps}_guidance{g}"]["all"])
    sample_grid(pipe, args.samples_png, title="shapes-zimage", steps=eval_steps, guidance=best, **sampling)
    times["eval_s"] = time.time() - t
    info = {
        "command": " ".join(["python", *sys.argv]),
        "model_config": asdict(cfg),
        "train_config": asdict(tc),
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("transformer", transformer), ("text_encoder", text_encoder))
        },
        "vae": "the shipped shapes-sdxl VAE, scaling_factor refitted",
        "vae_scaling_factor": scaling,
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "sample_accuracy": results,
        "best_guidance": best,
        "torch": torch.__version__,
    }
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    del pipe
    replace_dir(tmp, args.out)
    log(
        f"wrote {args.out} ({folder_size(args.out) / 1e6:.2f} MB) and {args.samples_png}; {info['wall_time_s']}"
    )
    if args.smoke:
        shutil.rmtree(REPO / "outputs" / "zimage_train_smoke")


if __name__ == "__main__":
    main()
