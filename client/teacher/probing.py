"""Run the probe inputs through the teacher once, keeping what every extraction step needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from m2kt.errors import SpecError
from m2kt.nn.base import ModelAdapter
from m2kt.nn.batch import Batch
from m2kt.nn.select import select
from m2kt.teacher.spec import PacketSpec, Position

__all__ = ["ProbeRun", "pool_attention", "resolve_positions", "run_probes"]


@dataclass
class ProbeRun:
    """Hidden states of every probe input (on the CPU, float32)."""

    texts: list[str]
    batch: Batch
    positions: list[Position]  # per probe: the position its states are read at
    concept_layer: str
    full: torch.Tensor  # (P, L, d) states at the concept layer, every position (padding zeroed)
    at_position: dict[str, torch.Tensor]  # layer -> (P, d) states at each probe's position
    attention: torch.Tensor | None  # (P, layers', heads', L, L) after pooling
    predicted: torch.Tensor | None  # (P,) long: the teacher's argmax output at each probe's position
    answered: torch.Tensor | None  # (P,) long: the teacher's argmax output at each probe's last token
    forward_passes: int


def resolve_positions(lengths: Sequence[int], positions: Sequence[Position], texts: Sequence[str]) -> list[Position]:
    """Turn 'last' and negative indices into absolute token indices (``'mean'`` stays); check bounds."""
    resolved: list[Position] = []
    for text, length, position in zip(texts, lengths, positions, strict=True):
        if position == "mean":
            resolved.append("mean")
            continue
        index = length - 1 if position == "last" else int(position)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise SpecError(f"position {position} is outside probe input {text!r}, which has {length} tokens")
        resolved.append(index)
    return resolved


def pool_attention(attn: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, layers, H, T, T) → pooled over heads, layers or both (kept as size-1 dimensions)."""
    if pool in ("heads", "all"):
        attn = attn.mean(dim=2, keepdim=True)
    if pool in ("layers", "all"):
        attn = attn.mean(dim=1, keepdim=True)
    return attn


def probe_positions(spec: PacketSpec, texts: Sequence[str]) -> list[Position]:
    """Each probe's position: the override of the first named concept listing it, else the spec's."""
    chosen: dict[str, Position] = {}
    for probe in spec.concepts.named:
        if probe.position is not None:
            for text in probe.inputs:
                chosen.setdefault(text, probe.position)
    return [chosen.get(text, spec.position) for text in texts]


def run_probes(
    adapter: ModelAdapter,
    spec: PacketSpec,
    texts: Sequence[str],
    batch: Batch,
    *,
    layer: str,
    trace_layers: Sequence[str],
    on_progress: Callable[[int], None] = lambda n: None,
) -> ProbeRun:
    """Forward every probe in batches; keep the concept layer whole, other layers at the probe's position."""
    positions = resolve_positions(batch.lengths, probe_positions(spec, texts), texts)
    want_attention = spec.attention.enabled
    width = batch.input_ids.shape[1]
    layers = list(dict.fromkeys([layer, *trace_layers]))
    full_rows: list[torch.Tensor] = []
    picked: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    attention_rows: list[torch.Tensor] = []
    predicted_rows: list[torch.Tensor] = []
    answered_rows: list[torch.Tensor] = []
    passes = 0
    for start in range(0, len(batch), spec.batch_size):
        stop = min(start + spec.batch_size, len(batch))
        ids, mask = batch.slice(start, stop, adapter.device)
        capture = adapter.forward(ids, mask, attention=want_attention)
        passes += stop - start
        rows = positions[start:stop]
        for name in layers:
            states = capture.hidden[name].float()  # (B, T, d)
            picked[name].append(select(states, mask, rows).cpu())
        states = capture.hidden[layer].float() * mask.unsqueeze(-1)
        full_rows.append(torch.nn.functional.pad(states, (0, 0, 0, width - states.shape[1])).cpu())
        if want_attention:
            attn = torch.stack([a.float() for a in capture.attentions or []], dim=1)  # (B, layers, H, T, T)
            attn = pool_attention(attn, spec.attention.pool)
            pad = width - attn.shape[-1]
            attention_rows.append(torch.nn.functional.pad(attn, (0, pad, 0, pad)).cpu())
        if capture.logits is not None:
            last = [p if p != "mean" else n - 1 for p, n in zip(rows, batch.lengths[start:stop], strict=True)]
            logits = select(capture.logits.float(), mask, last)
            predicted_rows.append(logits.argmax(-1).cpu())
            final = [n - 1 for n in batch.lengths[start:stop]]
            answered_rows.append(select(capture.logits.float(), mask, final).argmax(-1).cpu())
        on_progress(stop - start)
    return ProbeRun(
        texts=list(texts),
        batch=batch,
        positions=positions,
        concept_layer=layer,
        full=torch.cat(full_rows),
        at_position={name: torch.cat(rows) for name, rows in picked.items()},
        attention=torch.cat(attention_rows) if want_attention else None,
        predicted=torch.cat(predicted_rows) if predicted_rows else None,
        answered=torch.cat(answered_rows) if answered_rows else None,
        forward_passes=passes,
    )
