"""Training the demo model from scratch: VAE, then UNet + both text encoders, then the classifier.

Every random draw is keyed by (seed, stage, step), so a run resumed from a checkpoint continues
exactly as an uninterrupted one would. Single-threaded by design (the caller sets the thread count).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import DemoModelConfig, build_scheduler, build_text_encoders, build_unet, build_vae, time_ids
from .shapes import get_draw_style, make_dataset

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    """Steps, batch sizes and rates of every stage; the defaults train the shipped model."""

    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    latent_pool: int = 30000
    unet_steps: int = 2600
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 100
    min_snr_gamma: float = 5.0
    cond_dropout: float = 0.1  # share of captions replaced by "unconditional"
    empty_text_share: float = 0.3  # of those: encode "" (negative_prompt="") instead of SDXL's zeros
    ema_decay: float = 0.999
    explicit_style_prob: float = 0.3
    draw_style: str = "default"  # shapes.DRAW_STYLES: how the training images are drawn
    classifier_steps: int = 500
    classifier_pool: int = 20000
    checkpoint_every: int = 200


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the VAE's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Checkpointer:
    """One file per stage in `work_dir`, written atomically so a kill mid-save cannot corrupt it."""

    def __init__(self, work_dir: Path):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def load(self, name: str) -> dict | None:
        p = self.path(name)
        return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None

    def save(self, name: str, state: dict) -> None:
        tmp = self.path(name).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path(name))


# ---------------------------------------------------------------- VAE


def train_vae(
    cfg: DemoModelConfig,
    tc: TrainConfig,
    ckpt: Checkpointer,
    log: Log = print,
    vae: torch.nn.Module | None = None,
):
    """Pixel L1 + MSE with a light KL; fresh generator images every step.

    ``vae``: another autoencoder to train (built by the caller), with ``encode(x).latent_dist`` and
    ``decode(z).sample`` on (B, C, H, W) tensors; default: the demo model's ``AutoencoderKL``.
    """
    torch.manual_seed(tc.seed)
    vae = build_vae(cfg) if vae is None else vae
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr, weight_decay=0.0)
    start = 0
    state = ckpt.load("vae")
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"vae: resumed at step {start}")
    vae.train()
    t0 = time.time()
    for step in range(start, tc.vae_steps):
        _set_lr(opt, _lr(step, tc.vae_steps, tc.vae_lr, 50))
        images, _, _ = make_dataset(
            tc.vae_batch, seed=_key(tc.seed, 1, step), size=cfg.image_size, draw=get_draw_style(tc.draw_style)
        )
        x = _images_to_tensor(images)
        post = vae.encode(x).latent_dist
        gen = torch.Generator().manual_seed(_key(tc.seed, 2, step))
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean() + tc.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 50 == 0 or done == tc.vae_steps:
            log(
                f"vae step {done}/{tc.vae_steps} loss {loss.item():.4f} kl {kl.item():.2f} ({time.time() - t0:.0f}s)"
            )
        if done % tc.checkpoint_every == 0 or done == tc.vae_steps:
            ckpt.save("vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": done})
    return vae.eval()


def _key(seed: int, stage: int, step: int) -> int:
    """A distinct, reproducible 63-bit seed per (seed, stage, step)."""
    return int(np.random.SeedSequence([seed, stage, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@torch.no_grad()
def encode_pool(vae, cfg: DemoModelConfig, tc: TrainConfig, log: Log = print) -> dict[str, torch.Tensor]:
    """Encode a fixed pool of generator images once; the UNet samples from their posteriors."""
    images, _, labels = make_dataset(
        tc.latent_pool, seed=_key(tc.seed, 3, 0), size=cfg.image_size, draw=get_draw_style(tc.draw_style)
    )
    means, stds = [], []
    t0 = time.time()
    for i in range(0, len(images), 256):
        post = vae.encode(_images_to_tensor(images[i : i + 256])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scale = 1.0 / float(mean.std())
    log(
        f"encoded {len(images)} images in {time.time() - t0:.0f}s; latent mean {float(mean.mean()):.3f} "
        f"std {float(mean.std()):.3f} -> scaling_factor {scale:.4f}; posterior std {float(std.mean()):.4f}"
    )
    return {
        "mean": mean.half(),
        "std": std.half(),
        "scaling_factor": torch.tensor(scale),
        **{k: torch.from_numpy(v) for k, v in labels.items()},
    }


# ---------------------------------------------------------------- UNet + text encoders


def encode_text(te1, te2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly what StableDiffusionXLPipeline.encode_prompt computes: penultimate states + pooled projection."""
    h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(ids, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


class CaptionIds:
    """Token ids per caption, cached: the grammar only has a few hundred distinct captions."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self.cache.update(zip(missing, ids, strict=True))
        return torch.stack([self.cache[c] for c in captions])


class TemplateIds:
    """(token ids, attention mask) of prompts wrapped in a pipeline's template (``render``), padded to
    ``max_length``, cached per prompt: what a chat-template pipeline (Z-Image, Qwen-Image) tokenizes."""

    def __init__(self, tokenizer, render: Callable[[str], str], max_length: int):
        self.tokenizer, self.render, self.max_length = tokenizer, render, max_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            tokens = self.tokenizer(
                [self.render(p) for p in missing],
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            masks = tokens.attention_mask.bool()
            self.cache.update(zip(missing, zip(tokens.input_ids, masks, strict=True), strict=True))
        ids, masks = zip(*(self.cache[p] for p in prompts), strict=True)
        return torch.stack(ids), torch.stack(masks)


def _captions(
    labels: dict[str, torch.Tensor], idx: np.ndarray, rng: np.random.Generator, tc: TrainConfig
) -> list[str]:
    from .shapes import ATTRIBUTES, caption

    out = []
    for i in idx:
        attrs = {k: ATTRIBUTES[k][int(labels[k][i])] for k in ATTRIBUTES}
        out.append(
            caption(
                attrs["shape"], attrs["colour"], attrs["style"], bool(rng.random() < tc.explicit_style_prob)
            )
        )
    return out


def train_unet(
    cfg: DemoModelConfig, tc: TrainConfig, tokenizer, pool: dict, ckpt: Checkpointer, log: Log = print
):
    """Epsilon-prediction on SDXL's schedule with min-SNR weighting, text encoders trained jointly.

    Unconditional training matches how the pipeline calls the model: with no negative prompt SDXL
    feeds all-zero prompt and pooled embeddings (force_zeros_for_empty_prompt), so most dropped captions
    become zeros; the rest become the encoded empty string, so negative_prompt="" works too.
    """
    torch.manual_seed(tc.seed + 1)
    te1, te2 = build_text_encoders(cfg, tokenizer)
    unet = build_unet(cfg)
    modules = {"unet": unet, "te1": te1, "te2": te2}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.unet_lr, weight_decay=0.0)
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    start = 0
    state = ckpt.load("unet")
    if state is not None:
        for k, m in modules.items():
            m.load_state_dict(state[k])
            ema[k].load_state_dict(state["ema_" + k])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"unet: resumed at step {start}")

    alphas_cumprod = build_scheduler().alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    ids_of = CaptionIds(tokenizer)
    empty_ids = ids_of([""])
    scale = float(pool["scaling_factor"])
    n_pool = len(pool["mean"])
    add_time = time_ids(cfg, tc.unet_batch)
    ema_params = [p for k in modules for p in ema[k].parameters()]
    for m in modules.values():
        m.train()
    t0 = time.time()
    for step in range(start, tc.unet_steps):
        _set_lr(opt, _lr(step, tc.unet_steps, tc.unet_lr, tc.warmup))
        rng = np.random.default_rng(_key(tc.seed, 4, step))
        gen = torch.Generator().manual_seed(_key(tc.seed, 5, step))
        idx = rng.integers(0, n_pool, tc.unet_batch)
        captions = _captions(pool, idx, rng, tc)
        drop = rng.random(tc.unet_batch) < tc.cond_dropout
        as_empty = drop & (rng.random(tc.unet_batch) < tc.empty_text_share)
        as_zero = torch.from_numpy(drop & ~as_empty)

        ids = ids_of(captions)
        ids[torch.from_numpy(as_empty)] = empty_ids
        prompt_embeds, pooled = encode_text(te1, te2, ids)
        keep = (~as_zero).float()
        prompt_embeds = prompt_embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]

        i_t = torch.from_numpy(idx)
        mean, std = pool["mean"][i_t].float(), pool["std"][i_t].float()
        x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scale
        t = torch.randint(0, len(alphas_cumprod), (tc.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(
            xt, t, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time}
        ).sample
        weight = torch.clamp(snr[t], max=tc.min_snr_gamma) / snr[t]
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

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
                f"unet step {done}/{tc.unet_steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({time.time() - t0:.0f}s, {rate:.2f} it/s)"
            )
        if done % tc.checkpoint_every == 0 or done == tc.unet_steps:
            state = {k: m.state_dict() for k, m in modules.items()}
            state.update({"ema_" + k: m.state_dict() for k, m in ema.items()})
            ckpt.save("unet", {**state, "opt": opt.state_dict(), "step": done})
    return ema["unet"].eval(), ema["te1"].eval(), ema["te2"].eval()


# ---------------------------------------------------------------- rectified flow (FLUX, Z-Image, Qwen-Image)


def train_flow(
    name: str,
    modules: dict[str, torch.nn.Module],
    step_loss: Callable[[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    tc: TrainConfig,
    pool: dict,
    ckpt: Checkpointer,
    log: Log = print,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
) -> dict[str, torch.nn.Module]:
    """Rectified flow on the latent pool: x_t = (1 - t) x0 + t noise, logit-normal t (as FLUX / SD3 train).

    ``modules`` (denoiser and text encoders, trained jointly; checkpoint ``name``) are what ``step_loss(captions,
    x0, noise, t, x_t)`` runs to give the batch's loss (the model's own prediction target and conventions).
    Captions dropped for unconditional training (``tc.cond_dropout``) are the empty string, which the
    pipelines encode for an empty prompt. Latents are ``(sample - shift) * scale`` (default: no shift, the
    pool's ``scaling_factor``). AdamW with warmup and cosine decay, grad clip 1, EMA; every random draw is
    keyed by (seed, stage, step) so a resumed run continues exactly. Returns the EMA modules, in eval mode.
    """
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.unet_lr, weight_decay=0.0)
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    start = 0
    state = ckpt.load(name)
    if state is not None:
        for k, m in modules.items():
            m.load_state_dict(state[k])
            ema[k].load_state_dict(state["ema_" + k])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"{name}: resumed at step {start}")
    scale = float(pool["scaling_factor"]) if scale is None else scale
    ema_params = [p for k in modules for p in ema[k].parameters()]
    for m in modules.values():
        m.train()
    t0 = time.time()
    for step in range(start, tc.unet_steps):
        _set_lr(opt, _lr(step, tc.unet_steps, tc.unet_lr, tc.warmup))
        rng = np.random.default_rng(_key(tc.seed, 14, step))
        gen = torch.Generator().manual_seed(_key(tc.seed, 15, step))
        idx = rng.integers(0, len(pool["mean"]), tc.unet_batch)
        captions = _captions(pool, idx, rng, tc)
        drop = rng.random(tc.unet_batch) < tc.cond_dropout
        captions = ["" if dropped else c for c, dropped in zip(captions, drop, strict=True)]
        i_t = torch.from_numpy(idx)
        sample = pool["mean"][i_t].float() + pool["std"][i_t].float() * torch.randn(
            pool["mean"][i_t].shape, generator=gen
        )
        x0 = (sample if shift is None else sample - shift) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(tc.unet_batch, generator=gen))
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        loss = step_loss(captions, x0, noise, t, xt)
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
                f"{name} step {done}/{tc.unet_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s, {rate:.2f} it/s)"
            )
        if done % tc.checkpoint_every == 0 or done == tc.unet_steps:
            state = {k: m.state_dict() for k, m in modules.items()}
            state.update({"ema_" + k: m.state_dict() for k, m in ema.items()})
            ckpt.save(name, {**state, "opt": opt.state_dict(), "step": done})
    return {k: m.eval() for k, m in ema.items()}


def train_config_dict(tc: TrainConfig) -> dict:
    return asdict(tc)
