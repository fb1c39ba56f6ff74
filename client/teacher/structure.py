"""The packet's structure beyond concepts: attention maps A, reasoning traces R, abstraction graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from m2kt.nn.base import ModelAdapter
from m2kt.nn.batch import Batch
from m2kt.teacher.concepts import ConceptSet
from m2kt.teacher.probing import ProbeRun
from m2kt.teacher.spec import PacketSpec

__all__ = ["abstraction_graph", "concept_attention", "decode_traces", "layer_traces"]


def concept_attention(run: ProbeRun, concepts: ConceptSet) -> torch.Tensor:
    """(K, layers', heads', L, L): the mean attention map over each concept's member probes.

    A concept with no member probe (possible for attribution toward explicit targets) gets the
    mean over all probes, so every row is a valid distribution.
    """
    assert run.attention is not None
    overall = run.attention.mean(0)
    rows = []
    for k in range(len(concepts)):
        chosen = torch.nonzero(concepts.members == k).flatten()
        rows.append(run.attention[chosen].mean(0) if len(chosen) else overall)
    return torch.stack(rows)


def layer_traces(run: ProbeRun, layers: Sequence[str]) -> torch.Tensor:
    """(P, m, d): each probe's state at its position through the m readable layers."""
    return torch.stack([run.at_position[name] for name in layers], dim=1)


def decode_traces(
    adapter: ModelAdapter,
    batch: Batch,
    steps: int,
    batch_size: int,
    on_progress: Callable[[int], None] = lambda n: None,
) -> tuple[torch.Tensor, int]:
    """(P, m, d): the last layer's state at each of m greedy decoding steps; and the passes used.

    Step s feeds the probe plus the s tokens the teacher generated so far and records the
    final layer's state at the last token — the state that chooses the next token.
    """
    last_layer = adapter.layer_names[-1]
    traces: list[torch.Tensor] = []
    passes = 0
    for start in range(0, len(batch), batch_size):
        stop = min(start + batch_size, len(batch))
        ids, mask = batch.slice(start, stop, adapter.device)
        lengths = torch.tensor(batch.lengths[start:stop], device=adapter.device)
        ids = torch.nn.functional.pad(ids, (0, steps))
        mask = torch.nn.functional.pad(mask, (0, steps))
        rows = torch.arange(stop - start, device=adapter.device)
        states = []
        for _ in range(steps):
            width = int(lengths.max())
            capture = adapter.forward(ids[:, :width], mask[:, :width], attention=False)
            at = lengths - 1
            states.append(capture.hidden[last_layer][rows, at].float().cpu())  # (B, d)
            assert capture.logits is not None
            nxt = capture.logits[rows, at].argmax(-1)
            ids[rows, lengths] = nxt
            mask[rows, lengths] = True
            lengths = lengths + 1
            passes += stop - start
        traces.append(torch.stack(states, dim=1))
        on_progress(0)
    return torch.cat(traces), passes


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def abstraction_graph(concepts: ConceptSet, run: ProbeRun, spec: PacketSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept-to-concept relations as an edge list: (E, 2) int32 pairs i < j and (E,) weights.

    ``similarity``: cosine between concept vectors. ``coactivation``: Pearson correlation,
    across probes, of how strongly each concept is present in a probe's state (its cosine to
    the concept vector).
    """
    if spec.graph.method == "similarity":
        weights = _cosine_matrix(concepts.vectors, concepts.vectors)
    else:
        activation = _cosine_matrix(run.at_position[run.concept_layer], concepts.vectors)  # (P, K)
        centred = activation - activation.mean(0, keepdim=True)
        scale = centred.norm(dim=0).clamp_min(1e-12)
        weights = (centred.T @ centred) / (scale[:, None] * scale[None, :])
    k = weights.shape[0]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)
    chosen = torch.nonzero(upper & (weights >= spec.graph.threshold))  # (E, 2), row-major order
    return chosen.to(torch.int32), weights[chosen[:, 0], chosen[:, 1]].float()
