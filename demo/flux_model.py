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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .shapes import ATTRIBUTES, caption
from .training import CaptionIds, Checkpointer, TrainConfig, _key, _lr, _set_lr, encode_pool

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
    """Rectified flow (x_t = (1 - t) x0 + t noise, predict noise - x0), text encoders trained jointly.

    Unconditional training (caption dropout) encodes the empty string, as FluxPipeline would for an
    empty prompt; FLUX.1-schnell is sampled without guidance, so it is only regularisation here.
    """
    torch.manual_seed(tc.seed + 1)
    clip, t5 = build_text_encoders(cfg, tokenizer)
    transformer = build_transformer(cfg)
    modules = {"transformer": transformer, "clip": clip, "t5": t5}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.unet_lr, weight_decay=0.0)
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    start = 0
    state = ckpt.load("flux")
    if state is not None:
        for k, m in modules.items():
            m.load_state_dict(state[k])
            ema[k].load_state_dict(state["ema_" + k])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"flux: resumed at step {start}")
    ids_of = CaptionIds(tokenizer)
    empty_ids = ids_of([""])
    scale = float(pool["scaling_factor"])
    size = pool["mean"].shape[-1]
    positions = image_ids(size, size)
    text_positions = torch.zeros(tokenizer.model_max_length, 3)
    ema_params = [p for k in modules for p in ema[k].parameters()]
    for m in modules.values():
        m.train()
    t0 = time.time()
    for step in range(start, tc.unet_steps):
        _set_lr(opt, _lr(step, tc.unet_steps, tc.unet_lr, tc.warmup))
        rng = np.random.default_rng(_key(tc.seed, 14, step))
        gen = torch.Generator().manual_seed(_key(tc.seed, 15, step))
        idx = rng.integers(0, len(pool["mean"]), tc.unet_batch)
        captions = []
        for i in idx:
            attrs = {k: ATTRIBUTES[k][int(pool[k][i])] for k in ATTRIBUTES}
            captions.append(
                caption(
                    attrs["shape"],
                    attrs["colour"],
                    attrs["style"],
                    bool(rng.random() < tc.explicit_style_prob),
                )
            )
        ids = ids_of(captions)
        ids[torch.from_numpy(rng.random(tc.unet_batch) < tc.cond_dropout)] = empty_ids
        text, pooled = encode(clip, t5, ids)
        i_t = torch.from_numpy(idx)
        x0 = (
            pool["mean"][i_t].float()
            + pool["std"][i_t].float() * torch.randn(pool["mean"][i_t].shape, generator=gen)
        ) * scale
        noise = torch.randn(x0.shape, generator=gen)
        # logit-normal timesteps (as FLUX / SD3 train): more weight on the middle of the trajectory
        t = torch.sigmoid(torch.randn(tc.unet_batch, generator=gen))
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = transformer(
            hidden_states=pack(xt),
            timestep=t,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=text_positions,
            img_ids=positions,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, pack(noise - x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(tc.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        done = step + 1
        if step % 50 == 0 or done == tc.unet_steps:
            rate = (done - start) / max(1e-9, time.time() - t0)
            log(
                f"flux step {done}/{tc.unet_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s, {rate:.2f} it/s)"
            )
        if done % tc.checkpoint_every == 0 or done == tc.unet_steps:
            state = {k: m.state_dict() for k, m in modules.items()}
            state.update({"ema_" + k: m.state_dict() for k, m in ema.items()})
            ckpt.save("flux", {**state, "opt": opt.state_dict(), "step": done})
    return ema["transformer"].eval(), ema["clip"].eval(), ema["t5"].eval()


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
