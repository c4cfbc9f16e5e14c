"""The ``act`` command line: fit a map, sweep its strength into a PNG grid, inspect it, export a LoRA.

    act fit --model ./sdxl --source cats.txt --target watercolor_cats.txt --output watercolor.safetensors
    act sweep --model ./sdxl --map watercolor.safetensors --prompt "a cat" --output grid.png
    act info watercolor.safetensors
    act export-lora --model ./sdxl --map watercolor.safetensors --output watercolor_lora.safetensors

User mistakes (missing files, bad prompt files, a model that is not here, a map for another model)
print one line to stderr and exit with status 2; only bugs show a traceback. Everything that can be
checked before loading a multi-GB model is checked first, so mistakes fail in a second, not a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .calibration import CALIBRATIONS, DEFAULT_CALIBRATION
from .errors import ACTError, ACTInputError, ACTWarning

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DTYPES = ("fp32", "fp16", "bf16")


class CLIError(ACTInputError):
    """A bad command-line argument or input file."""


# ---------------------------------------------------------------------------------------------- inputs
def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with ``#`` are ignored."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CLIError(f"Prompt file {str(path)!r} {what}. Pass a text file with one prompt per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(
            f"Prompt file {str(path)!r} is not UTF-8 text. Save it as UTF-8, one prompt per line."
        ) from None
    except OSError as error:
        raise CLIError(f"Cannot read prompt file {str(path)!r}: {error.strerror or error}.") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise CLIError(
            f"Prompt file {str(path)!r} has no prompts (blank lines and # comments are ignored). "
            "Write one prompt per line."
        )
    return prompts


def gather_prompts(files: Sequence[str] | None, prompts: Sequence[str] | None, side: str) -> list[str]:
    """Prompts from ``--<side>`` files and ``--<side>-prompt`` options, files first."""
    gathered: list[str] = []
    for file in files or []:
        gathered.extend(read_prompt_file(file))
    gathered.extend(p.strip() for p in prompts or [] if p.strip())
    if not gathered:
        raise CLIError(
            f"No {side} prompts: pass --{side} FILE (one prompt per line) or --{side}-prompt TEXT."
        )
    return gathered


def parse_lambdas(text: str) -> list[float]:
    """``"0,0.25,1"`` (commas, spaces or semicolons) -> ``[0.0, 0.25, 1.0]`` (``act_core.validation``)."""
    from .validation import parse_lambdas as parse

    try:
        return parse(text)
    except ACTInputError as error:
        raise CLIError(f"--lambdas: {error}") from None


def check_output(path: str, suffix: str, flag: str = "--output") -> Path:
    """An output path that can be written (suffix, folder, permissions, name length), checked up front."""
    from .files import check_writable_output

    try:
        return check_writable_output(path, (suffix,), flag)
    except ACTInputError as error:
        raise CLIError(str(error)) from None


def check_size(args: argparse.Namespace) -> None:
    from .validation import check_sampling
    from .validation import check_size as check

    height, width = getattr(args, "height", None), getattr(args, "width", None)
    if height is not None or width is not None:
        try:
            check(height if height is not None else 8, width if width is not None else 8)
        except ACTInputError as error:
            raise CLIError(str(error).replace("width and height", "--width and --height")) from None
    steps, guidance = getattr(args, "steps", None), getattr(args, "guidance", None)
    if steps is not None or guidance is not None:  # the mixin's own rule, under the flags' names
        try:
            check_sampling(1 if steps is None else steps, 0.0 if guidance is None else guidance)
        except ACTInputError as error:
            message = (
                str(error).replace("num_inference_steps", "--steps").replace("guidance_scale", "--guidance")
            )
            raise CLIError(message) from None
    statistics_steps = getattr(args, "statistics_steps", 1)
    if statistics_steps != 1 and not 1 <= statistics_steps <= (steps or statistics_steps):
        raise CLIError(f"--statistics-steps must be between 1 and --steps ({steps}); got {statistics_steps}.")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be at least 1; got {threads}.")


def check_seed(args: argparse.Namespace) -> None:
    """``--seed``: a whole number from 0 to 2**64 - 1 (``act_core.validation.check_seed``)."""
    from .validation import check_seed as check

    try:
        check(args.seed, "--seed")
    except ACTInputError as error:
        raise CLIError(str(error)) from None


def load_map(path: str) -> Any:
    from .maps import ACTMap

    return ACTMap.load(Path(path).expanduser())


# A small model runs faster on ONE thread: torch's default (every core) thrashes on tiny kernels,
# badly when the machine is busy (measured: a 10-step 32 px image of the shipped model 0.39 s with 1
# thread, 23.7 s with 2 under load).
SMALL_MODEL_PARAMETERS = 50_000_000


def choose_threads(pipe: Any, requested: int | None) -> int:
    """Set torch's intra-op threads: ``--threads`` if given, else 1 for small models, else torch's default."""
    import torch

    if requested is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = sum(p.numel() for p in denoiser.parameters()) if denoiser is not None else 0
        if size >= SMALL_MODEL_PARAMETERS:
            return torch.get_num_threads()
        requested = 1
    torch.set_num_threads(requested)
    return requested


def model_family(model: str) -> Any:
    """The model family of ``--model`` from its ``model_index.json`` (no torch); folders of unknown classes,
    single files and cached ids are checked as the legacy family (SDXL) until they load."""
    from .families import LEGACY_FAMILY, family_of_pipeline_class

    index = Path(os.path.expanduser(str(model))) / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError):
        return LEGACY_FAMILY
    return family_of_pipeline_class(str(name)) or LEGACY_FAMILY


def load_model(args: argparse.Namespace) -> Any:
    """The ACT pipeline for ``--model`` (local only; see ``act_core.diffusers.loading``)."""
    import torch

    from .diffusers.loading import load_pipeline

    _QUIET.quiet()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _status(args, f"Loading {args.model} ({args.dtype}, {device})")
    pipe = load_pipeline(args.model, dtype, config=args.config, allow_pickle=args.allow_pickle, device=device)
    pipe.set_progress_bar_config(disable=True)
    threads = choose_threads(pipe, args.threads)
    _status(args, f"Using {threads} CPU thread(s) (--threads to change)")
    return pipe


class _QuietLibraries:
    """Hide diffusers/transformers warnings and loading bars (noise for a CLI user; errors stay), restored
    on exit.

    Restoring matters when ``main`` runs in-process (tests, notebooks): logging state is global.
    """

    def __init__(self) -> None:
        self.saved: list[tuple[Any, int, bool]] = []

    def quiet(self) -> None:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library in (diffusers_logging, transformers_logging):
            self.saved.append((library, library.get_verbosity(), library.is_progress_bar_enabled()))
            library.set_verbosity_error()
            library.disable_progress_bar()  # their loading bars repeat our "Loading ..." line

    def restore(self) -> None:
        for library, verbosity, progress in reversed(self.saved):
            library.set_verbosity(verbosity)
            (library.enable_progress_bar if progress else library.disable_progress_bar)()
        self.saved.clear()


_QUIET = _QuietLibraries()


def _status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    from .validation import check_balance, check_prompts

    for flag in ("batch_size", "max_pairs_per_call"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be at least 1; got {value}.")
    check_size(args)
    check_seed(args)
    if args.max_sequence_length is not None:
        from .validation import check_max_sequence_length

        try:
            check_max_sequence_length(args.max_sequence_length, what="--max-sequence-length")
        except ACTInputError as error:
            raise CLIError(str(error)) from None
    output = check_output(args.output, ".safetensors")
    source = check_prompts(gather_prompts(args.source, args.source_prompt, "source"), "source")
    target = check_prompts(gather_prompts(args.target, args.target_prompt, "target"), "target")
    check_balance(source, target)
    less = None
    if args.less or args.less_prompt:
        less = check_prompts(gather_prompts(args.less, args.less_prompt, "less"), "less")
        check_balance(source, less)
    from .estimators import validate_support  # the checks above ran before torch loads

    family = model_family(args.model)
    args.preset = args.preset or family.default_preset
    spec = family.preset(args.preset)  # fail before loading the model, not a minute later
    from .workflow import check_family_sampling

    try:
        check_family_sampling(family, args.negative_prompt, args.max_sequence_length)
    except ACTInputError as error:
        raise CLIError(str(error)) from None
    if args.support is not None:
        validate_support(args.support)
    if args.statistics_steps != 1 and spec.protocol != "first_step":
        raise CLIError(
            f"--statistics-steps is for the first-step protocol (--preset unet_norms_first_step); preset "
            f"{spec.name!r} fits along every step of the trajectory."
        )
    pipe = load_model(args)
    sides = f" and {len(less)} less prompts (two-sided)" if less else ""
    _status(
        args, f"Fitting preset {args.preset} on {len(source)} source, {len(target)} target prompts{sides}"
    )
    act_map = pipe.fit_act(
        source,
        target,
        less_prompts=less,
        preset=args.preset,
        method=args.method,
        support=args.support,
        mode=args.mode,
        batch_size=args.batch_size,
        max_pairs_per_call=args.max_pairs_per_call,
        calibration=args.calibration,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        statistics_steps=args.statistics_steps,
        progress=_progress_enabled(args),
        **({"max_sequence_length": args.max_sequence_length} if args.max_sequence_length is not None else {}),
    )
    act_map = act_map.with_metadata({"model_source": str(args.model)})
    act_map.save(output)
    print(act_map.summary())
    print(f"Saved {output}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .diffusers.sweep import lambda_label, save_grid, sweep_images

    check_size(args)
    check_seed(args)
    output = check_output(args.output, ".png")
    prompts = gather_prompts(args.prompts, args.prompt, "prompt") if (args.prompts or args.prompt) else []
    if not prompts:
        raise CLIError("No prompts to sweep: pass --prompt TEXT (repeatable) or --prompts FILE.")
    lambdas = parse_lambdas(args.lambdas)
    act_map = load_map(args.map)
    pipe = load_model(args)
    _warn_unknown_words(pipe, prompts)
    from .diffusers.adapter import load_adapter

    # --guidance is the CFG scale under the pipeline's own name (QwenImagePipeline: true_cfg_scale)
    guidance = load_adapter(pipe.act_family).guidance_parameter
    generate: dict[str, Any] = {"num_inference_steps": args.steps}
    for key, value in ((guidance, args.guidance), ("height", args.height), ("width", args.width)):
        if value is not None:
            generate[key] = value
    if args.negative_prompt is not None:  # "" too: QwenImagePipeline guides only with a negative prompt
        generate["negative_prompt"] = args.negative_prompt
    bar = _progress_bar(args, len(prompts) * len(lambdas), "Sweeping")  # every cell of the grid
    try:
        images = sweep_images(
            pipe,
            act_map,
            prompts,
            lambdas,
            args.seed,
            progress=bar and (lambda d, t: bar.update(1)),
            **generate,
        )
    finally:
        if bar is not None:
            bar.close()
    from .diffusers.sweep import grid_image

    grid = grid_image(images, prompts, [lambda_label(lam) for lam in lambdas])
    info = {
        "prompts": prompts,
        "lambdas": lambdas,
        "seed": args.seed,
        "model": str(args.model),
        "map": str(args.map),
        "generate": generate,
        "act_version": __version__,
    }
    save_grid(grid, output, info)
    print(f"Saved {output}: {len(prompts)} prompts x {len(lambdas)} lambdas, {grid.width}x{grid.height} px")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.map).expanduser()
    lora_header = _lora_header(path)
    if lora_header is not None:
        modules, map_metadata = _lora_header_entries(path, lora_header)
        if args.json:
            report: dict[str, Any] = {"file": str(path), "kind": "lora", **lora_header}
            report["modules"] = modules
            report["act_map_metadata"] = map_metadata
            print(json.dumps(report, indent=2))
        else:
            print(
                f"ACT LoRA export: {lora_header.get('modules')} modules ({lora_header.get('parts')}), "
                f"{lora_header.get('dtype')}, exported at strength {lora_header.get('strength')}"
            )
            print(lora_header.get("note", ""))
        return 0
    act_map = load_map(args.map)
    if args.json:
        report = {
            "file": str(path),
            "kind": "act_map",
            "modules": len(act_map),
            "units": sum(act_map.widths.values()),
            "parts": act_map.parts(),
            "foldable": act_map.foldable,
            "buckets": None if act_map.buckets is None else list(act_map.buckets),
            "metadata": act_map.metadata,
        }
        if args.modules:
            report["module_widths"] = act_map.widths
        print(json.dumps(report, indent=2))
    else:
        print(act_map.summary())
        if args.modules:
            for name, width in act_map.widths.items():
                print(f"  {name}: {width}")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from .lora import check_foldable, export_lora

    output = check_output(args.output, ".safetensors")
    act_map = load_map(args.map)
    folded_output = (
        check_output(args.save_folded, ".safetensors", "--save-folded") if args.save_folded else None
    )
    if args.fold_steps < 1:
        raise CLIError(f"--fold-steps must be at least 1; got {args.fold_steps}.")
    fold = act_map.buckets is not None and act_map.less is None  # the default's time-aware map: fold it first
    if args.save_folded and not fold:
        raise CLIError(
            "--save-folded saves the fold of a time-aware map; this map is static (export it as it is)."
        )
    if args.source and not fold:
        raise CLIError(
            "--source gives the prompts to fold a time-aware map with; this map is static: drop it."
        )
    prompts = read_prompt_file(args.source) if args.source else None
    if fold:  # refuse before spending a minute on loading the model
        from .distill import fold_prompts

        prompts = fold_prompts(act_map, prompts)
    else:
        check_foldable(act_map)
    pipe = load_model(args)
    if fold:
        act_map = pipe.fold_act(act_map, prompts, progress=not args.quiet, steps=args.fold_steps)
        if folded_output is not None:
            act_map.save(folded_output)
    path = export_lora(act_map, pipe, output, strength=args.strength, dtype=args.lora_dtype)
    print(
        f"Saved {path}: {len(act_map)} modules ({', '.join(act_map.parts())}), {args.lora_dtype}, strength "
        f"{args.strength:g} baked in. In ComfyUI, load it with the stock LoraLoader: its strength multiplies "
        f"this one, so with --strength 1 the loader strength is lambda (strength_model for unet maps, "
        f"strength_clip for text encoder maps)."
    )
    return 0


def _lora_header(path: Path) -> dict[str, str] | None:
    """The header of an ACT LoRA export, or None for anything else (left to ACTMap.load to judge)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception:  # not safetensors: ACTMap.load gives the clear error
        return None
    return header if header.get("format") == "act_lora" else None


