"""A tiny Z-Image-architecture model for the shapes data: the components and its rectified-flow training.

Same module types and wiring as Z-Image (a ``ZImageTransformer2DModel``: single-stream DiT, noise and
context refiner blocks, one joint ``[image; caption]`` sequence per row, adaLN from the timestep alone, 2x2
patches; a Qwen3 text encoder whose second-to-last hidden states of the chat-templated prompt are the
caption; ``FlowMatchEulerDiscreteScheduler``), shrunk to train on a CPU in minutes, so ``ZImagePipeline``
runs it unchanged. Like ``shapes-flux`` it learns the latent space of the shipped SDXL demo model's VAE
(``AutoencoderKL``, Z-Image's VAE class). The tokenizer is a byte-level BPE ``Qwen2Tokenizer`` (Qwen3's
class) written here, with Qwen3's chat template, that spells every caption word whole
(``demo.tokenizer.save_qwen_tokenizer``).

Conventions read off ``ZImagePipeline``: the transformer gets ``1 - sigma`` as its time and its output is
negated before the scheduler step, so it predicts ``x0 - noise``; latents are ``(z - shift_factor) *
scaling_factor``; with ``guidance_scale > 0`` it guides ``cond + g (cond - uncond)`` with the empty prompt
as uncond (caption dropout trains that), with 0 it runs unguided (as Z-Image-Turbo).
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from .tokenizer import QWEN3_CHAT_TEMPLATE, save_qwen_tokenizer
from .training import Checkpointer, TemplateIds, TrainConfig, train_flow

# The templated caption is at most 14 tokens; the pipeline drops the padding, so any length above works.
MAX_SEQUENCE_LENGTH = 32


@dataclass
class ZImageDemoConfig:
    """Sizes of the tiny Z-Image; the defaults are the shipped ``models/shapes-zimage``."""

    dim: int = 64
    layers: int = 4  # main (joint) blocks
    refiner_layers: int = 1  # noise refiner and context refiner blocks each
    heads: int = 4  # head_dim 16
    rope_axes: tuple[int, int, int] = (4, 6, 6)  # sums to head_dim
    text_hidden: int = 64  # Qwen3's hidden size: the transformer's cap_feat_dim
    text_layers: int = 3  # the last one is dead (hidden_states[-2]), as in Z-Image
    text_heads: int = 4
    text_kv_heads: int = 2
    latent_channels: int = 4  # the shipped VAE's

    def to_dict(self) -> dict:
        return asdict(self)


def build_transformer(cfg: ZImageDemoConfig) -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=cfg.latent_channels,
        dim=cfg.dim,
        n_layers=cfg.layers,
        n_refiner_layers=cfg.refiner_layers,
        n_heads=cfg.heads,
        n_kv_heads=cfg.heads,
        cap_feat_dim=cfg.text_hidden,
        axes_dims=list(cfg.rope_axes),
        axes_lens=[1024, 64, 64],
    )


def build_text_encoder(cfg: ZImageDemoConfig, tokenizer) -> Qwen3Model:
    return Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads,
            head_dim=cfg.text_hidden // cfg.text_heads,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fixed shift of 1 (the pipeline's image-size ``mu`` is then unused), as ``shapes-flux``."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def save_tokenizer(folder: Path):
    """The caption tokenizer with Qwen3's chat template (what ZImagePipeline applies to every prompt)."""
    text = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"  # the template's words, spelled whole
    return save_qwen_tokenizer(folder, text, QWEN3_CHAT_TEMPLATE)


def template_ids(tokenizer) -> TemplateIds:
    """Token ids and masks of prompts as ZImagePipeline._encode_prompt makes them (chat template, padding)."""

    def render(prompt: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )

    return TemplateIds(tokenizer, render, MAX_SEQUENCE_LENGTH)


def encode(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """What ZImagePipeline._encode_prompt computes: Qwen3's second-to-last hidden states of the real tokens."""
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(len(hidden))]


def predict(
    transformer, latents: torch.Tensor, sigma: torch.Tensor, captions: list[torch.Tensor]
) -> torch.Tensor:
    """The transformer's (B, C, H, W) output as ZImagePipeline calls it: one (C, 1, H, W) latent per row and
    time ``1 - sigma``."""
    out = transformer(list(latents.unsqueeze(2).unbind(0)), 1 - sigma, captions, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def train_transformer(
    cfg: ZImageDemoConfig, tc: TrainConfig, tokenizer, pool: dict, ckpt: Checkpointer, log=print
):
    """Rectified flow (``demo.training.train_flow``); the transformer predicts ``x0 - noise`` (the pipeline
    negates it), the text encoder is trained jointly; dropped captions are the empty prompt, as
    ZImagePipeline encodes its default negative prompt."""
    torch.manual_seed(tc.seed + 1)
    text_encoder = build_text_encoder(cfg, tokenizer)
    transformer = build_transformer(cfg)
    ids_of = template_ids(tokenizer)

    def step_loss(captions, x0, noise, t, xt):
        ids, mask = ids_of(captions)
        return F.mse_loss(predict(transformer, xt, t, encode(text_encoder, ids, mask)), x0 - noise)

    ema = train_flow(
        "zimage", {"transformer": transformer, "text_encoder": text_encoder}, step_loss, tc, pool, ckpt, log
    )
    return ema["transformer"], ema["text_encoder"]


def save_zimage_dir(
    out: Path, vae: AutoencoderKL, transformer, text_encoder, tokenizer, scaling: float
) -> Path:
    """A ``ZImagePipeline`` folder beside ``out`` (``demo.export.replace_dir`` moves it into place), fp16 weights."""
    from .export import to_fp16_files

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae = copy.deepcopy(vae)
    # ZImagePipeline decodes latents / scaling_factor + shift_factor; the transformer learned latents * scaling
    vae.register_to_config(shift_factor=0.0, scaling_factor=scaling)
    pipe = ZImagePipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    to_fp16_files(tmp)
    return tmp


__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "ZImageDemoConfig",
    "build_scheduler",
    "build_text_encoder",
    "build_transformer",
    "encode",
    "predict",
    "save_tokenizer",
    "save_zimage_dir",
    "template_ids",
    "train_transformer",
]
