"""Helpers for tests that run against a real ComfyUI source tree (in-process).

ComfyUI is not a pip package: point ``COMFYUI_PATH`` at a ComfyUI source tree (kept outside this repo)
and use a Python environment that has ComfyUI's requirements (``bash scripts/run_tests.sh`` sets both up from ../shared/comfyui).
Without it every test that uses these helpers is skipped with a clear reason.

Typical use in a test module::

    import comfy_support as cs

    pytestmark = cs.requires_comfyui          # cheap check at collection time

    def test_something(comfyui):              # session fixture: ComfyUI importable, CPU selected
        model, clip = cs.build_tiny_sdxl(seed=0)
        latent = cs.sample_tiny(model, clip, "a cat", seed=1)

Import gotchas (see docs/dev/comfyui_dev_notes.md): ComfyUI's source tree is put FIRST on ``sys.path``
because ComfyUI imports its own top-level modules ``nodes``, ``utils``, ``folder_paths`` ... and this
repo's ``nodes/`` package would otherwise shadow ComfyUI's ``nodes.py`` when pytest runs from the repo
root. Load this repo's node pack the way ComfyUI does (``load_node_pack``), never as ``import nodes``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import zlib
from pathlib import Path

import pytest

SKIP_REASON = (
    "set COMFYUI_PATH to a ComfyUI source tree to run the ComfyUI integration tests; "
    "bash scripts/run_tests.sh unpacks ../shared/comfyui and sets it"
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Sizes of the tiny SDXL. clip_l and clip_g get different widths on purpose so that a mix-up of the two
# encoders (or of their halves of the context) shows up as a shape error instead of passing silently.
TINY_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
TINY_CLIP_G = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 48,
}
TINY_UNET = {
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "num_head_channels": 16,
    "context_dim": TINY_CLIP_L["hidden_size"] + TINY_CLIP_G["hidden_size"],
    # SDXL's ADM vector: clip_g pooled (projected, width = hidden) + 6 size embeddings of 256.
    "adm_in_channels": TINY_CLIP_G["hidden_size"] + 6 * 256,
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "use_linear_in_transformer": True,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


# --------------------------------------------------------------------------------------------------
# Finding and importing ComfyUI
# --------------------------------------------------------------------------------------------------
def comfy_path() -> str | None:
    """The ComfyUI source tree from ``COMFYUI_PATH``, or None when unset/empty."""
    p = os.environ.get("COMFYUI_PATH", "").strip()
    return os.path.abspath(os.path.expanduser(p)) if p else None


def _put_comfy_first_on_path(path: str) -> None:
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    # A `nodes` already imported from elsewhere (this repo's nodes/ package) would break ComfyUI.
    mod = sys.modules.get("nodes")
    if mod is not None and os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) != path:
        raise RuntimeError(
            f"a module named 'nodes' was imported from {getattr(mod, '__file__', mod)!r} before ComfyUI; "
            "ComfyUI needs its own top-level 'nodes' module. Load the ACT node pack with "
            "comfy_support.load_node_pack() instead of 'import nodes'."
        )


# ComfyUI's model code does `from torchvision import transforms` at import time (comfy/ldm/cosmos, cascade, ace);
# PyPI's torchvision wheels do not load beside the CPU torch build. An empty stand-in is enough for SDXL, but
# transformers (5.x) decides "torchvision is available" from importlib.util.find_spec() alone and then fails
# importing torchvision.transforms.InterpolationMode. So: ask transformers first (it caches the answer), then
# put the stand-in in sys.modules. The same code runs in the server subprocess as a sitecustomize.py.
def install_torchvision_stub() -> bool:
    """Put an empty in-memory ``torchvision`` package in sys.modules if none is installed; True if it did.

    transformers is asked first whether torchvision is available (it caches that answer: no)."""
    import enum
    import importlib.machinery
    import importlib.util
    import sys
    import types

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    try:
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    except Exception:
        pass
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0+stub"
    tv.__path__ = []
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    tr = types.ModuleType("torchvision.transforms")
    tr.__path__ = []
    tr.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None, is_package=True)
    tv.transforms = tr
    # spandrel (ComfyUI's upscale-model nodes) imports these names; without UpscaleModelLoader the frontend
    # (1.27) cannot build checkpoint, LoRA or VAE loader nodes. Calling them is an error.
    fn = types.ModuleType("torchvision.transforms.functional")
    fn.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms.functional", None)

    def unavailable(*args, **kwargs):
        raise NotImplementedError("torchvision is a test stand-in here (tests/comfy_support.py)")

    fn.InterpolationMode = enum.Enum(
        "InterpolationMode",
        {
            "NEAREST": "nearest",
            "NEAREST_EXACT": "nearest-exact",
            "BILINEAR": "bilinear",
            "BICUBIC": "bicubic",
        },
    )
    fn.rotate = fn.normalize = unavailable
    tr.functional = fn
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = tr
    sys.modules["torchvision.transforms.functional"] = fn
    return True


def write_torchvision_stub(directory: str | os.PathLike) -> Path:
    """Write a ``sitecustomize.py`` running install_torchvision_stub() into ``directory``; put that
    directory on the PYTHONPATH of a process that runs ComfyUI without torchvision (``main.py`` by hand,
    the test server)."""
    import inspect

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    src = (
        '"""Test-only torchvision stand-in so ComfyUI starts on CPU torch (written by tests/comfy_support.py)."""\n\n'
        + inspect.getsource(install_torchvision_stub)
        + "\n\ninstall_torchvision_stub()\n"
    )
    (d / "sitecustomize.py").write_text(src)
    return d


@contextlib.contextmanager
def torchvision_stub():
    """The stand-in only while the block runs (for importing ComfyUI modules in-process); afterwards
    ``find_spec("torchvision")`` is None again, so transformers and diffusers see no torchvision."""
    installed = install_torchvision_stub()
    try:
        yield
    finally:
        if installed:
            for name in ("torchvision.transforms.functional", "torchvision.transforms", "torchvision"):
                sys.modules.pop(name, None)


# Import names of ComfyUI's essential requirements (requirements.txt of 0.3.64, less the optional ones).
COMFY_REQUIREMENTS = (
    "torch",
    "torchsde",
    "numpy",
    "einops",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "aiohttp",
    "yarl",
    "yaml",
    "PIL",
    "scipy",
    "tqdm",
    "psutil",
    "alembic",
    "sqlalchemy",
    "av",
)


def missing_requirements(names=COMFY_REQUIREMENTS) -> list[str]:
    """Which of ``names`` this Python cannot find (cheap: find_spec only, nothing is imported)."""
    return [n for n in names if importlib.util.find_spec(n) is None]


def comfy_importable() -> tuple[bool, str]:
    """Cheap check for collection time: COMFYUI_PATH is set, looks like ComfyUI, and `import comfy` works."""
    path = comfy_path()
    if path is None:
        return False, SKIP_REASON
    if not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        return (
            False,
            f"COMFYUI_PATH={path} is not a ComfyUI source tree (no comfy/model_management.py); {SKIP_REASON}",
        )
    missing = missing_requirements()
    if missing:
        return False, (
            f"this Python lacks ComfyUI's requirements ({', '.join(missing)}); use the venv made by "
            f"scripts/setup_comfyui.sh. {SKIP_REASON}"
        )
    try:
        _put_comfy_first_on_path(path)
        import comfy  # noqa: F401
        import comfy.cli_args  # noqa: F401  (argparse + comfy.options only: light)
    except Exception as e:  # pragma: no cover - depends on the environment
        return False, f"cannot import comfy from COMFYUI_PATH={path}: {e!r}; {SKIP_REASON}"
    return True, ""


_ok, _why = comfy_importable()
#: Mark a test (or a module via ``pytestmark = requires_comfyui``) that needs ComfyUI.
requires_comfyui = pytest.mark.skipif(not _ok, reason=_why or SKIP_REASON)

_SETUP_DONE = False


def setup_comfy() -> str:
    """Put ComfyUI first on sys.path, select the CPU, stub torchvision if needed, and import the
    ComfyUI modules the helpers use. Idempotent. Returns the ComfyUI path. Raises on failure."""
    global _SETUP_DONE
    path = comfy_path()
    if path is None:
        raise RuntimeError(SKIP_REASON)
    _put_comfy_first_on_path(path)
    if not _SETUP_DONE:
        from comfy.cli_args import args

        if "comfy.model_management" not in sys.modules:
            args.cpu = True  # must happen before comfy.model_management is imported
        # Every ComfyUI module that imports torchvision is imported by these (checked on 0.3.64); later
        # imports of other ComfyUI modules that need it can use `with torchvision_stub():`.
        with torchvision_stub():
            import comfy.model_management as mm

            if mm.get_torch_device().type != "cpu":
                raise RuntimeError("comfy.model_management was imported before CPU was selected")
            import comfy.controlnet  # noqa: F401
            import comfy.lora  # noqa: F401
            import comfy.model_base  # noqa: F401
            import comfy.model_patcher  # noqa: F401
            import comfy.sample  # noqa: F401
            import comfy.samplers  # noqa: F401
            import comfy.sd  # noqa: F401
            import comfy.supported_models  # noqa: F401

            import nodes  # noqa: F401  (ComfyUI's nodes.py; also claims the name before this repo's nodes/)

        _SETUP_DONE = True
    return path


@pytest.fixture(scope="session")
def comfyui():
    """Session fixture: ComfyUI imported on CPU (see setup_comfy); skips with the reason otherwise.
    Test modules get it with ``from comfy_support import comfyui  # noqa: F401`` or via a conftest."""
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
    try:
        return setup_comfy()
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"ComfyUI at COMFYUI_PATH={comfy_path()} failed to import: {e!r}; {SKIP_REASON}")


