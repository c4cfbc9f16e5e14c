"""A tiny Qwen-Image-architecture model for the shapes data: the components and their training.

Same module types and wiring as Qwen-Image (a ``QwenImageTransformer2DModel``: double-stream MMDiT blocks
with joint attention over text and image tokens, adaLN from the timestep alone, 2x2-packed latents, 3-axis
rotary positions; a Qwen2.5-VL text encoder whose last hidden states of the chat-templated prompt, less the
template's first 34 tokens, are the text stream; the Qwen-Image VAE ``AutoencoderKLQwenImage``, a causal 3D
autoencoder run on one frame; ``FlowMatchEulerDiscreteScheduler``), shrunk to train on a CPU in minutes, so
``QwenImagePipeline`` runs it unchanged.

Unlike ``shapes-flux`` and ``shapes-zimage`` it cannot reuse the shipped SDXL VAE: QwenImagePipeline
decodes with ``AutoencoderKLQwenImage`` (5D latents, ``latents_mean`` / ``latents_std``, its scale factor
read off ``temperal_downsample``), so a small one is trained here first, on the same shapes images, as the
SDXL demo model's VAE was (``demo.training.train_vae``). The transformer learns its latents normalised per
channel, ``(z - latents_mean) / latents_std``, the statistics QwenImagePipeline undoes before decoding.

The tokenizer is a byte-level BPE ``Qwen2Tokenizer`` written here (``demo.tokenizer.save_qwen_tokenizer``)
that spells the pipeline's template words and every caption word whole: the template's system part and
``<|im_start|>user\\n`` are 34 tokens, as with Qwen's own tokenizer, which is what the pipeline drops
(``prompt_template_encode_start_idx``). Qwen-Image samples with "true CFG" only given a negative prompt;
without one it runs unguided, as here by default (caption dropout trains the empty prompt for CFG).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .flux_model import pack
from .tokenizer import save_qwen_tokenizer
from .training import Checkpointer, TemplateIds, TrainConfig, train_flow

# QwenImagePipeline.prompt_template_encode and prompt_template_encode_start_idx
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
# The templated caption is at most 44 tokens (34 dropped); the pipeline pads a batch to its longest.
MAX_TOKENS = 48


@dataclass
class QwenImageDemoConfig:
    """Sizes of the tiny Qwen-Image; the defaults are the shipped ``models/shapes-qwenimage``."""

    layers: int = 4  # double-stream blocks
    heads: int = 4
    head_dim: int = 16  # inner width 64
    rope_axes: tuple[int, int, int] = (4, 6, 6)  # sums to head_dim
    text_hidden: int = 64  # Qwen2.5-VL's hidden size: the transformer's joint_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to text head_dim / 2
    vision_hidden: int = 16  # the (unused) vision tower, one block
    vae_base_dim: int = 16
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)  # two 2x downsamplings: 32 px -> 8x8 latents
    latent_channels: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(cfg: QwenImageDemoConfig) -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=cfg.vae_base_dim,
        z_dim=cfg.latent_channels,
        dim_mult=list(cfg.vae_dim_mult),
        num_res_blocks=1,
        temperal_downsample=[False] * (len(cfg.vae_dim_mult) - 1),  # its length is the scale factor's log2
        latents_mean=[0.0] * cfg.latent_channels,
        latents_std=[1.0] * cfg.latent_channels,
    )


class FrameVAE(nn.Module):
    """An ``AutoencoderKLQwenImage`` on (B, C, H, W) images as one-frame videos, with ``AutoencoderKL``'s
    ``encode(x).latent_dist`` / ``decode(z).sample``, so the demo's VAE trainer and latent pool take it."""

    def __init__(self, vae: AutoencoderKLQwenImage):
        super().__init__()
        self.vae = vae

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput:
        posterior = self.vae.encode(x.unsqueeze(2)).latent_dist
        params = torch.cat([posterior.mean, posterior.logvar], dim=1).squeeze(2)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(params))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=self.vae.decode(z.unsqueeze(2)).sample.squeeze(2))


