"""Offline CLIP tokenizers for the demo model, built from the caption vocabulary.

CLIP's tokenizer is byte-level BPE: a vocab of the 256 byte symbols (plus their end-of-word forms), the
merged pieces, and two special tokens. We write the files ourselves so nothing is downloaded: every
caption word becomes one token, and any other text still tokenizes (falling back to characters).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from .shapes import caption_words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 16


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE uses (GPT-2 / CLIP convention)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + n)
            n += 1
    order = keep + [b for b in range(256) if b not in keep]
    mapping = dict(zip(order, chars, strict=True))
    return [chr(mapping[b]) for b in range(256)]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank-first BPE, as the CLIP tokenizer does it."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i)
            for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merge list under which each word in `words` is a single token.

    Merges are appended word by word, each only after the existing merges have done what they can, so a
    later word never changes how an earlier one splits (new merges always rank below the old ones).
    """
    base = _bytes_to_unicode()
    vocab_tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1], *symbols[2:]]
    vocab_tokens = list(dict.fromkeys(vocab_tokens)) + [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_tokens)}, merges


def save_tokenizer(folder: str | Path, model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Write vocab.json + merges.txt + configs to `folder` and return the loaded tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(caption_words())
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


# ---------------------------------------------------------------- Qwen's byte-level BPE (Z-Image, Qwen-Image)

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's chat template for one user message and the generation prompt, without the thinking part (which
# ZImagePipeline's ``enable_thinking=True`` leaves out): what the real Z-Image tokenizer renders.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_words(text: str) -> list[str]:
    """The letter runs of ``text`` as Qwen2's pre-tokenizer cuts them: a word after a space carries it."""
    import re

    for special in QWEN_SPECIAL:
        text = text.replace(special, "\n")
    return re.findall(r" ?[A-Za-z]+", text)


def save_qwen_tokenizer(folder: str | Path, text: str = "", chat_template: str | None = None):
    """A byte-level BPE ``Qwen2Tokenizer`` (the tokenizer class of Qwen3 and Qwen2.5-VL) written to ``folder``.

    Every byte is a token, and merges spell whole, as Qwen's own tokenizer does, every caption word (alone
    and after a space) and every word of ``text`` (the pipeline's prompt template), so the templates count
    the tokens they count with the real tokenizer. Special tokens: ``<|endoftext|>`` (padding),
    ``<|im_start|>``, ``<|im_end|>`` (EOS). Merges are added word by word as in ``build_vocab_and_merges``,
    so no word's merges change how another splits.
    """
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    symbols = _bytes_to_unicode()
    space = symbols[ord(" ")]
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    captions = [w for w in caption_words() if w.isalpha()]
    words = _qwen_words(text) + captions + [" " + w for w in captions]
    for word in dict.fromkeys(words):
        pieces = _apply_merges(list(word.replace(" ", space)), ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    for special in QWEN_SPECIAL:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
