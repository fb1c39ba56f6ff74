"""Ingestion by alignment: a packet's concepts mapped into the student's space through public anchors.

    report = ingest(Student(minilm, tokenizer), "topics.m2kt", IngestConfig(), keys=teacher_pub)
    student.classify(["a text editor for the terminal"])            # the nearest mapped concept

For a student without an output head (an encoder) — or any student, with ``alignment.enabled`` — the
concepts need no probe texts: only their vectors travel. Steps:

1. :func:`anchor_pairs` — the packet's public anchors (teacher vectors) and the student's own vectors of
   the same texts, or the pairs kept from an earlier packet of the same teacher (0 new teacher queries);
2. :func:`map_concepts` — the alignment (:func:`m2kt.student.alignment.fit_alignment`: ``anchored`` on
   a general set such as a word list, refined by the domain anchors) and the mapped concepts; concepts
   whose texts the packet shares are the student's own means of them instead (labelled examples);
   with ``anchor_labels`` (measured worse; off by default), each concept is also placed among the
   student's own anchors the teacher's space puts nearest it;
3. the verifier: the student must now place the anchors (the domain ones, when there are some) with
   the concept the teacher's space does, at least ``min_agreement`` of the way from chance to all of
   them; flagged concepts are checked as everywhere. Otherwise it is rolled back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m2kt.errors import IngestError
from m2kt.format.keys import VerifyKey
from m2kt.nn.device import pick_device
from m2kt.student.alignment import Alignment, fit_alignment
from m2kt.student.checkpoint import checkpoint, rollback
from m2kt.student.concepts import ConceptMap, nearest
from m2kt.student.config import AlignmentConfig, IngestConfig
from m2kt.student.probing import PacketContents, read_packet
from m2kt.student.report import IngestReport, outcome_fields
from m2kt.student.store import AlignmentStore, AnchorPairs
from m2kt.student.student import Student
from m2kt.student.verifier import Check, ProbeSuite, Snapshot, audit, decide

__all__ = ["Mapping", "anchor_pairs", "ingest_by_alignment", "map_concepts", "shared_agreement"]

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, math.inf)  # the mapped concept, in anchors' worth


@dataclass
class Mapping:
    concepts: ConceptMap
    alignment: Alignment | None  # None when every concept came with its texts (nothing to align)
    pairs: AnchorPairs | None
    reused: bool  # the anchor pairs came from the store, not from this packet
    weight: float  # the mapped concept's weight among the anchors (inf: the mapped concept alone)
    agreement: float | None  # anchors the student places as the teacher's space does
    shared: list[str]  # concepts formed from the texts the packet shares (labelled examples), not mapped
    new_embeddings: int  # student forward inputs this mapping ran
    fit_seconds: float = 0.0  # the alignment fit and the concepts' placement, without embedding anything
    judged: int = 0  # anchors the agreement was measured on: the domain ones, or all when there are none

    @property
    def kappa(self) -> float | None:
        """Agreement beyond chance: 0 for a map no better than a random concept, 1 for full agreement."""
        return None if self.agreement is None else beyond_chance(self.agreement, len(self.concepts.labels))

    def describe(self) -> dict[str, Any]:
        return {
            **(self.alignment.describe() if self.alignment is not None else {"method": None}),
            "source": self.pairs.source if self.pairs is not None else None,
            "reused": self.reused,
            "anchor_label_weight": self.weight if math.isfinite(self.weight) else None,
            "agreement": self.agreement,
            "agreement_kappa": self.kappa,
            "agreement_on": self.judged,
            "from_shared_texts": self.shared,
            "fit_seconds": self.fit_seconds,
            "layer": self.concepts.layer,
            "pooling": self.concepts.pooling,
        }


def beyond_chance(share: float, k: int) -> float:
    """A share of right placements among ``k`` concepts, rescaled: 0 is chance (1/k), 1 is all right."""
    chance = 1.0 / k
    return 1.0 if chance >= 1.0 else (share - chance) / (1.0 - chance)


def _leave_one_out(
    base: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor, *, summed: bool, skip_empty: bool = False
) -> float:
    """The share of ``vectors`` (N, d, unit length) whose nearest row of ``base`` (K, d; cosine) is their own
    concept ``labels`` (N,) — judged against that row without the vector itself when it was ``summed`` into
    it. With ``skip_empty``, a zero row (a concept with nothing in it) is never nearest."""
    scores = torch.nn.functional.normalize(base, dim=-1) @ vectors.T  # (K, N)
    if skip_empty:
        scores[base.abs().sum(-1) == 0] = -math.inf
    own = base[labels] - vectors if summed else base[labels]  # (N, d) each vector's own concept
    scores[labels, torch.arange(len(labels))] = (torch.nn.functional.normalize(own, dim=-1) * vectors).sum(-1)
    return float((scores.argmax(0) == labels).float().mean())


def _teacher_read(contents: PacketContents) -> str:
    """Where the teacher read its concepts ("layer/pooling"): anchors are only comparable if read there too."""
    params = contents.manifest.extraction.concepts.params
    return f"{params.get('layer')}/{params.get('position')}"


def _store_key(contents: PacketContents, student: Student, layer: str, pooling: str) -> str:
    teacher = contents.manifest.teacher.weights_sha256 or ""
    return AlignmentStore.key(teacher, _teacher_read(contents), student.core_sha256, f"{layer}/{pooling}")


def anchor_pairs(
    student: Student, contents: PacketContents, layer: str, pooling: str, store: AlignmentStore | None
) -> tuple[AnchorPairs, bool]:
    """(the anchor pairs, whether they were reused from the store)."""
    if contents.anchor_vectors is not None and contents.anchor_texts:
        anchors = contents.manifest.anchors
        if anchors is not None and f"{anchors.layer}/{anchors.pooling}" != _teacher_read(contents):
            raise IngestError(
                f"the packet's anchors were read at {anchors.layer}/{anchors.pooling} but its concepts at "
                f"{_teacher_read(contents)}: the two are not in one space"
            )
        own = student.embed(contents.anchor_texts, layer=layer, pooling=pooling)
        source = " + ".join(f"{s.count} {s.kind} from {s.source}" for s in anchors.sets) if anchors else "packet"
        pairs = AnchorPairs(
            list(contents.anchor_texts), contents.anchor_vectors, own, source, contents.id, contents.anchor_general
        )
        return pairs, False
    if store is not None:
        stored = store.load(_store_key(contents, student, layer, pooling))
        if stored is not None:
            return stored, True
    raise IngestError(
        "the packet carries no public anchors (anchor_vectors) and no alignment with this teacher "
        f"({(contents.manifest.teacher.weights_sha256 or '?')[:16]}…) is stored: the student cannot map its "
        "concepts — build the packet with anchors, or ingest an earlier packet of this teacher with "
        "alignment.store set"
    )


def shared_centroids(student: Student, contents: PacketContents, layer: str, pooling: str) -> dict[int, torch.Tensor]:
    """Concept index → the student's own mean vector of the member texts the packet shares (public concepts)."""
    out: dict[int, torch.Tensor] = {}
    if not contents.texts:
        return out
    for c in range(len(contents.labels)):
        rows = torch.nonzero(contents.members == c).flatten().tolist()
        if rows:
            out[c] = student.embed([contents.texts[i] for i in rows], layer=layer, pooling=pooling).mean(0)
    return out


