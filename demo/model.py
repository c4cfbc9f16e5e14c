"""The demo model's components: SDXL's architecture, shrunk to train on a CPU in minutes.

Same module types and wiring as SDXL (two CLIP text encoders whose penultimate hidden states are
concatenated for cross-attention, a pooled + projected embedding from the second one, "text_time" added
conditioning, GroupNorm ResNets and LayerNorm transformer blocks, an AutoencoderKL), so
`StableDiffusionXLPipeline` runs it unchanged and ACT hooks see the same kinds of `*norm*` modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .shapes import IMAGE_SIZE


@dataclass
class DemoModelConfig:
    """Sizes of every component; the defaults are the shipped model."""

    image_size: int = IMAGE_SIZE
    # text encoders (te1 = CLIP-L's role, te2 = OpenCLIP-bigG's role)
    te1_hidden: int = 32
    te2_hidden: int = 64
    te_layers: int = 3  # SDXL reads hidden_states[-2], so >= 3 keeps a live layer past the embedding
    te2_projection: int = 32
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_heads: tuple[int, ...] = (1, 2, 4)
    unet_transformer_layers: tuple[int, ...] = (1, 1, 1)
    unet_layers_per_block: int = 1
    unet_groups: int = 16
    time_embed_dim: int = 16  # SDXL: addition_time_embed_dim (256 there)
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_groups: int = 8
    latent_channels: int = 4

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    def to_dict(self) -> dict:
        return asdict(self)


def text_encoder_config(cfg: DemoModelConfig, tokenizer: CLIPTokenizer, second: bool) -> CLIPTextConfig:
    """A tiny CLIP text config whose special token ids match our tokenizer (pooling finds EOS by id)."""
    hidden = cfg.te2_hidden if second else cfg.te1_hidden
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=cfg.te_layers,
        num_attention_heads=max(1, hidden // 16),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=cfg.te2_projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoders(
    cfg: DemoModelConfig, tokenizer: CLIPTokenizer
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    te1 = CLIPTextModel(text_encoder_config(cfg, tokenizer, second=False))
    te2 = CLIPTextModelWithProjection(text_encoder_config(cfg, tokenizer, second=True))
    return te1, te2


def build_unet(cfg: DemoModelConfig) -> UNet2DConditionModel:
    """SDXL's block layout (no attention at the top level, cross-attention below) at toy width."""
    n = len(cfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        transformer_layers_per_block=cfg.unet_transformer_layers,
        attention_head_dim=cfg.unet_heads,  # diffusers' SD naming: this is the number of heads
        cross_attention_dim=cfg.te1_hidden + cfg.te2_hidden,
        norm_num_groups=cfg.unet_groups,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.time_embed_dim,
        projection_class_embeddings_input_dim=cfg.time_embed_dim * 6 + cfg.te2_projection,
    )


def build_vae(cfg: DemoModelConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_groups,
        sample_size=cfg.image_size,
        scaling_factor=1.0,  # set from the trained encoder's latent std
        force_upcast=False,
        mid_block_add_attention=False,  # attention at 8x8 buys nothing here
    )


SAMPLERS = ("euler", "dpmpp_2m", "euler_a")


def build_scheduler(sampler: str = "euler"):
    """SDXL's noise schedule; "trailing" spacing so few-step sampling starts from pure noise.

    ``sampler``: "euler" (Euler discrete, the shipped models), "dpmpp_2m" (DPM-Solver++ 2M, the third model)
    or "euler_a" (Euler ancestral, stochastic: the fourth model). ACT's default must not depend on the sampler.
    """
    schedule = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
        "steps_offset": 1,
    }
    if sampler == "dpmpp_2m":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "euler_a":
        from diffusers import EulerAncestralDiscreteScheduler

        return EulerAncestralDiscreteScheduler(**schedule)
    if sampler != "euler":
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    return EulerDiscreteScheduler(**schedule)


def time_ids(cfg: DemoModelConfig, batch: int) -> torch.Tensor:
    """SDXL's micro-conditioning (original size, crop top-left, target size); constant for our data."""
    s = float(cfg.image_size)
    return torch.tensor([[s, s, 0.0, 0.0, s, s]]).repeat(batch, 1)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