def _lora_header_entries(path: Path, header: dict[str, str]) -> tuple[int, dict]:
    """(number of modules, the map's metadata) of an ACT LoRA export's header, or ``CLIError`` naming the
    damaged entry (a hand-edited or foreign file that claims the format)."""
    damaged = f"{path.name} is an ACT LoRA export with a damaged header:"
    fix = "Export it again with 'act export-lora'."
    modules = header.get("modules", "0")
    if not (modules.isascii() and modules.isdigit()):
        raise CLIError(f"{damaged} 'modules' is {modules!r}, not a number of modules. {fix}")
    try:
        metadata = json.loads(header.get("act_map_metadata", "{}"))
    except ValueError:
        raise CLIError(f"{damaged} 'act_map_metadata' is not valid JSON. {fix}") from None
    if not isinstance(metadata, dict):
        raise CLIError(
            f"{damaged} 'act_map_metadata' is a JSON {type(metadata).__name__}, not an object. {fix}"
        )
    return int(modules), metadata


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet


def _progress_bar(args: argparse.Namespace, total: int, description: str) -> Any:
    """A counter for ``total`` items (tqdm on a terminal, plain lines when redirected), or None with -q."""
    if args.quiet:
        return None
    from .progress import Progress

    report = Progress(description)

    class Counter:
        done = 0

        def update(self, n: int = 1) -> None:
            self.done += n
            report(self.done, total, "")

        def close(self) -> None:
            pass

    return Counter()


