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