# --------------------------------------------------------------------------------------------------
# A tiny SDXL built from ComfyUI's own classes
# --------------------------------------------------------------------------------------------------
def init_weights(module, seed: int) -> None:
    """Fill every floating-point parameter deterministically (ComfyUI's ops leave them uninitialised).

    Each parameter gets its own generator seeded from (seed, name), so the values do not depend on the
    order or number of other parameters. Matrices/convs/embeddings: N(0, 1/fan_in); 1-D weights (norm
    scales): 1 + 0.1 N(0,1); biases: 0.05 N(0,1). Norm scales and biases are deliberately not (1, 0) so that
    weight patches on them are visible. ``logit_scale`` keeps ComfyUI's value."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.dtype.is_floating_point or name.endswith("logit_scale"):
                continue
            g = torch.Generator(device="cpu").manual_seed(
                (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
            )
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                r = r / (p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                r = 0.05 * r
            else:
                r = 1.0 + 0.1 * r
            p.copy_(r.to(p.dtype))


def patcher_of(base, state=None):
    """A float32 CPU ModelPatcher of ComfyUI's model ``base``, in eval mode; with ``state``, its diffusion
    model's weights are loaded first, every key fitting."""
    import comfy.model_management as mm
    import comfy.model_patcher

    if state is not None:
        missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def tiny_comfy_clip(tokenizer, model, seed: int = 0, tokenizer_data=None, **model_options):
    """ComfyUI's own CLIP of its ``tokenizer`` and text ``model`` classes in float32, ``model_options``
    sizing its encoders (``<name>_model_config``), random weights from ``seed``, in eval mode."""
    setup_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import torch

    target = comfy.supported_models_base.ClipTarget(tokenizer, model)
    extra = {} if tokenizer_data is None else {"tokenizer_data": tokenizer_data}
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32, **model_options}, **extra)
    init_weights(clip.cond_stage_model, seed + 1)
    clip.cond_stage_model.eval()
    return clip


