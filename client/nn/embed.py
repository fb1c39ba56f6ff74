"""Reading one vector per input: a layer's state at a position, or the mean over the input's tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from m2kt.errors import SpecError
from m2kt.nn.base import ModelAdapter
from m2kt.nn.select import select

__all__ = ["Pooling", "embed_texts", "resolve_pooling"]

Pooling = int | str  # "mean", "last", "first", or a token index (negative: from the end)


def resolve_pooling(lengths: Sequence[int], pooling: Pooling, texts: Sequence[str]) -> list[int | str]:
    """Per input: ``"mean"`` or an absolute token index (checked against its length)."""
    out: list[int | str] = []
    for text, n in zip(texts, lengths, strict=True):
        if pooling == "mean":
            out.append("mean")
            continue
        index = {"last": n - 1, "first": 0}.get(pooling, pooling) if isinstance(pooling, str) else pooling
        if not isinstance(index, int):
            raise SpecError(f"pooling {pooling!r}: use 'mean', 'last', 'first' or a token index")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise SpecError(f"position {pooling} is outside input {text[:60]!r}, which has {n} tokens")
        out.append(index)
    return out


def embed_texts(
    adapter: ModelAdapter, texts: Sequence[str], layer: str, pooling: Pooling = "mean", batch_size: int = 64
) -> torch.Tensor:
    """(N, d) float32 on the CPU, in the given order; run in length-sorted batches (little padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), adapter.d_model)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = [texts[i] for i in rows]
        batch = adapter.tokenize(chunk)
        positions = resolve_pooling(batch.lengths, pooling, chunk)
        ids, mask = batch.slice(0, len(rows), adapter.device)
        capture = adapter.forward(ids, mask, attention=False)
        out[rows] = select(capture.hidden[layer].float(), mask, positions).cpu()
    return out
