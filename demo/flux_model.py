"""A tiny FLUX.1-architecture model for the shapes data: the components and a rectified-flow trainer.

Same module types and wiring as FLUX.1 (a ``FluxTransformer2DModel`` with double-stream and single-stream
blocks and rotary position ids, a CLIP text encoder for the pooled vector and a T5 encoder for the token
sequence, 2x2-packed latents, ``FlowMatchEulerDiscreteScheduler``), shrunk to train on a CPU in minutes,
so ``FluxPipeline`` runs it unchanged. It reuses the shipped SDXL demo model's VAE (its latent space is
what the transformer learns) and the caption tokenizer for both encoders (FLUX's T5 tokenizer would
need a SentencePiece model; any tokenizer works for ``FluxPipeline``). Sampled with the pipeline's
``max_sequence_length=16``, the tokenizer's length.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .training import CaptionIds, Checkpointer, TrainConfig, encode_pool, train_flow

MAX_SEQUENCE_LENGTH = 16


@dataclass
class FluxDemoConfig:
    """Sizes of the tiny FLUX; the defaults are the shipped ``models/shapes-flux``."""

    double_blocks: int = 3
    single_blocks: int = 5
    heads: int = 5
    head_dim: int = 16  # inner width 80
    rope_axes: tuple[int, int, int] = (4, 6, 6)  # sums to head_dim
    clip_hidden: int = 32
    clip_layers: int = 3
    t5_dim: int = 64
    t5_layers: int = 2
    t5_heads: int = 2
    latent_channels: int = 4  # the shipped VAE's

    def to_dict(self) -> dict:
        return asdict(self)


def build_transformer(cfg: FluxDemoConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.latent_channels * 4,
        num_layers=cfg.double_blocks,
        num_single_layers=cfg.single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.t5_dim,
        pooled_projection_dim=cfg.clip_hidden,
        guidance_embeds=False,
        axes_dims_rope=cfg.rope_axes,
    )


def build_text_encoders(cfg: FluxDemoConfig, tokenizer) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.clip_hidden,
            intermediate_size=cfg.clip_hidden * 4,
            num_hidden_layers=cfg.clip_layers,
            num_attention_heads=max(1, cfg.clip_hidden // 16),
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.t5_dim,
            d_kv=cfg.t5_dim // cfg.t5_heads,
            d_ff=cfg.t5_dim * 2,
            num_layers=cfg.t5_layers,
            num_heads=cfg.t5_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    return clip, t5


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-schnell's flow-matching schedule (a fixed shift, no resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): FLUX's 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(height: int, width: int) -> torch.Tensor:
    """Rotary position ids of the packed latent tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def encode(clip, t5, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What FluxPipeline.encode_prompt computes: T5's last hidden state, CLIP's pooled output."""
    return t5(ids)[0], clip(ids).pooler_output


def train_transformer(
    cfg: FluxDemoConfig, tc: TrainConfig, tokenizer, pool: dict, ckpt: Checkpointer, log=print
):
    """Rectified flow (x_t = (1 - t) x0 + t noise, predict noise - x0), text encoders trained jointly
    (``demo.training.train_flow``).

    Unconditional training (caption dropout) encodes the empty string, as FluxPipeline would for an
    empty prompt; FLUX.1-schnell is sampled without guidance, so it is only regularisation here.
    """
    torch.manual_seed(tc.seed + 1)
    clip, t5 = build_text_encoders(cfg, tokenizer)
    transformer = build_transformer(cfg)
    ids_of = CaptionIds(tokenizer)
    size = pool["mean"].shape[-1]
    positions = image_ids(size, size)
    text_positions = torch.zeros(tokenizer.model_max_length, 3)

    def step_loss(captions, x0, noise, t, xt):
        text, pooled = encode(clip, t5, ids_of(captions))
        pred = transformer(
            hidden_states=pack(xt),
            timestep=t,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=text_positions,
            img_ids=positions,
            return_dict=False,
        )[0]
        return F.mse_loss(pred, pack(noise - x0))

    ema = train_flow(
        "flux", {"transformer": transformer, "clip": clip, "t5": t5}, step_loss, tc, pool, ckpt, log
    )
    return ema["transformer"], ema["clip"], ema["t5"]


def save_flux_dir(out: Path, vae: AutoencoderKL, transformer, clip, t5, tokenizer, scaling: float) -> Path:
    """A ``FluxPipeline`` folder beside ``out`` (``demo.export.replace_dir`` moves it into place), fp16 weights."""
    import os
    import shutil

    from .export import to_fp16_files
    from .tokenizer import save_tokenizer

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae = copy.deepcopy(vae)
    # FluxPipeline decodes latents / scaling_factor + shift_factor; the transformer learned latents * scaling
    vae.register_to_config(shift_factor=0.0, scaling_factor=scaling)
    pipe = FluxPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        save_tokenizer(tmp / sub, tokenizer.model_max_length)
    to_fp16_files(tmp)
    return tmp


def flux_pool(vae, image_size: int, tc: TrainConfig, log=print) -> dict:
    """The latent pool, encoded with the given (shipped) VAE."""
    from .model import DemoModelConfig

    return encode_pool(vae, DemoModelConfig(image_size=image_size), tc, log)


__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "FluxDemoConfig",
    "build_scheduler",
    "build_text_encoders",
    "build_transformer",
    "encode",
    "flux_pool",
    "image_ids",
    "pack",
    "save_flux_dir",
    "train_transformer",
]
