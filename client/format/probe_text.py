"""The probe-text codec: a packet's probe inputs as UTF-8 bytes, so a student with another tokenizer reads them.

``probe_text`` (U8) holds the texts back to back and ``probe_text_offsets`` [P + 1] (I64) where each
starts: text i is ``probe_text[offsets[i]:offsets[i + 1]]``. (``probe_tokens`` are ids in the teacher's
own vocabulary.) The teacher writes these tensors, the student reads them; neither needs the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import numpy as np

__all__ = ["PROBE_TEXT", "PROBE_TEXT_OFFSETS", "decode_probe_texts", "encode_probe_texts"]

PROBE_TEXT = "probe_text"
PROBE_TEXT_OFFSETS = "probe_text_offsets"


def encode_probe_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """``{"probe_text": (bytes,) uint8, "probe_text_offsets": (P + 1,) int64}`` for ``texts``."""
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.array([0, *accumulate(len(e) for e in encoded)], dtype=np.int64)
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {PROBE_TEXT: data, PROBE_TEXT_OFFSETS: offsets}


def decode_probe_texts(tensors: Mapping[str, Any]) -> list[str]:
    """The inverse of :func:`encode_probe_texts`, from a packet's tensors (numpy arrays or anything array-like)."""
    data = bytes(np.asarray(tensors[PROBE_TEXT], dtype=np.uint8))
    offsets = [int(o) for o in np.asarray(tensors[PROBE_TEXT_OFFSETS])]
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
