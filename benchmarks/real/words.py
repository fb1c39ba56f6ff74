"""Anchors that need no shared corpus: a public word list both tokenizers cover.

The list is ``/usr/share/dict/words`` (Debian package ``wamerican``: ``apt-get install wamerican``);
a word is kept if it is lower-case ASCII letters, 4–12 long, and each tokenizer reads it as one
known token (no pieces, no unknown token) — so both models see the same unit. Without the list the
words are the two vocabularies' shared whole words, and the source says so.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["WORD_LIST", "covered_words"]

WORD_LIST = Path("/usr/share/dict/words")
_WORD = re.compile(r"[a-z]{4,12}")


def _single_token(tokenizer: Any, word: str) -> bool:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def covered_words(tokenizers: Sequence[Any], count: int, *, seed: int = 0) -> tuple[list[str], str]:
    """(``count`` words every tokenizer reads as one token, in a seeded order; their source)."""
    if WORD_LIST.is_file():
        candidates = sorted({w for w in WORD_LIST.read_text(encoding="utf-8").split() if _WORD.fullmatch(w)})
        source = f"wordlist:{WORD_LIST}"
    else:
        vocabs = [set(t.get_vocab()) for t in tokenizers]
        candidates = sorted(w for w in set.intersection(*vocabs) if _WORD.fullmatch(w))
        source = "vocabulary:shared-whole-words"
    words = [w for w in candidates if all(_single_token(t, w) for t in tokenizers)]
    random.Random(seed).shuffle(words)
    if len(words) < count:
        raise RuntimeError(f"only {len(words)} words are covered by both tokenizers (asked for {count})")
    return words[:count], f"{source} ({len(words)} covered by both tokenizers; {count} drawn)"
