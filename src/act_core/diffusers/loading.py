"""Load an ACT-enabled diffusers pipeline from a local folder, a single-file checkpoint or the HF cache.

Everything here is local-only: a missing model never triggers a download (diffusers' single-file
loader would otherwise fall back to fetching configs from the hub even with ``local_files_only``).
Each failure says what is missing and how to get it, because "model not found" is the most common
first-run error of a command-line tool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ACTError
from ..families import FAMILIES
from .factory import act_pipeline

SUPPORTED_PIPELINES = tuple(
    name for family in FAMILIES.values() if "diffusers" in family.hosts for name in family.diffusers_pipelines
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# diffusers' single-file model types -> the pipeline class that ACT supports for them.
_SINGLE_FILE_TYPES = {
    "xl_base": "StableDiffusionXLPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline",
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
}
_LDM_UNET_PREFIX = "model.diffusion_model."


class ACTModelLoadError(ACTError, OSError):
    """A model that cannot be loaded locally; the message says what is missing and the fix."""


def load_pipeline(
    model: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    *,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
    variant: str | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """An ACT-enabled SDXL, SD 1.5, FLUX.1 or SD3 pipeline (``act_pipeline``) from local files only.

    ``model`` is a diffusers folder (with ``model_index.json``), a single-file checkpoint
    (``.safetensors``; pickled ``.ckpt`` only with ``allow_pickle=True``), or a hub id already in the
    Hugging Face cache (``cache_dir`` overrides the cache location). ``config`` is a local diffusers
    folder (or cached hub id) with the component configs a single-file checkpoint needs.
    """
    path = Path(os.path.expanduser(str(model)))
    if path.is_dir():
        pipe = _from_folder(path, dtype, variant)
    elif path.is_file():
        pipe = _from_single_file(path, dtype, config, allow_pickle, cache_dir)
    elif _looks_like_path(str(model)):
        raise ACTModelLoadError(
            f"Model not found: {str(model)!r} is neither a folder nor a file. Pass a local diffusers folder "
            "(with model_index.json) or a .safetensors checkpoint."
        )
    else:
        folder = _cached_snapshot(str(model), cache_dir)
        pipe = _from_folder(folder, dtype, variant, name=str(model))
    pipe = act_pipeline(pipe)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _looks_like_path(text: str) -> bool:
    """A hub id is ``owner/name`` (or ``name``); anything else that does not exist is a missing path."""
    return (
        text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith(SINGLE_FILE_SUFFIXES)
        or (len(text) > 1 and text[1] == ":")  # Windows drive letter
    )


def _cached_snapshot(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    """The Hugging Face cache folder of ``repo_id``, looked up without any network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise ACTModelLoadError(
            f"No local copy of {repo_id!r}: it is not a folder or file here, and not in the Hugging Face "
            f"cache. Download it first with `hf download {repo_id}` on a machine with network "
            "(and copy the cache), or pass a local diffusers folder."
        ) from None
    except HFValidationError:
        raise ACTModelLoadError(
            f"Model not found: {repo_id!r} is not a folder or file here, nor a valid hub id (owner/name). "
            "Pass a local diffusers folder or a .safetensors checkpoint."
        ) from None


def _pipeline_class(name: str, what: str) -> type:
    import diffusers

    if name not in SUPPORTED_PIPELINES:
        raise ACTModelLoadError(
            f"{what} is a {name or 'unknown pipeline'}; ACT's diffusers integration supports "
            f"{', '.join(SUPPORTED_PIPELINES)} (as a diffusers folder; SDXL and SD 1.x/2.x also as single files). "
            "Use one of those models."
        )
    return getattr(diffusers, name)


def _from_folder(folder: Path, dtype: torch.dtype, variant: str | None, name: str | None = None) -> Any:
    what = name or str(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ACTModelLoadError(
            f"{what} is a folder without model_index.json, so it is not a diffusers pipeline folder. "
            "Pass the pipeline's top folder (the one holding model_index.json), or a .safetensors checkpoint."
        )
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as error:
        raise ACTModelLoadError(
            f"Cannot read {index}: {error}. Re-download or re-save the pipeline."
        ) from None
    cls = _pipeline_class(class_name, what)
    try:
        return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True, variant=variant)
    except (OSError, ValueError) as error:
        raise ACTModelLoadError(
            f"Cannot load the pipeline in {what}: {_first_line(error)}. The folder is incomplete (e.g. only "
            "configs were cached, or weights exist only as another variant: try variant='fp16'); "
            "re-download the model."
        ) from None