def build_tiny_unet(seed: int = 0):
    """A tiny SDXL UNet (ComfyUI ``model_base.SDXL``, EPS) wrapped in a ModelPatcher, float32 on CPU."""
    setup_comfy()
    import comfy.supported_models
    import torch

    model_config = comfy.supported_models.SDXL(dict(TINY_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    init_weights(base.diffusion_model, seed)
    return patcher_of(base)


def build_tiny_clip(seed: int = 0):
    """A tiny SDXL text-encoder pair (clip_l + clip_g, 3 layers each, float32) as ``comfy.sd.CLIP``,
    with ComfyUI's real CLIP tokenizers."""
    setup_comfy()
    import comfy.sdxl_clip

    return tiny_comfy_clip(
        comfy.sdxl_clip.SDXLTokenizer,
        comfy.sdxl_clip.SDXLClipModel,
        seed,
        clip_l_model_config=dict(TINY_CLIP_L),
        clip_g_model_config=dict(TINY_CLIP_G),
    )


def build_tiny_sdxl(seed: int = 0):
    """(ModelPatcher, comfy.sd.CLIP) of a tiny random SDXL; deterministic given ``seed``.

    State-dict keys have the real SDXL layout, e.g. ``diffusion_model.input_blocks.3.1.transformer_blocks.0.norm1.weight``
    (one res block per level, so block indices differ from the full SDXL's ``input_blocks.4.1``),
    ``clip_l.transformer.text_model.encoder.layers.0.layer_norm1.weight``, ``clip_g.transformer....``."""
    return build_tiny_unet(seed), build_tiny_clip(seed)


def encode(clip, text: str):
    """Conditioning as ComfyUI passes it between nodes: ``[[cond, {"pooled_output": pooled}]]``."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample_tiny(
    model,
    clip,
    prompt: str,
    seed: int = 0,
    steps: int = 2,
    cfg: float = 5.0,
    size: tuple[int, int] = (16, 16),
    negative: str = "",
    sampler_name: str = "euler",
    scheduler: str = "normal",
):
    """Run ``comfy.sample.sample`` (what KSampler does) on CPU and return the denoised latent
    (1, 4, H, W) as a float32 CPU tensor. ``size`` is the LATENT (height, width); each must be a multiple
    of 4 for the tiny UNet. With cfg == 1.0 ComfyUI skips the negative (uncond) pass."""
    setup_comfy()
    import comfy.sample
    import torch

    h, w = size
    latent = torch.zeros((1, 4, h, w), dtype=torch.float32)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = encode(clip, prompt)
    neg = encode(clip, negative)
    out = comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        neg,
        latent,
        denoise=1.0,
        disable_pbar=True,
        seed=seed,
    )
    return out.detach().to("cpu", torch.float32)


# --------------------------------------------------------------------------------------------------
# Loading this repo's node pack in-process, the way ComfyUI's nodes.load_custom_node does
# --------------------------------------------------------------------------------------------------
def load_node_pack(path: str | os.PathLike | None = None, module_name: str = "comfyui_act_nodepack"):
    """Import the node pack at ``path`` (default: this repo's root ``__init__.py``) as a package named
    ``module_name`` and return the module. ComfyUI itself registers it under the folder path (dots
    replaced by ``_x_``) with ``importlib.util.spec_from_file_location(name, <dir>/__init__.py)``; relative
    imports inside the pack work either way. Call ``setup_comfy()`` first if the pack imports ComfyUI."""
    root = Path(path) if path is not None else REPO_ROOT
    init = root / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} does not exist (the node pack entry point)")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


class NodeCaller:
    """Run a V3 node the way ComfyUI's executor does: a class clone with hidden inputs, normalized output.

    Positional arguments follow the schema's input order (as the old V1 methods took them); the result is
    the outputs tuple, or ``{"ui": ..., "result": ...}`` for nodes that show something in the UI.
    """

    def __init__(self, node_cls: type):
        self.node_cls = node_cls
        self.schema = node_cls.GET_SCHEMA()
        self.input_names = [entry.id for entry in self.schema.inputs]

    def __call__(self, *args, **kwargs):
        inputs = dict(zip(self.input_names, args, strict=False))
        inputs.update(kwargs)
        clone = self.node_cls.PREPARE_CLASS_CLONE({"UNIQUE_ID": "act-test"})
        clone.GET_SCHEMA()
        output = clone.EXECUTE_NORMALIZED(**inputs)
        if output.ui is not None:
            return {"ui": output.ui, "result": output.args}
        return output.args

    fit = apply = save = load = export = sweep = __call__

    def __getattr__(self, name: str):  # INPUT_TYPES, fingerprint_inputs, ...: the node class's own
        return getattr(self.node_cls, name)


def node_classes(pack) -> dict[str, type]:
    """node id -> V3 node class, from the pack's ``comfy_entrypoint`` (as ComfyUI registers them)."""
    import asyncio

    extension = asyncio.run(pack.comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def node_callers(pack) -> dict[str, NodeCaller]:
    return {node_id: NodeCaller(cls) for node_id, cls in node_classes(pack).items()}