def shared_agreement(student: Student, contents: PacketContents, layer: str, pooling: str) -> tuple[float, int] | None:
    """(share, count) of the packet's shared member texts that the student's own vectors place in their own
    concept, each judged against concepts formed without it (leave one out); None without two concepts
    that each share at least two texts."""
    if not contents.texts or contents.members is None:
        return None
    members = contents.members.long()
    rows = torch.nonzero(members >= 0).flatten()
    labels = members[rows]
    counts = torch.bincount(labels, minlength=len(contents.labels))
    if int((counts >= 2).sum()) < 2:
        return None
    keep = counts[labels] >= 2  # a concept of one text has nothing left to judge it against
    rows, labels = rows[keep], labels[keep]
    vectors = torch.nn.functional.normalize(
        student.embed([contents.texts[i] for i in rows.tolist()], layer=layer, pooling=pooling).float(), dim=-1
    )  # (N, d)
    sums = torch.zeros(len(contents.labels), vectors.shape[1]).index_add_(0, labels, vectors)  # (K, d)
    return _leave_one_out(sums, vectors, labels, summed=True, skip_empty=True), len(labels)


def _flagged(student: Student, suite: ProbeSuite, layer: str, pooling: str) -> tuple[list[str], torch.Tensor]:
    """The student's own mean vector of each flagged input set, read as the concepts are."""
    labels = sorted(suite.flagged)
    if not labels:
        return [], torch.zeros(0, student.reader.d_model)
    return labels, torch.stack([student.embed(suite.flagged[k], layer=layer, pooling=pooling).mean(0) for k in labels])


