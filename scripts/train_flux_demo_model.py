#!/usr/bin/env python
"""Train the shipped tiny FLUX.1-architecture shapes model (``models/shapes-flux``) from scratch.

    python scripts/train_flux_demo_model.py            # full run, ~35 CPU minutes on one core
    python scripts/train_flux_demo_model.py --smoke    # seconds; writes to outputs/flux_train_smoke/

Rectified flow on the same procedural shapes as the SDXL demo model, in the latent space of the shipped
SDXL demo model's VAE, with the caption tokenizer for both text encoders (``demo/flux_model.py``). The
shipped attribute classifier scores its samples. Checkpoints go to --work-dir; rerunning resumes.
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
from diffusers import AutoencoderKL, FluxPipeline  # noqa: E402

from demo.evaluation import sample_accuracy, sample_grid  # noqa: E402
from demo.export import folder_size, replace_dir  # noqa: E402
from demo.flux_model import MAX_SEQUENCE_LENGTH, FluxDemoConfig, flux_pool, save_flux_dir, train_transformer  # noqa: E402
from demo.paths import CLASSIFIER_PATH, DEMO_MODEL_PATH, load_demo_classifier  # noqa: E402
from demo.tokenizer import save_tokenizer  # noqa: E402
from demo.training import Checkpointer, TrainConfig  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "models" / "shapes-flux")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "flux_train")
    parser.add_argument(
        "--samples-png", type=Path, default=REPO / "docs" / "images" / "demo_samples_flux.png"
    )
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = FluxDemoConfig()
    tc = TrainConfig(seed=args.seed, unet_steps=4000, unet_lr=5e-4, cond_dropout=0.1)
    eval_steps, guidances, repeats = 20, (1.0, 3.0), 2
    if args.smoke:
        tc = TrainConfig(seed=args.seed, unet_steps=3, latent_pool=128, checkpoint_every=2)
        root = REPO / "outputs" / "flux_train_smoke"
        args.out, args.work_dir, args.samples_png = root / "shapes-flux", root / "work", root / "samples.png"
        eval_steps, guidances, repeats = 2, (1.0,), 1
    ckpt = Checkpointer(args.work_dir)
    log(f"config {asdict(cfg)}")
    log(f"train {asdict(tc)}")
    times = {}
    start = time.time()
    vae = AutoencoderKL.from_pretrained(DEMO_MODEL_PATH / "vae", local_files_only=True).float().eval()
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
    classifier = load_demo_classifier(CLASSIFIER_PATH)
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
        title=f"shapes-flux (true CFG {best:g})",
        steps=eval_steps,
        guidance=1.0,
        **extra,
    )
    times["eval_s"] = time.time() - t
    info = {
        "command": " ".join(["python", *sys.argv]),
        "model_config": asdict(cfg),
        "train_config": asdict(tc),
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("transformer", transformer), ("text_encoder", clip), ("text_encoder_2", t5))
        },
        "vae": "the shipped shapes-sdxl VAE, scaling_factor refitted",
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
