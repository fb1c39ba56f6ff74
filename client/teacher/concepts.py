"""Concept extraction: named probes, clustering, or gradient attribution → C = [K, d_T]."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from m2kt.errors import SpecError
from m2kt.nn.base import ModelAdapter
from m2kt.nn.select import select
from m2kt.teacher.kmeans import kmeans
from m2kt.teacher.probing import ProbeRun, resolve_positions
from m2kt.teacher.spec import PacketSpec

__all__ = ["ConceptSet", "attribution_concepts", "clustering_concepts", "extract_concepts", "named_concepts"]


@dataclass
class ConceptSet:
    ids: list[str]
    labels: list[str]
    kind: str
    vectors: torch.Tensor  # (K, d) float32, CPU
    members: torch.Tensor  # (P,) int32: the concept each probe belongs to, -1 for none
    params: dict[str, Any] = field(default_factory=dict)
    forward_passes: int = 0  # teacher passes beyond the probe run (attribution)

    def __len__(self) -> int:
        return len(self.ids)


def named_concepts(run: ProbeRun, spec: PacketSpec) -> ConceptSet:
    """A concept per labelled probe set: the mean hidden state at its position in the concept layer."""
    index = {text: i for i, text in enumerate(run.texts)}
    members = torch.full((len(run.texts),), -1, dtype=torch.int32)
    vectors = []
    for k, probe in enumerate(spec.concepts.named):
        rows = [index[text] for text in probe.inputs]
        position = probe.position if probe.position is not None else spec.position
        lengths = [run.batch.lengths[r] for r in rows]
        positions = resolve_positions(lengths, [position] * len(rows), probe.inputs)
        states = select(run.full[rows], run.batch.mask[rows, : run.full.shape[1]], positions)  # (n, d)
        vectors.append(states.mean(0))
        for r in rows:
            if members[r] < 0:
                members[r] = k
    labels = [p.label for p in spec.concepts.named]
    return ConceptSet(
        ids=[f"c{k}" for k in range(len(labels))],
        labels=labels,
        kind="named",
        vectors=torch.stack(vectors),
        members=members,
        params={
            "layer": run.concept_layer,
            "position": spec.position,
            "probes_per_concept": [len(p.inputs) for p in spec.concepts.named],
            "statistic": "mean hidden state",
        },
    )


def clustering_concepts(run: ProbeRun, spec: PacketSpec, device: torch.device) -> ConceptSet:
    """k-means over every probe's state at the concept layer; clusters numbered by their first member."""
    cfg = spec.concepts.clustering
    points = run.at_position[run.concept_layer].to(device)  # (P, d)
    result = kmeans(
        points, cfg.k, seed=spec.seed, iterations=cfg.iterations, restarts=cfg.restarts, tolerance=cfg.tolerance
    )
    assignment = result.assignment.cpu()
    first = {}
    for p, c in enumerate(assignment.tolist()):
        first.setdefault(c, p)
    order = sorted(first, key=first.__getitem__)  # clusters that got no points cannot exist after re-seeding
    renumber = {old: new for new, old in enumerate(order)}
    members = torch.tensor([renumber[c] for c in assignment.tolist()], dtype=torch.int32)
    centroids = result.centroids.cpu()[order]
    sizes = torch.bincount(members.long(), minlength=len(order)).tolist()
    return ConceptSet(
        ids=[f"c{k}" for k in range(len(order))],
        labels=[f"cluster:{k}" for k in range(len(order))],
        kind="cluster",
        vectors=centroids.float(),
        members=members,
        params={
            "layer": run.concept_layer,
            "k": cfg.k,
            "init": "k-means++",
            "seed": spec.seed,
            "restarts": cfg.restarts,
            "iterations": result.iterations,
            "inertia": round(result.inertia, 6),
            "sizes": sizes,
        },
    )


def layer_baseline(adapter: ModelAdapter, run: ProbeRun, spec: PacketSpec, layer: str) -> tuple[torch.Tensor, int]:
    """The IG baseline at ``layer``: the mean probe state at each position, (L, d); and passes used.

    A zero baseline is a poor start inside a transformer: LayerNorm downstream is scale-invariant,
    so the output jumps in a sliver of the path near zero that a Riemann sum cannot resolve (IG's
    completeness was off by up to 3x on our TinyTransformer at 256 steps). The mean state keeps
    the whole path at ordinary norms; attributions then sum to F(h) - F(mean state).
    """
    if layer == run.concept_layer:
        mask = run.batch.mask[:, : run.full.shape[1]].unsqueeze(-1).float()  # (P, L, 1)
        return (run.full * mask).sum(0) / mask.sum(0).clamp_min(1.0), 0
    total = None
    count = None
    passes = 0
    for start in range(0, len(run.texts), spec.batch_size):
        stop = min(start + spec.batch_size, len(run.texts))
        ids, mask = run.batch.slice(start, stop, adapter.device)
        states = adapter.forward(ids, mask, attention=False).hidden[layer].float() * mask.unsqueeze(-1)
        states = torch.nn.functional.pad(states, (0, 0, 0, run.full.shape[1] - states.shape[1])).sum(0).cpu()
        counts = torch.nn.functional.pad(mask.sum(0).float(), (0, run.full.shape[1] - mask.shape[1])).cpu()
        total = states if total is None else total + states
        count = counts if count is None else count + counts
        passes += stop - start
    assert total is not None and count is not None
    return total / count.clamp_min(1.0).unsqueeze(-1), passes