def _warn_unknown_words(pipe: Any, prompts: list[str]) -> None:
    from .validation import unknown_words

    words = unknown_words(getattr(pipe, "tokenizer", None), prompts)
    if words:
        print(
            f"act: warning: the tokenizer does not know {', '.join(words[:8])}: it splits them into characters, "
            "which the model never learned. Use words of the model's vocabulary.",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------- parser
def _add_model_options(parser: argparse.ArgumentParser, dtype_flag: str = "--dtype") -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        help="local diffusers folder (with model_index.json), a .safetensors checkpoint, or a hub id "
        "already in the Hugging Face cache (nothing is downloaded)",
    )
    group.add_argument(
        dtype_flag,
        dest="dtype",
        choices=DTYPES,
        default="fp32",
        help="model dtype (default fp32; CPUs want fp32)",
    )
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 for small models, which thrash on more; torch's default otherwise)",
    )
    group.add_argument(
        "--config",
        default=None,
        help="for single-file checkpoints: a local diffusers folder with the component configs",
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt checkpoints (pickles can run code when loaded: only for files you trust)",
    )


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="act",
        description="Activation Transport (ACT) for Stable Diffusion: fit, sweep, inspect and export maps.",
    )
    parser.add_argument("--version", action="version", version=f"comfyui-act {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", parents=[common], help="fit a map from source and target prompts")
    _add_model_options(fit)
    fit.add_argument("--source", action="append", metavar="FILE", help="source prompt file (one per line)")
    fit.add_argument("--source-prompt", action="append", metavar="TEXT", help="a source prompt (repeatable)")
    fit.add_argument("--target", action="append", metavar="FILE", help="target prompt file (one per line)")
    fit.add_argument("--target-prompt", action="append", metavar="TEXT", help="a target prompt (repeatable)")
    fit.add_argument(
        "--less",
        action="append",
        metavar="FILE",
        help="two-sided slider: the 'less' prompt file (lambda -1 moves toward these, +1 toward the targets)",
    )
    fit.add_argument("--less-prompt", action="append", metavar="TEXT", help="a 'less' prompt (repeatable)")
    fit.add_argument(
        "--preset",
        default=None,
        help="which modules and how (default: the model family's own, time-aware maps along your sampler's "
        "trajectory, e.g. SDXL unet_norms, FLUX pooled_text_and_blocks; SDXL's unet_norms_first_step is the "
        "paper's protocol; docs/cli.md and act_core/families/ list every family's)",
    )
    fit.add_argument(
        "--method", choices=("linear", "mean", "gaussian"), default=None, help="default: the preset's"
    )
    fit.add_argument(
        "--support", default=None, help="range | unbounded | qLO-HI such as q0.5-99.5 (default: the preset's)"
    )
    fit.add_argument(
        "--mode",
        choices=("causal", "at_once"),
        default=None,
        help="default: the preset's (causal, the paper's)",
    )
    fit.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per batch of the first-step presets (default 8) and the text encoders",
    )
    fit.add_argument(
        "--max-pairs-per-call",
        type=int,
        default=None,
        help="at most this many prompt pairs per denoiser call of a trajectory fit (default: as many as fit in "
        "memory); a step split over several calls gives the same map (its calls meet at every module)",
    )
    fit.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default=DEFAULT_CALIBRATION,
        help="how each step of a trajectory fit is scaled so that lambda 1 moves the prediction as far as the "
        "target prompt does: by the norm of that move (default) or by the least-squares gain (the earlier "
        "default, weaker)",
    )
    fit.add_argument("--seed", type=int, default=0, help="prompt pair i gets the noise of seed + i")
    sampling = fit.add_argument_group("the sampling settings you generate with (the fit follows them)")
    sampling.add_argument(
        "--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)"
    )
    sampling.add_argument(
        "--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)"
    )
    sampling.add_argument("--height", type=int, default=None, help="default: the model's native size")
    sampling.add_argument("--width", type=int, default=None)
    sampling.add_argument("--negative-prompt", default=None, help="the negative prompt you generate with")
    sampling.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="the prompt length in tokens you sample with, for families whose pipeline takes one (FLUX.1, "
        "FLUX.2, SD3, Chroma, Qwen-Image, Z-Image, Lumina 2; default: the pipeline's own, e.g. FluxPipeline's "
        "512, SD3's 256)",
    )
    fit.add_argument(
        "--statistics-steps",
        type=int,
        default=1,
        help="first-step presets only: pool statistics over the first N steps (default 1, the paper's)",
    )
    fit.add_argument("--output", required=True, metavar="MAP.safetensors")
    fit.set_defaults(handler=cmd_fit)

    sweep = commands.add_parser(
        "sweep", parents=[common], help="render prompts x lambdas as a labelled PNG grid"
    )
    _add_model_options(sweep)
    sweep.add_argument("--map", required=True, metavar="MAP.safetensors")
    sweep.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt (repeatable): one grid row"
    )
    sweep.add_argument("--prompts", action="append", metavar="FILE", help="prompt file (one per line)")
    sweep.add_argument(
        "--lambdas",
        default="0,0.25,0.5,0.75,1",
        help="separated by commas, spaces or semicolons (default 0,0.25,0.5,0.75,1)",
    )
    sweep.add_argument("--seed", type=int, default=0, help="the same seed for every cell")
    sweep.add_argument("--steps", type=int, default=30)
    sweep.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    sweep.add_argument("--negative-prompt", default=None)
    sweep.add_argument("--height", type=int, default=None)
    sweep.add_argument("--width", type=int, default=None)
    sweep.add_argument("--output", required=True, metavar="GRID.png")
    sweep.set_defaults(handler=cmd_sweep)

    info = commands.add_parser("info", parents=[common], help="describe a map file (or an exported LoRA)")
    info.add_argument("map", metavar="MAP.safetensors")
    info.add_argument("--json", action="store_true", help="machine-readable output with all metadata")
    info.add_argument("--modules", action="store_true", help="also list every module and its width")
    info.set_defaults(handler=cmd_info)

    export = commands.add_parser(
        "export-lora", parents=[common], help="write a foldable map as a LoRA for ComfyUI's LoraLoader"
    )
    _add_model_options(export, dtype_flag="--model-dtype")
    export.add_argument("--map", required=True, metavar="MAP.safetensors")
    export.add_argument("--output", required=True, metavar="LORA.safetensors")
    export.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="lambda baked into the diffs (default 1); the LoraLoader strength then multiplies it",
    )
    export.add_argument(
        "--dtype",
        dest="lora_dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="LoRA dtype (default fp32: exact, norm diffs are small; fp16 is refused where it overflows)",
    )
    export.add_argument(
        "--source",
        default=None,
        metavar="PROMPTS.txt",
        help="for a time-aware map (the default's), which is folded first (pipe.fold_act: a static map that "
        "steers like its hooks, fitted along these prompts' generations) and then exported: the prompts, one per "
        "line (default: the ones the map was fitted on, which it records)",
    )
    export.add_argument(
        "--save-folded",
        default=None,
        metavar="MAP.safetensors",
        help="for a time-aware map: also save the folded (static) map, to apply or fuse later",
    )
    export.add_argument(
        "--fold-steps",
        type=int,
        default=200,
        help="for a time-aware map: optimisation steps of the fold (default 200; fewer are faster and fit less "
        "well)",
    )
    export.set_defaults(handler=cmd_export_lora)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``act`` / ``python -m act_core``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            show = warnings.showwarning

            def one_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
                if issubclass(category, ACTWarning):  # ours are for the user: no source line
                    print(f"act {args.command}: warning: {message}", file=sys.stderr)
                else:
                    show(message, category, filename, lineno, file, line)

            warnings.showwarning = one_line
            return args.handler(args)
    except ACTError as error:
        print(f"act {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"act {args.command}: interrupted; no output file was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `act info map.safetensors --json | head`: not an error
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        _QUIET.restore()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
