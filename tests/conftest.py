import sys
from pathlib import Path

import pytest
import torch

# Tests import their helpers as a plain module; the repo root is the ComfyUI package, not on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
# One thread: the tiny models run faster on one than on two busy cores (see act_core.cli.choose_threads).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline (random weights, generated tokenizer) as a diffusers folder, built once per run."""
    from tiny_sdxl import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sdxl_dir):
    """An ACT pipeline over the tiny SDXL; tests that enable or fuse a map disable it again."""
    from diffusers import StableDiffusionXLPipeline

    from act_core.diffusers import act_pipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    base.set_progress_bar_config(disable=True)
    return act_pipeline(base)
