"""ComfyUI's own Lumina 2 classes, small: the NextDiT diffusion model, a diffusers transformer with its weights,
and the Gemma 2 CLIP.

* ``build_nextdit``: ComfyUI's Lumina 2 model (``supported_models.Lumina2`` -> ``model_base.Lumina2`` ->
  ``comfy.ldm.lumina.model.NextDiT``) from a small unet config, random weights, as a ModelPatcher.
* ``diffusers_twin``: the diffusers ``Lumina2Transformer2DModel`` with the NextDiT's weights, through diffusers'
  own converter of original (and ComfyUI) Lumina 2 checkpoints, ``convert_lumina2_to_diffusers``. ComfyUI
  0.3.64 has no diffusers-to-NextDiT key conversion (its ``convert_diffusers_mmdit`` knows FLUX, SD3, AuraFlow
  and PixArt), so the weights go the other way. That converter splits the fused ``qkv`` weight at
  Lumina-Image-2.0's widths (query 2304, key and value 768 each), so the tests' model has those widths
  (``NEXTDIT``: 3 heads of 768, 1 key-value head); its feed-forward is kept small by ``ffn_dim_multiplier``.
* ``build_lumina2_clip``: ComfyUI's Lumina 2 text encoder (``comfy.text_encoders.lumina2``: ``Gemma2_2B``
  through ComfyUI's own ``gemma2_2b_model_config`` option, tiny, random weights) with ComfyUI's Gemma tokenizer
  class (``Gemma2BTokenizer``, a SentencePiece model). Lumina 2 checkpoints carry their SentencePiece model in
  the file; the tests have none, so a small one is trained here, offline, with Gemma's special ids (pad 0,
  eos 1, bos 2, unk 3).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from comfy_support import init_weights, patcher_of, setup_comfy, tiny_comfy_clip

# NextDiT config (ComfyUI's unet_config) at the widths diffusers' converter can split: Lumina-Image-2.0's
# attention widths (3 heads of 768, 1 key-value head), everything else small (2 main blocks, 1 refiner each,
# a 64-wide feed-forward: 4 * 2304 * 2 / 3 * 0.01, to a multiple of 16). About 90M parameters.
TEXT_WIDTH = 32  # Gemma's hidden size: cap_feat_dim
NEXTDIT = {
    "image_model": "lumina2",
    "patch_size": 2,
    "in_channels": 4,
    "dim": 2304,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 3,
    "n_kv_heads": 1,
    "multiple_of": 16,
    "ffn_dim_multiplier": 0.01,
    "qk_norm": True,
    "cap_feat_dim": TEXT_WIDTH,
    "axes_dims": [256, 256, 256],
    "axes_lens": [300, 32, 32],
}
TINY_GEMMA2 = {
    "vocab_size": 256,
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 64,
    "num_hidden_layers": 3,  # ComfyUI reads Lumina 2's conditioning off the second-to-last layer
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
}


def build_nextdit(config: dict = NEXTDIT, seed: int = 0) -> Any:
    """A float32 CPU ModelPatcher of ComfyUI's Lumina 2 (NextDiT) with ``config``, random weights."""
    setup_comfy()
    import comfy.supported_models

    model_config = comfy.supported_models.Lumina2(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    # ComfyUI's Lumina 2 latent format (FLUX's) says 16 channels; the tiny VAE has 4. Empty latents (the Fit
    # node's, EmptyLatentImage's) take their channel count from here.
    base.latent_format.latent_channels = config["in_channels"]
    init_weights(base.diffusion_model, seed)
    return patcher_of(base)


def diffusers_twin(patcher: Any, config: dict = NEXTDIT) -> torch.nn.Module:
    """The diffusers Lumina2Transformer2DModel with the NextDiT's weights (diffusers' own key conversion)."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    state = {
        key: value.detach().to(torch.float32, copy=True)
        for key, value in patcher.model.diffusion_model.state_dict().items()
    }
    transformer = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        hidden_size=config["dim"],
        num_layers=config["n_layers"],
        num_refiner_layers=config["n_refiner_layers"],
        num_attention_heads=config["n_heads"],
        num_kv_heads=config["n_kv_heads"],
        multiple_of=config["multiple_of"],
        ffn_dim_multiplier=config.get("ffn_dim_multiplier"),
        axes_dim_rope=tuple(config["axes_dims"]),
        axes_lens=tuple(config["axes_lens"]),
        cap_feat_dim=config["cap_feat_dim"],
    )
    missing, unexpected = transformer.load_state_dict(convert_lumina2_to_diffusers(state), strict=True)
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return transformer.eval()


def spiece_model() -> bytes:
    """A small SentencePiece model with Gemma's special ids, trained offline on a few lines."""
    import sentencepiece

    lines = [
        "a red circle number 1, a blue square, striped, number 2",
        "a green triangle with dots, an outlined star, a yellow photo of a cat",
        "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
    ] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=TINY_GEMMA2["vocab_size"],
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def build_lumina2_clip(seed: int = 0) -> Any:
    """ComfyUI's Lumina 2 CLIP (Gemma 2, ``comfy.text_encoders.lumina2``) at tiny widths, random weights, with
    ComfyUI's Gemma tokenizer class on a small SentencePiece model."""
    setup_comfy()
    import comfy.text_encoders.lumina2 as lumina2

    return tiny_comfy_clip(
        lumina2.LuminaTokenizer,
        lumina2.te(),
        seed,
        tokenizer_data={"spiece_model": torch.ByteTensor(list(spiece_model()))},
        gemma2_2b_model_config=dict(TINY_GEMMA2),
    )


def conditioning(clip: Any, prompt: str) -> list:
    """A prompt's conditioning as CLIPTextEncode makes it (with the attention mask NextDiT reads its token count
    from)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def sample(
    model: Any, clip: Any, prompt: str, seed: int = 0, steps: int = 3, cfg: float = 4.0
) -> torch.Tensor:
    """KSampler (``comfy.sample.sample``, euler / normal) on an 8x8 latent with CLIPTextEncode's conditioning
    of ``prompt`` and of the empty negative; the denoised latent, float32 on the CPU."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros((1, 4, 8, 8)))
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        "euler",
        "normal",
        conditioning(clip, prompt),
        conditioning(clip, ""),
        latent,
        denoise=1.0,
        disable_pbar=True,
        seed=seed,
    )
    return out.detach().to("cpu", torch.float32)
