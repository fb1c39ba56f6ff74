"""Algorithm 1: a teacher model and a spec in, a signed knowledge packet out.

    path = build_packet(model, spec, key, "arith.m2kt")

Steps: check the spec against the model (cheap; every problem is a :class:`SpecError`
before any heavy work) → run the probes once → concepts → attention / traces / graph →
safety scores → manifest with honest data usage → :func:`m2kt.format.writer.write_packet`.
On the CPU the same model, spec and seed give the same packet bytes (pass ``created_at``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2kt.errors import SpecError
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import (
    AnchorInfo,
    AnchorSet,
    ConceptEntry,
    DataUsage,
    ExtractionInfo,
    ExtractionStep,
    ManifestBody,
    SafetyInfo,
    TeacherInfo,
)
from m2kt.format.probe_text import ANCHOR_TEXT, PROBE_ANSWER, encode_probe_texts, encode_texts
from m2kt.format.writer import write_packet
from m2kt.nn.adapters import adapter_for
from m2kt.nn.base import ModelAdapter
from m2kt.nn.batch import Batch
from m2kt.nn.device import pick_device
from m2kt.nn.embed import embed_texts
from m2kt.nn.programs import Template
from m2kt.nn.select import select
from m2kt.teacher.concepts import ConceptSet, extract_concepts
from m2kt.teacher.decompose import Decomposition, declare_decomposition
from m2kt.teacher.probing import probe_positions, resolve_positions, run_probes
from m2kt.teacher.safety import CosineFlaggedScorer, SafetyScorer, load_flagged_directions
from m2kt.teacher.spec import PacketSpec
from m2kt.teacher.structure import abstraction_graph, concept_attention, decode_traces, layer_traces

__all__ = ["Extraction", "Plan", "build_packet", "check_spec", "extract"]

Progress = Callable[[int], None]


@dataclass
class Plan:
    """A spec checked against a model: what will run, already tokenised."""

    adapter: ModelAdapter
    spec: PacketSpec
    layer: str
    trace_layers: list[str]
    texts: list[str]
    batch: Batch
    flagged: Batch | None
    flagged_directions: torch.Tensor | None  # from safety.flagged_file

    @property
    def total_probes(self) -> int:
        return len(self.texts) + (len(self.flagged) if self.flagged is not None else 0)


@dataclass
class Extraction:
    """Everything that goes into the packet, before signing."""

    body: ManifestBody
    tensors: dict[str, np.ndarray]
    concepts: ConceptSet
    scores: torch.Tensor  # (K,)


def check_spec(adapter: ModelAdapter, spec: PacketSpec) -> Plan:
    """Check ``spec`` against the model without running it; tokenise the probes."""
    names = adapter.layer_names
    layer = spec.layer or names[-1]
    if layer not in adapter.readable_layers:
        raise SpecError(
            f"layer {layer!r} does not exist in {adapter.model_name}; readable layers: "
            f"{', '.join(adapter.readable_layers)}"
        )
    if spec.attention.enabled and adapter.n_attention_layers == 0:
        raise SpecError(f"attention was asked for but {adapter.model_name} exposes no attention modules")
    needs_logits = (
        spec.concepts.method == "attribution"
        or (spec.traces.enabled and spec.traces.source == "decode")
        or spec.answers
    )
    if needs_logits and not adapter.has_logits:
        what = (
            "attribution"
            if spec.concepts.method == "attribution"
            else "decode traces"
            if spec.traces.enabled and spec.traces.source == "decode"
            else "answers"
            if spec.answers
            else "a declared decomposition"
        )
        raise SpecError(f"{what} needs output logits, and {adapter.model_name} has no output head")
    if spec.concepts.method == "attribution" and spec.concepts.attribution.targets != "predicted":
        for token in spec.concepts.attribution.targets:
            adapter.output_token_id(token)
    private = spec.private_inputs()
    for anchors, inputs in spec.anchor_inputs():
        clash = [t for t in inputs if t in private]
        if clash:
            raise SpecError(
                f"anchors ({anchors.source}): {len(clash)} of them are inputs of private concepts, e.g. "
                f"{clash[0][:60]!r} — anchors travel as text; remove them or make those concepts public"
            )
    texts = spec.probe_inputs()
    batch = adapter.tokenize(texts)
    resolve_positions(batch.lengths, probe_positions(spec, texts), texts)
    index = {t: i for i, t in enumerate(texts)}
    for probe in spec.concepts.named:
        if probe.position is not None:
            rows = [index[t] for t in probe.inputs]
            resolve_positions([batch.lengths[r] for r in rows], [probe.position] * len(rows), probe.inputs)
    if spec.traces.enabled and spec.traces.source == "decode" and adapter.max_length is not None:
        longest = max(batch.lengths) + (spec.traces.steps or 0)
        if longest > adapter.max_length:
            raise SpecError(
                f"decode traces of {spec.traces.steps} steps need {longest} positions; "
                f"the model takes at most {adapter.max_length}"
            )
    flagged = None
    if spec.safety.flagged:
        flagged_texts = [t for probe in spec.safety.flagged for t in probe.inputs]
        flagged = adapter.tokenize(flagged_texts)
        positions = [p.position if p.position is not None else spec.position for p in spec.safety.flagged]
        expanded = [pos for probe, pos in zip(spec.safety.flagged, positions, strict=True) for _ in probe.inputs]
        resolve_positions(flagged.lengths, expanded, flagged_texts)
    directions = (
        load_flagged_directions(spec.safety.flagged_file, adapter.d_model) if spec.safety.flagged_file else None
    )
    if spec.safety.scorer != CosineFlaggedScorer.name:
        raise SpecError(
            f"safety.scorer {spec.safety.scorer!r} is not built in; pass scorer= to build_packet "
            f"(built in: {CosineFlaggedScorer.name})"
        )
    trace_layers = list(names) if spec.traces.enabled and spec.traces.source == "layers" else []
    return Plan(adapter, spec, layer, trace_layers, texts, batch, flagged, directions)


def _flagged_states(plan: Plan) -> tuple[torch.Tensor, int]:
    """One direction per flagged probe set: its mean state at the concept layer."""
    spec, adapter = plan.spec, plan.adapter
    assert plan.flagged is not None
    positions = [p.position if p.position is not None else spec.position for p in spec.safety.flagged for _ in p.inputs]
    texts = [t for p in spec.safety.flagged for t in p.inputs]
    positions = resolve_positions(plan.flagged.lengths, positions, texts)
    states = []
    for start in range(0, len(texts), spec.batch_size):
        stop = min(start + spec.batch_size, len(texts))
        ids, mask = plan.flagged.slice(start, stop, adapter.device)
        capture = adapter.forward(ids, mask, attention=False)
        states.append(select(capture.hidden[plan.layer].float(), mask, positions[start:stop]).cpu())
    all_states = torch.cat(states)
    directions, offset = [], 0
    for probe in spec.safety.flagged:
        directions.append(all_states[offset : offset + len(probe.inputs)].mean(0))
        offset += len(probe.inputs)
    return torch.stack(directions), len(texts)


def _declare(adapter: ModelAdapter, spec: PacketSpec, texts: list[str], answers: list[str]) -> Decomposition:
    """The teacher's own search for a decomposition of ``spec.decompose.operator`` (its passes are counted)."""
    d = spec.decompose
    assert d.operator is not None
    template = Template(d.template)
    operands = list(d.operands) if d.operands is not None else _operands(template, texts)
    return declare_decomposition(adapter.predict, template, d.operator, list(d.known), operands, texts, answers)


