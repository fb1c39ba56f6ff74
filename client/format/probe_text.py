"""The probe-text codec: texts in a packet as UTF-8 bytes, so a student with another tokenizer reads them.

A list of texts is two tensors: ``<name>`` (U8) holds them back to back and ``<name>_offsets`` [P + 1]
(I64) where each starts — text i is ``data[offsets[i]:offsets[i + 1]]``. A packet carries its probe inputs
as ``probe_text`` (``probe_tokens`` are ids in the teacher's own vocabulary) and may carry the teacher's
own answer to each probe, its argmax output token, as ``probe_answer`` (an output of the probe's teacher
query, never a label), and public anchors as ``anchor_text`` beside the teacher's ``anchor_vectors``.
The teacher writes these tensors, the student reads them; neither needs the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import numpy as np

__all__ = [
    "ANCHOR_TEXT",
    "PROBE_ANSWER",
    "PROBE_TEXT",
    "PROBE_TEXT_OFFSETS",
    "decode_probe_texts",
    "decode_texts",
    "encode_probe_texts",
    "encode_texts",
    "has_texts",
]

PROBE_TEXT = "probe_text"
PROBE_TEXT_OFFSETS = "probe_text_offsets"
PROBE_ANSWER = "probe_answer"
ANCHOR_TEXT = "anchor_text"  # public anchors (their teacher vectors: anchor_vectors)


def encode_texts(texts: Sequence[str], name: str) -> dict[str, np.ndarray]:
    """``{name: (bytes,) uint8, name + "_offsets": (P + 1,) int64}`` for ``texts``."""
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.array([0, *accumulate(len(e) for e in encoded)], dtype=np.int64)
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {name: data, f"{name}_offsets": offsets}


def decode_texts(tensors: Mapping[str, Any], name: str) -> list[str]:
    """The inverse of :func:`encode_texts`, from a packet's tensors (numpy arrays or anything array-like)."""
    data = bytes(np.asarray(tensors[name], dtype=np.uint8))
    offsets = [int(o) for o in np.asarray(tensors[f"{name}_offsets"])]
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def has_texts(tensors: Mapping[str, Any], name: str) -> bool:
    return name in tensors and f"{name}_offsets" in tensors


def encode_probe_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The probe inputs: ``probe_text`` and ``probe_text_offsets``."""
    return encode_texts(texts, PROBE_TEXT)


def decode_probe_texts(tensors: Mapping[str, Any]) -> list[str]:
    return decode_texts(tensors, PROBE_TEXT)