def _refine(mapped: torch.Tensor, pairs: AnchorPairs, teacher_concepts: torch.Tensor, weights: tuple[float, ...]):  # noqa: ANN202
    """The concepts (K, d_S) placed among the student's anchors the teacher's space labels with them,
    with the mapped concept's weight chosen by leave-one-out agreement with those labels."""
    labels = nearest(pairs.teacher, teacher_concepts)  # (N,) the teacher's space's concept for each anchor
    s = torch.nn.functional.normalize(pairs.student.float(), dim=-1)  # (N, d_S)
    m = torch.nn.functional.normalize(mapped.float(), dim=-1)  # (K, d_S)
    k = m.shape[0]
    sums = torch.zeros_like(m).index_add_(0, labels, s)  # (K, d_S)
    best = (-1.0, math.inf)
    for w in weights:
        base = m * (w if math.isfinite(w) else 1.0) + (sums if math.isfinite(w) else 0.0)  # (K, d_S)
        # leave-one-out: each anchor is classified by concepts built without it
        agree = _leave_one_out(base, s, labels, summed=math.isfinite(w))
        if agree > best[0] + 1e-12 or (abs(agree - best[0]) <= 1e-12 and w > best[1]):
            best = (agree, w)
    w = best[1]
    vectors = m if not math.isfinite(w) else m * w + sums
    # back at the scale of the student's own vectors, so the verifier compares like with like
    scale = pairs.student.float().norm(dim=-1).mean()
    return torch.nn.functional.normalize(vectors, dim=-1) * scale, w, labels, k


def map_concepts(
    student: Student,
    packet: PacketContents | str | Path,
    config: AlignmentConfig | None = None,
    *,
    keys: VerifyKey | Sequence[VerifyKey] | None = None,
    layer: str | None = None,
) -> Mapping:
    """The packet's concepts as labelled vectors in the student's space (``.concepts``); no state change.

    ``packet``: a path (verified against ``keys`` first) or contents already read. A concept whose member
    texts the packet shares is the student's own mean of them (those texts are labelled examples: the
    report counts them); every other concept is mapped through the anchors."""
    if isinstance(packet, PacketContents):
        contents = packet
    elif keys is None:
        raise IngestError("map_concepts: give the teacher's public key(s) to verify the packet with")
    else:
        contents = read_packet(packet, keys)
    config = config or AlignmentConfig()
    layer = layer or student.reader.layer_names[-1]
    before = len(student._embeddings)
    own = shared_centroids(student, contents, layer, config.pooling)
    shared = [contents.labels[c] for c in sorted(own)]
    if len(own) == len(contents.labels):
        vectors = torch.stack([own[c] for c in range(len(contents.labels))])
        concepts = ConceptMap(list(contents.labels), vectors.float(), layer, config.pooling)
        return Mapping(concepts, None, None, False, math.inf, None, shared, len(student._embeddings) - before)
    store = AlignmentStore(config.store) if config.store else None
    pairs, reused = anchor_pairs(student, contents, layer, config.pooling, store)
    if len(pairs.texts) < 3:
        raise IngestError(f"{len(pairs.texts)} anchors are too few to align on (at least 3)")
    t0 = time.perf_counter()
    alignment = fit_alignment(pairs.teacher, pairs.student, config.method, general=pairs.general_mask())
    mapped = alignment.map(contents.concepts)  # (K, d_S)
    weights = WEIGHTS if config.anchor_labels else (math.inf,)
    vectors, weight, labels, _ = _refine(mapped, pairs, contents.concepts, weights)
    for c, vector in own.items():
        vectors[c] = vector
    concepts = ConceptMap(list(contents.labels), vectors.float(), layer, config.pooling)
    agree = nearest(pairs.student, concepts.vectors) == labels  # (N,)
    domain = ~pairs.general_mask()
    judged = domain if int(domain.sum()) >= 3 else torch.ones_like(domain)  # domain anchors, when there are some
    agreement = float(agree[judged].float().mean())
    seconds = time.perf_counter() - t0
    new = len(student._embeddings) - before
    return Mapping(concepts, alignment, pairs, reused, weight, agreement, shared, new, seconds, int(judged.sum()))