def _checkpoint_keys(path: Path) -> dict[str, torch.Tensor]:
    """Keys of a safetensors checkpoint as meta tensors with the right shapes (nothing is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable itself
            return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in names}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ACTModelLoadError(
            f"Cannot read {path.name} as safetensors ({type(error).__name__}: {error}); the file is "
            "corrupted or not a safetensors file."
        ) from None


def _from_single_file(
    path: Path,
    dtype: torch.dtype,
    config: str | os.PathLike | None,
    allow_pickle: bool,
    cache_dir: str | os.PathLike | None,
) -> Any:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ACTModelLoadError(
            f"Refusing to load {path.name}: {suffix} checkpoints are Python pickles, which can run arbitrary "
            "code when loaded (torch's restricted loader has had bypasses). Use a .safetensors version of "
            "the model, or pass allow_pickle=True (CLI: --allow-pickle) only if you trust the file."
        )
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ACTModelLoadError(
            f"{path.name} is not a model checkpoint (expected .safetensors, or a diffusers folder)."
        )
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, infer_diffusers_model_type

    if suffix == ".safetensors":
        keys = _checkpoint_keys(path)
        if not any(key.startswith(_LDM_UNET_PREFIX) for key in keys):
            raise ACTModelLoadError(
                f"{path.name} has no {_LDM_UNET_PREFIX}* weights, so it is not a full Stable Diffusion "
                "checkpoint (a LoRA, an ACT map, or a UNet-only file?). Pass a full SDXL/SD checkpoint or a "
                "diffusers folder."
            )
        model_type = infer_diffusers_model_type(keys)
        class_name = _SINGLE_FILE_TYPES.get(model_type, model_type)
        default_config = fetch_diffusers_config(keys)["pretrained_model_name_or_path"]
    else:  # a trusted pickle: we cannot look inside without unpickling it, assume SDXL unless config says
        class_name, default_config = "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"
    if config is not None:
        config_path = Path(os.path.expanduser(str(config)))
        config_folder = config_path if config_path.is_dir() else _cached_config(str(config), cache_dir, path)
        try:
            class_name = json.loads((config_folder / "model_index.json").read_text()).get("_class_name", "")
        except (OSError, ValueError):
            raise ACTModelLoadError(
                f"Config {config} has no readable model_index.json: pass a diffusers pipeline folder."
            ) from None
    else:
        config_folder = _cached_config(default_config, cache_dir, path)
    cls = _pipeline_class(class_name, path.name)
    require_accelerate(path)
    try:
        pipe = cls.from_single_file(str(path), config=str(config_folder), dtype=dtype, local_files_only=True)
    except Exception as error:  # diffusers raises many types here (SingleFileComponentError, KeyError, ...)
        raise ACTModelLoadError(
            f"Cannot load single-file checkpoint {path.name} with the configs in {config_folder} "
            f"({type(error).__name__}: {_first_line(error)}). Convert it to a diffusers folder, or pass a "
            "config folder of the same architecture."
        ) from None
    _check_all_weights_loaded(pipe, path, config_folder)
    return pipe


def require_accelerate(path: Path) -> None:
    """Single files need accelerate: without it diffusers fills weights the checkpoint lacks with random
    values, silently, where with it they stay on the meta device and ``_check_all_weights_loaded`` sees them."""
    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ACTModelLoadError(
            f"Loading the single-file checkpoint {path.name} needs the accelerate package (pip install "
            "accelerate): without it, weights the file does not hold would silently be random. Install it, or "
            "convert the checkpoint to a diffusers folder."
        )


def _check_all_weights_loaded(pipe: Any, path: Path, config_folder: Path) -> None:
    """Refuse a pipeline in which diffusers left weights unloaded (on the meta device).

    diffusers' single-file loader can do that without an error when the checkpoint and the configs
    disagree, e.g. two text encoders of equal width that it cannot tell apart.
    """
    for part, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        missing = [name for name, tensor in component.state_dict().items() if tensor.is_meta]
        if missing:
            raise ACTModelLoadError(
                f"Single-file checkpoint {path.name} did not fill {len(missing)} weights of {part} (e.g. "
                f"{missing[0]}) with the configs in {config_folder}: the checkpoint and the configs disagree. "
                "Pass a config folder of the same architecture (--config), or convert the checkpoint to a "
                "diffusers folder."
            )


def _cached_config(repo_id: str, cache_dir: str | os.PathLike | None, checkpoint: Path) -> Path:
    """The cached diffusers configs a single-file checkpoint needs; never downloads them."""
    try:
        return _cached_snapshot(repo_id, cache_dir)
    except ACTModelLoadError:
        raise ACTModelLoadError(
            f"Loading single-file checkpoint {checkpoint.name} needs the diffusers configs of {repo_id!r}, "
            "which are not in the Hugging Face cache (this tool never downloads). Either pass a local "
            f"diffusers folder of the same architecture as config (CLI: --config DIR), or run "
            f"`hf download {repo_id} --include '*.json' '*.txt'` on a machine with network "
            "and copy the cache here; or use a diffusers folder instead of the single file."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__
