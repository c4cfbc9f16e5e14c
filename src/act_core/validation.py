"""One validation layer for every host (the diffusers mixin, the CLI, the ComfyUI nodes).

No torch import here: the command line checks its arguments before torch loads.

Each check raises ``ACTInputError`` naming the problem and the fix, or warns (``ACTWarning``) about
input that works but is probably not what was meant.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

from .errors import ACTInputError, ACTWarning

# Largest |lambda| accepted: the slider goes to 2; beyond 10 a map only renders noise (or NaN).
MAX_STRENGTH = 10.0
MIN_PROMPTS = 2
MAX_IMBALANCE = 4.0
MAX_LAMBDAS = 64
# Seeds: what torch's generators and ComfyUI's seed widgets take; prompt pair i uses (seed + i) mod 2**64.
MAX_SEED = 2**64 - 1
# FluxPipeline refuses a T5 prompt length above 512, and SD3 caps its T5 there too.
MAX_SEQUENCE_LENGTH = 512
# Largest |omega| a map may hold (``maps.ModuleMap`` refuses more): the cap ``max_omega`` goes up to it.
MAX_OMEGA_MAGNITUDE = 1e4


def check_strength(value: Any, what: str = "strength") -> float:
    """A finite float with ``|value| <= MAX_STRENGTH``, or an ``ACTInputError`` that says what was wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ACTInputError(f"{what} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ACTInputError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ACTInputError(f"{what} must be finite, got {number}. Use 0 for off, 1 for full transport.")
    if abs(number) > MAX_STRENGTH:
        raise ACTInputError(
            f"{what} {number:g} is outside [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]: 0 is off, 1 full transport, "
            "values up to about 2 extrapolate."
        )
    return number


def check_prompts(prompts: Any, side: str) -> list[str]:
    """A list of at least 2 non-empty prompts (surrounding spaces stripped, empty ones dropped).

    Anything that is not a string (``None``, numbers, bytes) is an error naming its position, rather
    than being dropped silently.
    """
    if isinstance(prompts, (str, bytes)):
        raise ACTInputError(f"{side} prompts must be a list of prompts, not one {type(prompts).__name__}.")
    try:
        items = list(prompts)
    except TypeError:
        raise ACTInputError(
            f"{side} prompts must be a list of strings, got {type(prompts).__name__}."
        ) from None
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ACTInputError(
                f"{side} prompt {index} is {type(item).__name__} ({item!r}), not text. Give every prompt as a "
                "string (decode bytes first)."
            )
    kept = [item.strip() for item in items if item.strip()]
    if len(kept) < MIN_PROMPTS:
        raise ACTInputError(
            f"The {side} prompt list has {len(kept)} non-empty prompt(s); ACT needs at least {MIN_PROMPTS} per "
            "side (the paper uses 1024). Add more prompts."
        )
    return kept


def parse_prompt_lines(text: Any, side: str) -> list[str]:
    """Prompts from text, one per line (the ComfyUI nodes' multiline fields); blank lines ignored."""
    if not isinstance(text, str):
        raise ACTInputError(f"The {side} prompts must be text, one prompt per line.")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < MIN_PROMPTS:
        raise ACTInputError(
            f"The {side} prompt list has {len(lines)} non-empty line(s); ACT needs at least {MIN_PROMPTS} "
            f"{side} prompts, one per line (the paper uses hundreds). Add more lines to '{side}_prompts'."
        )
    return lines


def check_balance(source: Sequence[str], target: Sequence[str], max_ratio: float = MAX_IMBALANCE) -> None:
    """Refuse prompt sets whose sizes differ by more than ``max_ratio`` (usually a pasting mistake)."""
    n, m = len(source), len(target)
    if max(n, m) > max_ratio * min(n, m):
        raise ACTInputError(
            f"Unbalanced prompt lists: {n} source vs {m} target prompts. Give both lists a similar number of "
            f"prompts (at most {max_ratio:g}x apart; equal is best), e.g. the same prompts with and without "
            "the style."
        )


def check_prompt_sets(
    source: Sequence[str],
    target: Sequence[str],
    source_keys: Sequence[Hashable] | None = None,
    target_keys: Sequence[Hashable] | None = None,
    limit: str = "",
) -> None:
    """Refuse source and target sets that are the same to the model; warn about duplicates within a set.

    ``*_keys`` are what the model sees of each prompt (e.g. token ids after truncation); when given,
    prompts that differ only beyond the tokenizer's length limit are caught too (``limit`` says where).
    """
    source_keys = list(source_keys) if source_keys is not None else list(source)
    target_keys = list(target_keys) if target_keys is not None else list(target)
    if sorted(map(repr, source_keys)) == sorted(map(repr, target_keys)):
        same_text = sorted(source) == sorted(target)
        raise ACTInputError(
            "The source and target prompts are the same to the model"
            + ("" if same_text else f" after the tokenizer's truncation{limit}")
            + ", so the map would do nothing. The target prompts must add (or remove) the property to steer "
            "toward, within the tokenizer's length limit."
        )
    for side, prompts, keys in (("source", source, source_keys), ("target", target, target_keys)):
        seen: dict[str, str] = {}
        duplicates = []
        for prompt, key in zip(prompts, keys, strict=True):
            if repr(key) in seen:
                duplicates.append(prompt)
            seen.setdefault(repr(key), prompt)
        if duplicates:
            warnings.warn(
                f"{len(duplicates)} {side} prompt(s) repeat another one to the model (first: {duplicates[0]!r}); "
                "repeats add no information. Use varied prompts.",
                ACTWarning,
                stacklevel=3,
            )


def parse_lambdas(text: Any) -> list[float]:
    """Lambda values separated by commas, spaces or semicolons, e.g. ``"0, 0.25, 0.5, 0.75, 1"``."""
    if not isinstance(text, str):
        raise ACTInputError(f"Lambda values must be text such as '0, 0.5, 1', got {type(text).__name__}.")
    items = [item for item in re.split(r"[,\s;]+", text) if item]
    if not items:
        raise ACTInputError("Give at least one lambda value, e.g. '0, 0.25, 0.5, 0.75, 1'.")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ACTInputError(
                f"Cannot read lambda value {item!r}; write numbers separated by commas, e.g. '0, 0.5, 1'."
            ) from None
        values.append(check_strength(value, f"lambda value {item!r}"))
    if len(values) > MAX_LAMBDAS:
        raise ACTInputError(f"{len(values)} lambda values is too many for one sweep (at most {MAX_LAMBDAS}).")
    return values


def check_window(start: Any, end: Any) -> tuple[float, float]:
    """A start/end window of denoising as fractions, ``0 <= start <= end <= 1``."""
    start, end = check_strength(start, "start"), check_strength(end, "end")
    if not 0.0 <= start <= end <= 1.0:
        raise ACTInputError(
            f"Need 0 <= start <= end <= 1 (fractions of denoising), got start={start}, end={end}."
        )
    return start, end


def check_size(height: Any, width: Any, multiple: int = 8, why: str | None = None) -> tuple[int, int]:
    """Image height and width: positive integers, multiples of ``multiple`` (the VAE's downsampling, times
    the latent patch size of transformers that pack patches; ``why`` says which)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ACTInputError(
                f"width and height must be positive multiples of {multiple} "
                f"({why or f'the VAE downsamples by {multiple}'}); got {name}={value!r}."
            )
    return height, width


def check_sampling(num_inference_steps: Any, guidance_scale: Any) -> tuple[int, float]:
    """Steps >= 1 (an int) and a finite guidance scale >= 0."""
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ACTInputError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
    try:
        if isinstance(guidance_scale, bool):  # float(True) is 1.0: a bool is a slip, not a scale
            raise TypeError
        guidance = float(guidance_scale)
    except (TypeError, ValueError):
        raise ACTInputError(f"guidance_scale must be a number, got {guidance_scale!r}.") from None
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ACTInputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
    return num_inference_steps, guidance


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ACTInputError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def check_seed(value: Any, what: str = "seed") -> int:
    """A whole number from 0 to ``MAX_SEED`` (2**64 - 1): prompt pair i gets the noise of seed + i (mod 2**64)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        seed = operator.index(value)  # ints (numpy's too), not floats, strings or None
    except TypeError:
        raise ACTInputError(
            f"{what} must be a whole number from 0 to {MAX_SEED} (2**64 - 1), got {type(value).__name__} "
            f"{value!r}."
        ) from None
    if not 0 <= seed <= MAX_SEED:
        raise ACTInputError(
            f"{what} {seed} is out of range: seeds are whole numbers from 0 to {MAX_SEED} (2**64 - 1), what a "
            "64-bit generator takes."
        )
    return seed


def check_max_sequence_length(
    value: Any, maximum: int = MAX_SEQUENCE_LENGTH, what: str = "max_sequence_length"
) -> int:
    """The text encoder's prompt length in tokens (T5's, Qwen's, Mistral's, Gemma's: the families with a
    ``max_sequence_length``): an integer from 1 to ``maximum`` (their pipelines allow 512)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ACTInputError(
            f"{what} must be an integer from 1 to {maximum} (the prompt length in tokens; the pipeline "
            f"refuses more than {maximum}), got {value!r}."
        )
    return value


def check_omega_guard(shrinkage: Any, max_omega: Any) -> tuple[float, float]:
    """The Linear-AcT omega guard: ``shrinkage`` finite and >= 0, ``max_omega`` in (1, MAX_OMEGA_MAGNITUDE]."""
    values = []
    for name, value in (("shrinkage", shrinkage), ("max_omega", max_omega)):
        try:
            if isinstance(value, (bool, str, bytes)):  # float() reads True and "10": neither is meant
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise ACTInputError(f"{name} must be a number, got {value!r}.") from None
        if not math.isfinite(number):
            raise ACTInputError(
                f"{name} must be finite, got {number}. shrinkage is a number of pseudo-samples >= 0 (default 1; "
                f"0 is the paper's plain estimator); max_omega caps omega, from above 1 to {MAX_OMEGA_MAGNITUDE:g}."
            )
        values.append(number)
    shrinkage, max_omega = values
    if shrinkage < 0:
        raise ACTInputError(
            f"shrinkage must be >= 0 (pseudo-samples pulling omega toward 1; 0 turns the guard off), got "
            f"{shrinkage:g}."
        )
    if not 1 < max_omega <= MAX_OMEGA_MAGNITUDE:
        raise ACTInputError(
            f"max_omega must be above 1 and at most {MAX_OMEGA_MAGNITUDE:g} (maps hold |omega| up to that), "
            f"got {max_omega:g}."
        )
    return shrinkage, max_omega


def check_parts(parts: Any, known: Sequence[str], what: str = "part") -> tuple[str, ...]:
    """Part names given as a list (``["unet"]``), each one of ``known``; duplicates dropped, order kept.

    A bare string is refused: ``"unet"`` would otherwise be read letter by letter.
    """
    known = list(known)
    listed = ", ".join(map(repr, known)) or "none"
    if isinstance(parts, (str, bytes)):
        raise ACTInputError(
            f"The {what}s must be a list of names, not the single {type(parts).__name__} {parts!r} (it would be "
            f"read letter by letter); give a list, e.g. [{parts!r}]."
        )
    try:
        items = list(parts)
    except TypeError:
        raise ACTInputError(
            f"The {what}s must be a list of names, e.g. [{known[0] if known else 'unet'!r}], got "
            f"{type(parts).__name__}."
        ) from None
    for item in items:
        if not isinstance(item, str):
            raise ACTInputError(
                f"{what.capitalize()} names are strings, got {item!r}. The known ones are {listed}."
            )
    if not items:
        raise ACTInputError(f"Give at least one {what}; the known ones are {listed}.")
    unknown = [item for item in dict.fromkeys(items) if item not in known]
    if unknown:
        raise ACTInputError(
            f"No {what} named {', '.join(map(repr, unknown))}; the known {what}s are {listed}."
        )
    return tuple(dict.fromkeys(items))


def unknown_words(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Words of ``prompts`` that ``tokenizer`` only knows as single characters (out of its vocabulary).

    A byte-level BPE tokenizer never fails: an unknown word silently becomes one token per character,
    which the model never learned as a word (the shipped demo tokenizer knows only the caption words).
    Real CLIP tokenizers split rare words into sub-words, which this does not flag.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer (Flux2Pipeline)
    if tokenizer is None or not hasattr(tokenizer, "tokenize"):
        return []
    found: list[str] = []
    for prompt in prompts:
        for raw in prompt.split():
            word = raw.strip(".,;:!?()[]{}\"'").lower()
            if len(word) < 2 or word in found:
                continue
            pieces = [piece.replace("</w>", "") for piece in tokenizer.tokenize(word)]
            if len(pieces) > 1 and all(len(piece) == 1 for piece in pieces):
                found.append(word)
    return found


def warn_unknown_words(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Warn (``ACTWarning``) about prompt words the tokenizer does not know; returns them."""
    words = unknown_words(tokenizer, prompts)
    if words:
        warnings.warn(
            f"The tokenizer does not know {len(words)} word(s) of these prompts and splits them into characters: "
            f"{', '.join(words[:8])}. The model never learned them; use words of its vocabulary.",
            ACTWarning,
            stacklevel=3,
        )
    return words