def ingest_by_alignment(
    student: Student, contents: PacketContents, config: IngestConfig, suite: ProbeSuite, *, started: float
) -> IngestReport:
    """Map the packet's concepts into the student and verify; rolls back unless every check passes."""
    t0 = time.perf_counter()
    device = pick_device(config.device)
    student.to(device)
    saved = checkpoint(student)
    layer = config.layer or student.reader.layer_names[-1]
    try:
        mapping = map_concepts(student, contents, config.alignment, layer=layer)
        fit_seconds = time.perf_counter() - t0
        t_verify = time.perf_counter()
        flagged_labels, flagged = _flagged(student, suite, layer, config.alignment.pooling)
        empty = Snapshot([], None, torch.zeros(0, 0))  # an encoder has no task outputs to compare
        own = mapping.pairs.student if mapping.pairs is not None else mapping.concepts.vectors
        checks = audit(
            empty,
            empty,
            config=config.verifier,
            mapped=mapping.concepts.vectors,
            mapped_labels=mapping.concepts.labels,
            flagged_labels=flagged_labels,
            flagged=flagged,
            origin=own.float().mean(0),
        )
        if mapping.alignment is None and mapping.shared:
            found = shared_agreement(student, contents, layer, config.alignment.pooling)
            if found is not None:
                share, count = found
                kappa = beyond_chance(share, len(mapping.concepts.labels))
                need = config.alignment.min_agreement
                checks.append(
                    Check(
                        "shared",
                        kappa >= need,
                        f"the student places {share:.3f} of the {count} texts the packet shares in their own "
                        f"concept, each left out of it: {kappa:.3f} of the way from chance to all (needs {need})",
                        kappa,
                    )
                )
        if mapping.kappa is not None and mapping.alignment is not None and mapping.pairs is not None:
            need = config.alignment.min_agreement
            which = "domain" if mapping.judged < len(mapping.pairs.texts) else "all"
            checks.append(
                Check(
                    "anchors",
                    mapping.kappa >= need,
                    f"the student places {mapping.agreement:.3f} of {mapping.judged} anchors ({which}) with the "
                    f"concept the teacher's space does: {mapping.kappa:.3f} of the way from chance to all "
                    f"(needs {need}); alignment {mapping.alignment.method}, held-out cosine "
                    f"{mapping.alignment.score:.3f}",
                    mapping.kappa,
                )
            )
        accepted = decide(checks)
        if accepted:
            student.concepts = mapping.concepts
            if config.alignment.store and mapping.pairs is not None and not mapping.reused:
                keep = AlignmentStore(config.alignment.store)
                keep.save(_store_key(contents, student, layer, config.alignment.pooling), mapping.pairs)
    except BaseException:
        rollback(student, saved)
        raise
    if not accepted:
        rollback(student, saved)
    m = contents.manifest
    return IngestReport(
        **outcome_fields(contents.id, m, checks, accepted),
        probe_scores={
            "before": None,
            "after": mapping.agreement,
            "measure": "anchor agreement with the teacher's space",
        },
        injected=list(mapping.concepts.labels) if accepted else [],
        anchors={"train": [], "holdout": []},
        losses=[],
        zero_shot_holdout_geo=None,
        best_step=-1,
        steps_run=0,
        stopped_early=False,
        trainable_parameters=0,
        notes=[],
        data_usage={
            "teacher_queries": m.data_usage.probe_count,
            "labelled_examples": m.data_usage.labelled_examples,
            "verifier_labelled_examples": suite.labelled,
            "student_probe_passes": mapping.new_embeddings,
            "anchors": len(mapping.pairs.texts) if mapping.pairs is not None else 0,
            "anchors_reused": mapping.reused,
            "shared_text_concepts": len(mapping.shared),
        },
        device=str(device),
        mixed_precision=None,
        timings={
            "read": t0 - started,
            "probe": fit_seconds,  # the student's vectors of the anchors (and shared texts), and the fit
            "fit": mapping.fit_seconds,  # the fit alone
            "train": 0.0,
            "verify": time.perf_counter() - t_verify,
            "total": time.perf_counter() - started,
            "steps_per_second": None,
        },
        config=config.to_json(),
        student={"core_sha256": student.core_sha256, "layer": layer, "inject_layer": None},
        alignment=mapping.describe(),
    )
