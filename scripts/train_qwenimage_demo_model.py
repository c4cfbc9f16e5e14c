#!/usr/bin/env python
"""Train the tiny Qwen-Image-architecture shapes model (``models/shapes-qwenimage``) from scratch.

    python scripts/train_qwenimage_demo_model.py           # full run, ~25 CPU minutes on one (shared) core
    python scripts/train_qwenimage_demo_model.py --smoke   # seconds; writes to outputs/qwenimage_train_smoke/

Three stages on the same procedural shapes as the SDXL demo model (``demo/qwenimage_model.py``): a small
Qwen-Image VAE (``AutoencoderKLQwenImage``; QwenImagePipeline cannot decode with the shipped SDXL VAE), the
latent pool it encodes, then rectified flow with a Qwen2.5-VL text encoder on the pipeline's chat template.
The shipped attribute classifier scores its samples. Checkpoints go to --work-dir; rerunning resumes. The saved
folder is a plain ``QwenImagePipeline`` folder (fp16 weights).
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
from diffusers import QwenImagePipeline  # noqa: E402

from demo.evaluation import sample_accuracy, sample_grid  # noqa: E402
from demo.export import folder_size, replace_dir  # noqa: E402
from demo.model import DemoModelConfig  # noqa: E402
from demo.paths import load_demo_classifier  # noqa: E402
from demo.qwenimage_model import (  # noqa: E402
    FrameVAE,
    QwenImageDemoConfig,
    build_vae,
    one_frame_convs,
    save_qwenimage_dir,
    save_tokenizer,
    train_transformer,
)
from demo.training import Checkpointer, TrainConfig, encode_pool, train_vae  # noqa: E402

SEED = 7
VAE_STEPS = 1500  # 0.5-0.7 s a step (batch 32); 800 blurred stripes and dots (docs/demo_model.md)
STEPS = 5000  # 0.12-0.35 s a step (batch 64); draws best of 2500 / 3000 / 5000 (docs/demo_model.md)
EVAL_STEPS = 20
# QwenImagePipeline's true_cfg_scale: 1 samples unguided (no negative prompt); above 1 with negative_prompt=""
TRUE_CFGS = (1.0, 3.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "models" / "shapes-qwenimage")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "qwenimage_train")
    parser.add_argument(
        "--samples-png", type=Path, default=REPO / "docs" / "images" / "demo_samples_qwenimage.png"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = QwenImageDemoConfig()
    train = {"vae_steps": VAE_STEPS, "unet_steps": args.steps, "unet_lr": 5e-4, "cond_dropout": 0.1}
    tc = TrainConfig(seed=args.seed, **train)
    eval_steps, true_cfgs, repeats = EVAL_STEPS, TRUE_CFGS, 2
    if args.smoke:
        smoke = {"vae_steps": 3, "unet_steps": 3, "latent_pool": 128, "checkpoint_every": 2}
        tc = TrainConfig(seed=args.seed, **{**train, **smoke})
        root = REPO / "outputs" / "qwenimage_train_smoke"
        args.out, args.work_dir = root / "shapes-qwenimage", root / "work"
        args.samples_png = root / "samples.png"
        eval_steps, true_cfgs, repeats = 2, (1.0,), 1
    ckpt = Checkpointer(args.work_dir)
    log(f"config {asdict(cfg)}")
    log(f"train {asdict(tc)}")
    times = {}
    start = time.time()
    torch.manual_seed(tc.seed)
    vae = FrameVAE(build_vae(cfg))
    with one_frame_convs():  # the same computation as the 3D convolutions on one frame, a third of the cost
        vae = train_vae(DemoModelConfig(image_size=32), tc, ckpt, log, vae=vae)
        times["vae_s"] = time.time() - start
        pool = ckpt.load("pool")
        if pool is None:
            pool = encode_pool(vae, DemoModelConfig(image_size=32), tc, log)
            ckpt.save("pool", pool)
    tokenizer = save_tokenizer(args.work_dir / "tokenizer")
    t = time.time()
    transformer, text_encoder = train_transformer(cfg, tc, tokenizer, pool, ckpt, log)
    times["transformer_s"] = time.time() - t
    times["train_s"] = time.time() - start
    tmp = save_qwenimage_dir(args.out, vae.vae, transformer, text_encoder, tokenizer, pool)
    pipe = QwenImagePipeline.from_pretrained(tmp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_demo_classifier()
    results = {}
    t = time.time()

    def sampling(true_cfg: float) -> dict:
        # guidance_scale is for guidance-distilled models only; true CFG needs a negative prompt
        extra = {"height": 32, "width": 32, "guidance": None, "true_cfg_scale": true_cfg}
        return {**extra, "negative_prompt": ""} if true_cfg > 1 else extra

    for true_cfg in true_cfgs:
        acc = sample_accuracy(pipe, classifier, repeats=repeats, steps=eval_steps, **sampling(true_cfg))
        results[f"steps{eval_steps}_true_cfg{true_cfg}"] = acc
        log(f"classifier on model samples, {eval_steps} steps, true_cfg {true_cfg}: {acc}")
    best = max(true_cfgs, key=lambda g: results[f"steps{eval_steps}_true_cfg{g}"]["all"])
    title = f"shapes-qwenimage (true CFG {best:g})"
    sample_grid(pipe, args.samples_png, title=title, steps=eval_steps, **sampling(best))
    times["eval_s"] = time.time() - t
    info = {
        "command": " ".join(["python", *sys.argv]),
        "model_config": asdict(cfg),
        "train_config": asdict(tc),
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae.vae))
        },
        "vae": "AutoencoderKLQwenImage trained here (train_vae); latents_mean / latents_std of its latent pool",
        "latents_mean": pipe.vae.config.latents_mean,
        "latents_std": pipe.vae.config.latents_std,
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "sample_accuracy": results,
        "best_true_cfg": best,
        "torch": torch.__version__,
    }
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    del pipe
    replace_dir(tmp, args.out)
    size = folder_size(args.out) / 1e6
    log(f"wrote {args.out} ({size:.2f} MB) and {args.samples_png}; {info['wall_time_s']}")
    if args.smoke:
        shutil.rmtree(REPO / "outputs" / "qwenimage_train_smoke")


if __name__ == "__main__":
    main()
