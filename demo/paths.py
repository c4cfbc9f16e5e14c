"""Where the shipped demo model and classifier live, and how to load them offline."""

from __future__ import annotations

from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_PATH = REPO_ROOT / "models" / "shapes-sdxl"
CLASSIFIER_PATH = REPO_ROOT / "models" / "shapes-classifier"

# Pipeline call settings that give clean samples from the shipped model (measured, see docs/demo_model.md).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0
DEFAULT_SIZE = 32

_MISSING = "{what} not found at {path}; run `python scripts/train_demo_model.py` to train it (about 45 CPU minutes on one core)."


def load_demo_pipeline(dtype: torch.dtype = torch.float32, path: str | Path = DEMO_MODEL_PATH):
    """A shipped shapes model as its diffusers pipeline, loaded from disk only (never the network).

    The pipeline class is the folder's own (``model_index.json``: ``StableDiffusionXLPipeline`` for the SDXL
    models, ``FluxPipeline``, ``ZImagePipeline``, ``QwenImagePipeline``; SDXL's without the watermarker).
    Weights are stored as fp16 to keep the repo small; they are upcast to `dtype` on load.
    """
    import inspect
    import json

    import diffusers

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(_MISSING.format(what="demo model", path=path))
    pipeline = getattr(diffusers, json.loads((path / "model_index.json").read_text())["_class_name"])
    options = (
        {"add_watermarker": False} if "add_watermarker" in inspect.signature(pipeline).parameters else {}
    )
    pipe = pipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_demo_classifier(path: str | Path = CLASSIFIER_PATH):
    """The shipped attribute classifier (shape / colour / style heads), eval mode."""
    from .classifier import load_classifier

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(_MISSING.format(what="demo classifier", path=path))
    return load_classifier(path)
