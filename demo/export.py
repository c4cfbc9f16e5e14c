"""Writing the trained components as one diffusers folder, atomically, with fp16 weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import build_scheduler
from .tokenizer import save_tokenizer


def to_fp16_files(folder: Path) -> None:
    """Halve every float32 tensor in every .safetensors file under `folder`, in place.

    Configs keep saying float32, so a plain `from_pretrained` upcasts on load; the repo copy stays small.
    """
    for f in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(str(f))
        halved = {k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in tensors.items()}
        save_file(halved, str(f), metadata={"format": "pt"})


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap `tmp` into place of `final` with renames, so readers never see a half-written folder."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def save_pipeline_dir(
    out: str | Path, vae, unet, te1, te2, tokenizer, fp16: bool = True, sampler: str = "euler"
) -> Path:
    """Save a `StableDiffusionXLPipeline` to a temp folder next to `out`; `replace_dir` moves it into place."""
    from diffusers import StableDiffusionXLPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=build_scheduler(sampler),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # also vocab.json + merges.txt, which older transformers read
        save_tokenizer(tmp / sub, tokenizer.model_max_length)
    if fp16:
        to_fp16_files(tmp)
    return tmp


def folder_size(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
