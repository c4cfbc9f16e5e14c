"""A tiny Stable Diffusion XL pipeline built offline from configs (random weights, generated tokenizer).

Shaped like diffusers' own SDXL test dummies, with a character-level CLIP tokenizer written here so
nothing is downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_LENGTH = 32


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer with a character vocabulary (empty merges), saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.!-'")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def text_config(vocab_size: int, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def finish_tiny_pipeline(pipe: Any, folder: Path | None = None) -> Any:
    """``pipe`` ready for the tests: its models in eval mode (built from configs, they start in training
    mode: T5's dropout would be live), saved to ``folder`` as a diffusers folder when one is given, float32."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    if folder is not None:
        pipe.save_pretrained(str(folder))
    return pipe.to(torch.float32)


def tiny_vae(**config) -> AutoencoderKL:
    """The tests' 4-channel, 2-level VAE (every tiny pipeline's); ``config`` adds to it (e.g. FLUX's shift)."""
    return AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def build_tiny_sdxl(folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """Build, save to ``folder`` (a normal diffusers folder) and return a tiny SDXL pipeline."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    tokenizer = write_tokenizer(folder / "tokenizer")
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2", pad_token="!")
    text_encoder = CLIPTextModel(text_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(len(tokenizer_2)))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(folder))
    return pipe.to(torch.float32)