@contextlib.contextmanager
def one_frame_convs():
    """Run the VAE's causal 3D convolutions on one-frame inputs as the 2D convolutions they are.

    On a single frame (no cached frames) ``QwenImageCausalConv3d`` pads the time axis with zeros before the
    frame, so only the last time slice of each kernel meets data: the output is a 2D convolution with
    ``weight[:, :, -1]`` (and the gradients of the other slices are zero). Training with this is the same
    computation at a third of the cost; the saved VAE is the unchanged ``AutoencoderKLQwenImage``.
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    plain = QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if cache_x is not None or x.shape[2] != 1:
            return plain(self, x, cache_x)
        out = F.conv2d(
            F.pad(x.squeeze(2), self._padding[:4]), self.weight[:, :, -1], self.bias, self.stride[1:]
        )
        return out.unsqueeze(2)

    QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        QwenImageCausalConv3d.forward = plain


def build_text_encoder(cfg: QwenImageDemoConfig, tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """A small Qwen2.5-VL for ``tokenizer``'s vocabulary (its vision tower one block, never used: no prompt
    holds an image placeholder)."""
    vocab_size = len(tokenizer)
    special = {
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_hidden * 2,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_kv_heads,
            "max_position_embeddings": 1024,
            "rope_scaling": {
                "mrope_section": list(cfg.mrope_section),
                "rope_type": "default",
                "type": "default",
            },
            "rope_theta": 1000000.0,
            "vocab_size": vocab_size,
            **special,
        },
        vision_config={
            "depth": 1,
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": cfg.vision_hidden,
            "num_heads": 2,
            "out_hidden_size": cfg.text_hidden,
        },
        hidden_size=cfg.text_hidden,
        vocab_size=vocab_size,
        **special,
        # out of the vocabulary: no prompt holds an image placeholder
        image_token_id=vocab_size + 1,
        video_token_id=vocab_size + 2,
        vision_start_token_id=vocab_size + 3,
        vision_end_token_id=vocab_size + 4,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_transformer(cfg: QwenImageDemoConfig) -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=cfg.latent_channels * 4,
        out_channels=cfg.latent_channels,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_hidden,
        guidance_embeds=False,
        axes_dims_rope=cfg.rope_axes,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fixed shift of 1 (the pipeline's image-size ``mu`` is then unused), as ``shapes-flux``."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def save_tokenizer(folder: Path):
    return save_qwen_tokenizer(folder, TEMPLATE)


def template_ids(tokenizer) -> TemplateIds:
    """Token ids and masks of prompts as QwenImagePipeline._get_qwen_prompt_embeds makes them."""
    return TemplateIds(tokenizer, TEMPLATE.format, MAX_TOKENS)


def encode(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What QwenImagePipeline.encode_prompt computes: the encoder's last hidden states after the template's
    first 34 tokens, zero-padded to the batch's longest prompt, and their mask."""
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    mask = mask[:, TEMPLATE_TOKENS:]
    longest = int(mask.sum(1).max())
    mask = mask[:, :longest]
    return hidden[:, TEMPLATE_TOKENS : TEMPLATE_TOKENS + longest] * mask[..., None], mask.long()


def predict(transformer, latents: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
    """The transformer's packed output (noise - x0) as QwenImagePipeline calls it (time = sigma)."""
    b, _, h, w = latents.shape
    return transformer(
        hidden_states=pack(latents),
        timestep=sigma,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=None if bool(mask.all()) else mask,
        img_shapes=[[(1, h // 2, w // 2)]] * b,
        return_dict=False,
    )[0]


def latent_stats(pool: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the latents the transformer learns (posterior samples: the spread of the
    means plus the posterior variance, so a channel the VAE left unused is not blown up): the VAE's
    ``latents_mean`` / ``latents_std``."""
    mean, std = pool["mean"].float(), pool["std"].float()
    variance = mean.var(dim=(0, 2, 3)) + std.pow(2).mean(dim=(0, 2, 3))
    return mean.mean(dim=(0, 2, 3)), variance.sqrt()


def train_transformer(
    cfg: QwenImageDemoConfig, tc: TrainConfig, tokenizer, pool: dict, ckpt: Checkpointer, log=print
):
    """Rectified flow (``demo.training.train_flow``) on per-channel normalised latents; the transformer
    predicts ``noise - x0``, the text encoder is trained jointly; dropped captions are the empty prompt, as
    QwenImagePipeline encodes ``negative_prompt=""``."""
    torch.manual_seed(tc.seed + 1)
    text_encoder = build_text_encoder(cfg, tokenizer)
    transformer = build_transformer(cfg)
    ids_of = template_ids(tokenizer)
    mean, std = latent_stats(pool)

    def step_loss(captions, x0, noise, t, xt):
        text, mask = encode(text_encoder, *ids_of(captions))
        return F.mse_loss(predict(transformer, xt, t, text, mask), pack(noise - x0))

    ema = train_flow(
        "qwenimage",
        {"transformer": transformer, "text_encoder": text_encoder},
        step_loss,
        tc,
        pool,
        ckpt,
        log,
        shift=mean.view(1, -1, 1, 1),
        scale=1.0 / std.view(1, -1, 1, 1),
    )
    return ema["transformer"], ema["text_encoder"]


def save_qwenimage_dir(
    out: Path, vae: AutoencoderKLQwenImage, transformer, text_encoder, tokenizer, pool: dict
) -> Path:
    """A ``QwenImagePipeline`` folder beside ``out`` (``demo.export.replace_dir`` moves it into place), fp16
    weights; the VAE's ``latents_mean`` / ``latents_std`` are the pool's."""
    from .export import to_fp16_files

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    mean, std = latent_stats(pool)
    vae.register_to_config(latents_mean=[float(x) for x in mean], latents_std=[float(x) for x in std])
    pipe = QwenImagePipeline(
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
    "TEMPLATE",
    "TEMPLATE_TOKENS",
    "FrameVAE",
    "QwenImageDemoConfig",
    "build_scheduler",
    "build_text_encoder",
    "build_transformer",
    "build_vae",
    "encode",
    "latent_stats",
    "predict",
    "save_qwenimage_dir",
    "save_tokenizer",
    "template_ids",
    "train_transformer",
]