def _integrated_gradients(
    adapter: ModelAdapter,
    run: ProbeRun,
    spec: PacketSpec,
    layer: str,
    targets: torch.Tensor,
    on_progress: Callable[[int], None],
    baseline: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """IG at ``layer`` from ``baseline`` (L, d) toward ``targets[p]`` (an output class), every probe.

    Returns attributions (P, L, d) = (h - baseline) × mean path gradient (midpoint rule), and
    the teacher passes used (one forward + backward per step and probe).
    """
    steps = spec.concepts.attribution.steps
    width = run.batch.input_ids.shape[1]
    start_point = baseline.to(adapter.device)
    out: list[torch.Tensor] = []
    passes = 0
    for start in range(0, len(run.texts), spec.batch_size):
        stop = min(start + spec.batch_size, len(run.texts))
        ids, mask = run.batch.slice(start, stop, adapter.device)
        rows = torch.arange(stop - start, device=adapter.device)
        at = torch.tensor(
            [
                p if p != "mean" else n - 1
                for p, n in zip(run.positions[start:stop], run.batch.lengths[start:stop], strict=True)
            ],
            device=adapter.device,
        )
        goal = targets[start:stop].to(adapter.device)
        total = None
        hidden = None
        for s in range(steps):
            alpha = (s + 0.5) / steps
            logits, point, hidden = adapter.forward_interpolated(ids, mask, layer, alpha, start_point)
            logits[rows, at, goal].sum().backward()
            grad = point.grad.float()  # (B, T, d)
            total = grad if total is None else total + grad
            passes += stop - start
        assert total is not None and hidden is not None
        attr = (hidden.float() - start_point[: hidden.shape[1]]) * (total / steps) * mask.unsqueeze(-1)
        out.append(torch.nn.functional.pad(attr, (0, 0, 0, width - attr.shape[1])).cpu())
        on_progress(0)
    return torch.cat(out), passes


def attribution_concepts(
    adapter: ModelAdapter, run: ProbeRun, spec: PacketSpec, on_progress: Callable[[int], None]
) -> ConceptSet:
    """Integrated gradients toward target outputs; keep the most attributed targets as concepts."""
    cfg = spec.concepts.attribution
    if cfg.targets == "predicted":
        if run.predicted is None:
            raise SpecError("attribution toward 'predicted' targets needs a model with output logits")
        per_probe = [run.predicted.clone()]
        target_ids = sorted(set(run.predicted.tolist()))
    else:
        target_ids = [adapter.output_token_id(t) for t in cfg.targets]
        per_probe = [torch.full((len(run.texts),), t, dtype=torch.long) for t in target_ids]

    layer = adapter.layer_names[0] if cfg.mode == "tokens" else run.concept_layer
    vectors: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    detail: dict[int, list[Any]] = {}
    baseline, passes = layer_baseline(adapter, run, spec, layer)
    members = torch.full((len(run.texts),), -1, dtype=torch.long)  # target id per probe, remapped below
    for targets in per_probe:
        attr, used = _integrated_gradients(adapter, run, spec, layer, targets, on_progress, baseline)  # (P, L, d)
        passes += used
        for t in sorted(set(targets.tolist())):
            rows = torch.nonzero(targets == t).flatten()
            if cfg.mode == "dimensions":
                at = [run.positions[r] for r in rows.tolist()]
                vec = select(attr[rows], run.batch.mask[rows, : attr.shape[1]], at).mean(0)  # (d,)
                keep = vec.abs().topk(min(cfg.top, vec.numel())).indices
                masked = torch.zeros_like(vec)
                masked[keep] = vec[keep]
                vectors[t], counts[t] = masked, len(rows)
                detail[t] = sorted(int(i) for i in keep.tolist())
            else:
                scores = attr[rows].sum(-1).abs()  # (n, L): attribution of each input token
                top = scores.argmax(-1)  # (n,)
                vectors[t] = run.full[rows, top].mean(0)
                counts[t] = len(rows)
                tokens = run.batch.input_ids[rows, top].tolist()
                detail[t] = sorted({adapter.output_token(i) if adapter.has_logits else str(i) for i in tokens})
            if cfg.targets == "predicted":
                members[rows] = t
    mass = {t: float(v.abs().sum()) for t, v in vectors.items()}
    kept = sorted(vectors, key=lambda t: (-mass[t], t))[: cfg.max_concepts]
    kept.sort()
    labels = [f"target:{adapter.output_token(t)}" for t in kept]
    remap = {t: k for k, t in enumerate(kept)}
    member_ids = torch.tensor([remap.get(int(t), -1) for t in members.tolist()], dtype=torch.int32)
    return ConceptSet(
        ids=[f"c{k}" for k in range(len(kept))],
        labels=labels,
        kind="attribution",
        vectors=torch.stack([vectors[t] for t in kept]).float(),
        members=member_ids,
        params={
            "layer": layer,
            "mode": cfg.mode,
            "targets": cfg.targets if cfg.targets == "predicted" else list(cfg.targets),
            "ig_steps": cfg.steps,
            "baseline": "mean probe state per position",
            "top": cfg.top,
            "kept": [
                {"target": adapter.output_token(t), "probes": counts[t], "mass": round(mass[t], 6), "top": detail[t]}
                for t in kept
            ],
        },
        forward_passes=passes,
    )


def extract_concepts(
    adapter: ModelAdapter, run: ProbeRun, spec: PacketSpec, on_progress: Callable[[int], None] = lambda n: None
) -> ConceptSet:
    method = spec.concepts.method
    if method == "named":
        return named_concepts(run, spec)
    if method == "clustering":
        return clustering_concepts(run, spec, adapter.device)
    return attribution_concepts(adapter, run, spec, on_progress)