def _operands(template: Template, texts: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for text in texts:
        slots = template.parse(text)
        if slots is not None:
            seen.update(dict.fromkeys((slots[0], slots[2])))
    return list(seen)


def _as_array(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    t = tensor.detach().to("cpu").contiguous()
    if t.is_floating_point():
        t = t.to(torch.float16 if dtype == "float16" else torch.float32)
    return t.numpy()


def extract(
    model: Any,
    spec: PacketSpec,
    *,
    tokenizer: Any = None,
    scorer: SafetyScorer | None = None,
    teacher_node: str | None = None,
    created_at: datetime | None = None,
    progress: Callable[[int], Any] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> Extraction:
    """Run Algorithm 1 without writing: the manifest body and tensors of the packet."""
    adapter = adapter_for(model, tokenizer)
    plan = check_spec(adapter, spec)
    if on_plan is not None:
        on_plan(plan)
    advance: Progress = progress or (lambda n: None)
    if spec.device != "auto":  # 'auto' keeps the model where it is
        target = pick_device(spec.device)
        if target != adapter.device:
            adapter.model.to(target)
            adapter.device = target
    torch.manual_seed(spec.seed)
    with adapter.frozen():
        run = run_probes(
            adapter, spec, plan.texts, plan.batch, layer=plan.layer, trace_layers=plan.trace_layers, on_progress=advance
        )
        passes = run.forward_passes
        concepts = extract_concepts(adapter, run, spec, advance)
        passes += concepts.forward_passes
        tensors: dict[str, torch.Tensor] = {
            "concepts": concepts.vectors,  # (K, d_T)
            "concept_members": concepts.members,  # (P,)
            "probe_tokens": plan.batch.input_ids.to(torch.int32),  # (P, L)
            "probe_lengths": torch.tensor(plan.batch.lengths, dtype=torch.int32),  # (P,)
            "probe_positions": torch.tensor([-1 if p == "mean" else p for p in run.positions], dtype=torch.int32),
        }
        steps: dict[str, ExtractionStep | None] = {"attention": None, "traces": None, "graph": None}
        if spec.attention.enabled:
            attention = run.attention if spec.attention.per == "probe" else concept_attention(run, concepts)
            tensors["attention"] = attention  # (K or P, layers', heads', L, L)
            steps["attention"] = ExtractionStep(
                method="attention-probabilities",
                params={
                    "per": spec.attention.per,
                    "pool": spec.attention.pool,
                    "layers": adapter.n_attention_layers,
                    "shape": list(attention.shape),
                },
            )
        if spec.traces.enabled:
            if spec.traces.source == "layers":
                traces = layer_traces(run, plan.trace_layers)
                params: dict[str, Any] = {"layers": plan.trace_layers}
            else:
                traces, used = decode_traces(adapter, plan.batch, spec.traces.steps or 1, spec.batch_size, advance)
                passes += used
                params = {"decode": "greedy", "layer": adapter.layer_names[-1]}
            tensors["traces"] = traces  # (P, m, d_T)
            steps["traces"] = ExtractionStep(
                method=f"hidden-states-{spec.traces.source}", params={**params, "steps": traces.shape[1]}
            )
        answers: list[str] = []
        declared_queries = 0
        if spec.answers or spec.decompose.operator is not None:
            assert run.answered is not None, "check_spec requires logits for answers and decompositions"
            answers = [adapter.output_token(int(i)) for i in run.answered]
            params: dict[str, Any] = {"answers": PROBE_ANSWER, "position": "last", "decode": "argmax"}
            if spec.decompose.operator is not None:
                found = _declare(adapter, spec, plan.texts, answers)
                params["decomposition"] = found.as_params()
                declared_queries = found.forward_passes
                passes += found.forward_passes
            if not spec.answers:
                answers = []
                del params["answers"]
            if steps["traces"] is not None:
                steps["traces"] = ExtractionStep(
                    method=steps["traces"].method, params={**steps["traces"].params, **params}
                )
            else:
                steps["traces"] = ExtractionStep(method="teacher-answers", params=params)
        if spec.graph.enabled:
            edges, weights = abstraction_graph(concepts, run, spec)
            tensors["graph_edges"], tensors["graph_weights"] = edges, weights  # (E, 2), (E,)
            steps["graph"] = ExtractionStep(
                method=spec.graph.method, params={"threshold": spec.graph.threshold, "edges": len(edges)}
            )
        flagged_queries = 0
        if scorer is None:
            parts = []
            if plan.flagged is not None:
                states, flagged_queries = _flagged_states(plan)
                passes += flagged_queries
                parts.append(states)
            if plan.flagged_directions is not None:
                parts.append(plan.flagged_directions)
            directions = torch.cat(parts) if parts else torch.zeros(0, adapter.d_model)
            origin = run.at_position[plan.layer].mean(0) if concepts.kind != "attribution" else None
            scorer = CosineFlaggedScorer(directions, origin)
        scores = scorer.score(concepts.vectors).float().clamp(0.0, 1.0)
        anchor_sets = spec.anchor_inputs()
        anchor_texts = [t for _, texts in anchor_sets for t in texts]
        if anchor_texts:
            tensors["anchor_vectors"] = embed_texts(  # (N, d_T): the teacher's vectors of public inputs
                adapter, anchor_texts, plan.layer, spec.position, spec.batch_size
            )
            passes += len(anchor_texts)
    advance(0)

    # Only public inputs travel: drop every per-probe row of a private named concept's inputs.
    hidden = spec.private_inputs()
    keep = [i for i, t in enumerate(plan.texts) if t not in hidden]
    if len(keep) < len(plan.texts):
        rows = torch.tensor(keep, dtype=torch.long)
        for name in ("concept_members", "probe_tokens", "probe_lengths", "probe_positions", "traces"):
            if name in tensors:
                tensors[name] = tensors[name][rows]
        if "attention" in tensors and spec.attention.per == "probe":
            tensors["attention"] = tensors["attention"][rows]
        answers = [answers[i] for i in keep] if answers else answers
    public_texts = [plan.texts[i] for i in keep]

    named = {p.label: p for p in spec.concepts.named} if concepts.kind == "named" else {}
    entries = [
        ConceptEntry(
            id=cid,
            label=label,
            kind=concepts.kind,
            safety_score=round(float(s), 6),
            examples=len(named[label].inputs) if label in named else None,
            private=spec.is_private(named[label]) if label in named else None,
        )
        for cid, label, s in zip(concepts.ids, concepts.labels, scores.tolist(), strict=True)
    ]
    labelled = len(spec.labelled_inputs())
    unlabelled = len([t for t in plan.texts if t not in spec.labelled_inputs()]) + len(anchor_texts)
    read_layers = list(dict.fromkeys([plan.layer, *plan.trace_layers]))
    body_fields: dict[str, Any] = dict(
        topic=spec.topic,
        teacher=TeacherInfo(
            node=teacher_node,
            model_name=spec.model_name or adapter.model_name,
            architecture=adapter.architecture,
            weights_sha256=adapter.weights_sha256(),
            d_model=adapter.d_model,
            layers=read_layers,
        ),
        concepts=entries,
        extraction=ExtractionInfo(concepts=ExtractionStep(method=concepts.kind, params=concepts.params), **steps),
        data_usage=DataUsage(
            probe_count=len(plan.texts) + flagged_queries + declared_queries + len(anchor_texts),
            teacher_forward_passes=passes,
            labelled_examples=labelled,
            unlabelled_probes=unlabelled,
        ),
        parents=list(spec.parents),
        safety=SafetyInfo(scorer=scorer.name, version=scorer.version, threshold=spec.safety.threshold),
    )
    if anchor_texts:
        body_fields["anchors"] = AnchorInfo(
            sets=[AnchorSet(source=a.source, kind=a.kind, count=len(texts)) for a, texts in anchor_sets if texts],
            count=len(anchor_texts),
            layer=plan.layer,
            pooling=str(spec.position),
        )
    if created_at is not None:
        body_fields["created_at"] = created_at
    body = ManifestBody(**body_fields)
    arrays = {name: _as_array(t, spec.dtype) for name, t in tensors.items()}
    arrays.update(encode_probe_texts(public_texts))  # the public probe inputs, so any tokenizer can re-read them
    if anchor_texts:
        arrays.update(encode_texts(anchor_texts, ANCHOR_TEXT))  # public anchors, with the teacher's anchor_vectors
    if answers:
        arrays.update(encode_texts(answers, PROBE_ANSWER))  # the teacher's outputs on its probes: no labels
    return Extraction(body, arrays, concepts, scores)


def build_packet(
    model: Any,
    spec: PacketSpec,
    key: SigningKey,
    out: str | Path | None = None,
    *,
    tokenizer: Any = None,
    scorer: SafetyScorer | None = None,
    teacher_node: str | None = None,
    created_at: datetime | None = None,
    progress: Callable[[int], Any] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> Path:
    """Extract per ``spec`` from ``model``, sign with ``key``, write the packet; returns its path.

    ``out`` defaults to ``<topic>.m2kt`` in the current directory. ``progress(n)`` is called
    as probes are processed (``on_plan`` learns the total first).
    """
    extraction = extract(
        model,
        spec,
        tokenizer=tokenizer,
        scorer=scorer,
        teacher_node=teacher_node,
        created_at=created_at,
        progress=progress,
        on_plan=on_plan,
    )
    target = Path(out) if out is not None else Path(f"{spec.topic}.m2kt")
    return write_packet(target, extraction.body, extraction.tensors, key).path
