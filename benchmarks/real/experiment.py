"""One teacher → student direction of the real-model benchmark: every condition, per seed and budget.

Everything M2KT does here goes through the library: :func:`m2kt.teacher.build_packet` writes a signed
packet (private concepts: only their vectors; public anchors: texts and the teacher's vectors),
:func:`m2kt.student.ingest` verifies it and maps the concepts into the student, and
:meth:`m2kt.student.Student.classify` answers. The baselines use the same vectors of the same texts:
the student's from :meth:`Student.embed`, the teacher's from :func:`m2kt.nn.embed.embed_texts`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m2kt.benchmarks.real.classifiers import centroids, fit_logistic, predict_logistic
from m2kt.benchmarks.real.data import SetSplit
from m2kt.benchmarks.real.models import Encoder
from m2kt.format.keys import SigningKey
from m2kt.nn.adapters import adapter_for
from m2kt.nn.embed import embed_texts
from m2kt.student import IngestConfig, Student, ingest
from m2kt.student.alignment import METHODS
from m2kt.student.concepts import nearest
from m2kt.student.config import AlignmentConfig
from m2kt.student.probing import read_packet
from m2kt.teacher import build_packet
from m2kt.teacher.spec import AnchorsSpec, AttentionSpec, ConceptsSpec, NamedProbe, PacketSpec, TracesSpec

__all__ = ["Direction"]

Record = dict[str, Any]


@dataclass
class Built:
    path: Path
    seconds: float
    queries: int  # the manifest's probe_count
    labelled: int  # the manifest's labelled_examples
    bytes: int


GENERAL = "debian:descriptions-of-other-sections"  # the general anchor set's source, as the manifest names it


class Direction:
    """A teacher and a student encoder, the student's vector cache, and the records of their runs."""

    def __init__(self, teacher: Encoder, student: Encoder, key: SigningKey, work: Path, device: str) -> None:
        self.teacher, self.encoder, self.key, self.work, self.device = teacher, student, key, work, device
        self.scenario = f"{teacher.name}→{student.name}"
        self.student = Student(student.model, student.tokenizer)
        self._teacher_adapter = adapter_for(teacher.model, teacher.tokenizer)
        self._teacher_cache: dict[str, torch.Tensor] = {}
        self.records: list[Record] = []
        self._oracle: tuple[float, int, float, float] | None = None
        work.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ vectors

    def teacher_vectors(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._teacher_cache]
        if todo:
            vectors = embed_texts(self._teacher_adapter, todo, self.teacher.layer, "mean")
            self._teacher_cache.update(zip(todo, vectors, strict=True))
        return torch.stack([self._teacher_cache[t] for t in texts])

    def student_vectors(self, texts: list[str]) -> torch.Tensor:
        return self.student.embed(texts)

    # ------------------------------------------------------------------ packets

    def build(
        self,
        split: SetSplit,
        tag: str,
        *,
        anchors: list[str],
        source: str,
        words: list[str] | None = None,
        words_source: str = "",
        private: bool = True,
    ) -> Built:
        """A packet of the split's sections (private by default), with ``words`` as a general anchor set
        and ``anchors`` as a domain one; concepts only (no attention maps or traces: not used here)."""
        sets = []
        if words:
            sets.append(AnchorsSpec(texts=tuple(words), source=words_source, kind="general"))
        if anchors:
            sets.append(AnchorsSpec(texts=tuple(anchors), source=source, kind="domain"))
        spec = PacketSpec(
            topic=f"debian.{split.name}",
            concepts=ConceptsSpec(named=tuple(NamedProbe(s, tuple(split.labelled[s])) for s in split.sections)),
            position="mean",
            private=private,
            anchors=tuple(sets),
            attention=AttentionSpec(enabled=False),
            traces=TracesSpec(enabled=False),
            model_name=self.teacher.model_name,
            device=self.device,
        )
        t0 = time.perf_counter()
        path = build_packet(
            self.teacher.model, spec, self.key, self.work / f"{tag}.m2kt", tokenizer=self.teacher.tokenizer
        )
        seconds = time.perf_counter() - t0
        manifest = read_packet(path, self.key.verify_key).manifest
        usage = manifest.data_usage
        return Built(path, seconds, usage.probe_count, usage.labelled_examples, path.stat().st_size)

    def ingest_and_classify(self, built: Built, split: SetSplit, **alignment: Any) -> tuple[float | None, Any, float]:
        """Ingest ``built`` and classify ``split``'s test texts by the mapped concepts: (accuracy, or None when
        the packet was rolled back; the report; ingestion seconds)."""
        report, secs = self.ingest(built, **alignment)
        test = [t for t, _ in split.test]
        return (self.accuracy_of(self.student.classify(test), split) if report.accepted else None), report, secs

    def ingest(self, built: Built, **alignment: Any) -> tuple[Any, float]:
        """Ingest with the given alignment settings; (report, seconds). The student forgets earlier concepts."""
        self.student.concepts = None
        config = IngestConfig(device=self.device, alignment=AlignmentConfig(**alignment))
        t0 = time.perf_counter()
        report = ingest(self.student, built.path, config, keys=self.key.verify_key)
        return report, time.perf_counter() - t0

    # ------------------------------------------------------------------ records

    def record(
        self,
        split: SetSplit,
        seed: int,
        condition: str,
        budget: str | None,
        correct: float | None,
        teacher_accuracy: float,
        **fields: Any,
    ) -> Record:
        accuracy = correct
        pct = None if accuracy is None else 100.0 * accuracy / teacher_accuracy
        row: Record = {
            "scenario": self.scenario if split.name == "topics" else f"{self.scenario} / {split.name}",
            "set": split.name,
            "teacher": self.teacher.model_name,
            "student": self.encoder.model_name,
            "condition": condition,
            "budget": budget,
            "seed": seed,
            "accuracy": accuracy,
            "pct_of_teacher": pct,
            "test": len(split.test),
            "classes": len(split.sections),
            "device": self.device,
            **fields,
        }
        self.records.append(row)
        return row

    def accuracy_of(self, predicted: list[str] | torch.Tensor, split: SetSplit) -> float:
        truth = [s for _, s in split.test]
        if isinstance(predicted, torch.Tensor):
            predicted = [split.sections[int(i)] for i in predicted]
        return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)

    # ------------------------------------------------------------------ conditions

    def run_seed(
        self,
        split: SetSplit,
        others: list[SetSplit],
        seed: int,
        budgets: list[int],
        words: list[str],
        words_source: str,
        log: Callable[[str], None],
        general: list[str] | None = None,
        unlabelled: int = 0,
    ) -> None:
        """Every condition of one seed on the main set, and alignment reuse on ``others``; with ``general``
        (public texts of no concept set), also the general-anchor route and its reuse, and with ``unlabelled``
        those refined on the student's own unlabelled texts."""
        test = [t for t, _ in split.test]
        k = len(split.sections)
        labelled_texts = [t for s in split.sections for t in split.labelled[s]]
        labelled_y = torch.tensor([i for i, s in enumerate(split.sections) for _ in split.labelled[s]])
        n_labelled = len(labelled_texts)

        # the teacher: its concepts (the packet's) as a nearest-concept classifier on its own vectors
        shared = self.build(split, f"shared-{seed}", anchors=[], source="none", private=False)
        concepts = read_packet(shared.path, self.key.verify_key).concepts
        teacher_acc = self.accuracy_of(nearest(self.teacher_vectors(test), concepts), split)
        self.record(
            split,
            seed,
            "teacher",
            None,
            teacher_acc,
            teacher_acc,
            labelled=0,
            teacher_labelled=n_labelled,
            teacher_queries=n_labelled,
            anchors=0,
            seconds=shared.seconds,
        )
        log(f"  seed {seed}: teacher {teacher_acc:.3f} on {len(test)} test texts, {k} sections")

        # the student on its own: k labels, and every non-test label (the oracle)
        own = self.student_vectors(labelled_texts)
        self.student_k_centroid(split, seed, teacher_acc)
        t0 = time.perf_counter()
        w, c = fit_logistic(own, labelled_y, k, seed=seed)
        acc = self.accuracy_of(predict_logistic(w, self.student_vectors(test)), split)
        self.record(
            split,
            seed,
            "student-k-logistic",
            "k",
            acc,
            teacher_acc,
            labelled=n_labelled,
            teacher_labelled=0,
            teacher_queries=0,
            anchors=0,
            seconds=time.perf_counter() - t0,
            C=c,
        )
        if self._oracle is None:  # every non-test text, labelled: the same set for every seed
            texts = [t for t, _ in split.train_all]
            y = torch.tensor([split.sections.index(s) for _, s in split.train_all])
            t0 = time.perf_counter()
            w, c = fit_logistic(self.student_vectors(texts), y, k, seed=seed)
            oracle = self.accuracy_of(predict_logistic(w, self.student_vectors(test)), split)
            self._oracle = (oracle, len(texts), time.perf_counter() - t0, c)
        assert self._oracle is not None
        oracle, n_all, secs, c = self._oracle
        self.record(
            split,
            seed,
            "oracle",
            "all",
            oracle,
            teacher_acc,
            labelled=n_all,
            teacher_labelled=0,
            teacher_queries=0,
            anchors=0,
            seconds=secs,
            C=c,
        )

        # M2KT with the concepts' texts in the packet: the student re-embeds the teacher's labelled examples
        acc, report, secs = self.ingest_and_classify(shared, split)
        self.record(
            split,
            seed,
            "m2kt-shared",
            "k",
            acc,
            teacher_acc,
            labelled=n_labelled,
            teacher_labelled=shared.labelled,
            teacher_queries=shared.queries,
            anchors=0,
            seconds=secs,
            packet_bytes=shared.bytes,
            decision=report.decision,
        )

        # the packets of the other concept sets: private, no anchors — mapped with a stored alignment
        reuse_packets = []
        for other in others:
            built = self.build(other, f"{other.name}-{seed}", anchors=[], source="none")
            other_concepts = read_packet(built.path, self.key.verify_key).concepts
            other_test = [t for t, _ in other.test]
            other_teacher = self.accuracy_of(nearest(self.teacher_vectors(other_test), other_concepts), other)
            self.record(
                other,
                seed,
                "teacher",
                None,
                other_teacher,
                other_teacher,
                labelled=0,
                teacher_labelled=built.labelled,
                teacher_queries=built.queries,
                anchors=0,
                seconds=built.seconds,
            )
            reuse_packets.append((other, built, other_teacher))
            self._later_set_references(other, seed, other_teacher, words, words_source)

        if general:
            self._general_route(split, reuse_packets, seed, teacher_acc, general, log, unlabelled)

        for n in [0, *budgets]:
            pool = split.pool[:n]
            budget = str(n)
            stores = {"pool": self.work / f"store-{seed}-{n}-pool", "words": self.work / f"store-{seed}-{n}-words"}
            plans = [("words", pool)] if n == 0 else [("pool", pool), ("words", pool)]
            for kind, anchors in plans:
                built = self.build(
                    split,
                    f"private-{kind}-{seed}-{n}",
                    anchors=anchors,
                    source=f"debian:unlabelled-pool:{split.name}",
                    words=words if kind == "words" else None,
                    words_source=words_source,
                )
                store = str(stores[kind])
                names = (
                    [("m2kt", {"method": "auto", "store": store})]
                    + [(f"m2kt-{m}", {"method": m}) for m in METHODS if m != "anchored"]
                    + [("m2kt-anchor-labels", {"method": "auto", "anchor_labels": True})]
                    if kind == "pool"
                    else [("m2kt-words", {"method": "auto", "store": store})]
                )
                for condition, alignment in names:
                    acc, report, secs = self.ingest_and_classify(built, split, **alignment)
                    info = report.alignment or {}
                    self.record(
                        split,
                        seed,
                        condition,
                        budget,
                        acc,
                        teacher_acc,
                        labelled=0,
                        teacher_labelled=built.labelled,
                        teacher_queries=built.queries,
                        anchors=len(anchors) + (len(words) if kind == "words" else 0),
                        domain_anchors=len(anchors),
                        seconds=secs,
                        build_seconds=built.seconds,
                        packet_bytes=built.bytes,
                        decision=report.decision,
                        method=info.get("method"),
                        param=info.get("param"),
                        loo_cosine=info.get("loo_cosine"),
                        agreement=info.get("agreement"),
                        fit_seconds=info.get("fit_seconds"),
                    )
                    if condition in ("m2kt", "m2kt-words"):
                        shown = None if acc is None else round(acc, 3)
                        log(f"    N={n:>3} {condition:<10} {shown} ({info.get('method')}, {secs:.2f} s)")
            # KD: the teacher labels the N pool texts (and, as kd-words, the words as well); the student fits
            # on its own vectors of them
            kd_sets = [("kd", pool)] if n > 0 else []
            kd_sets.append(("kd-words", [*words, *pool]))
            for name, texts in kd_sets:
                t_labels = nearest(self.teacher_vectors(texts), concepts)
                vecs = self.student_vectors(texts)
                t0 = time.perf_counter()
                acc = self.accuracy_of(nearest(self.student_vectors(test), centroids(vecs, t_labels, k)), split)
                self.record(
                    split,
                    seed,
                    f"{name}-centroid",
                    budget,
                    acc,
                    teacher_acc,
                    labelled=0,
                    teacher_labelled=n_labelled,
                    teacher_queries=n_labelled + len(texts),
                    anchors=0,
                    seconds=time.perf_counter() - t0,
                )
                if name == "kd":
                    t0 = time.perf_counter()
                    w, c = fit_logistic(vecs, t_labels, k, seed=seed)
                    acc = self.accuracy_of(predict_logistic(w, self.student_vectors(test)), split)
                    self.record(
                        split,
                        seed,
                        "kd-logistic",
                        budget,
                        acc,
                        teacher_acc,
                        labelled=0,
                        teacher_labelled=n_labelled,
                        teacher_queries=n_labelled + n,
                        anchors=0,
                        seconds=time.perf_counter() - t0,
                        C=c,
                    )
            # reuse: the other sets' packets (no anchors) through the alignments this budget stored
            for other, built, other_teacher in reuse_packets:
                for kind, store in stores.items():
                    if not store.exists():
                        continue
                    condition = "m2kt-reuse" if kind == "pool" else "m2kt-words-reuse"
                    self._reuse(other, built, other_teacher, seed, store, condition, budget)

    def _general_route(
        self,
        split: SetSplit,
        reuse_packets: list[tuple[SetSplit, Built, float]],
        seed: int,
        teacher_acc: float,
        general: list[str],
        log: Callable[[str], None],
        unlabelled: int = 0,
    ) -> None:
        """A packet whose only anchors are a general set (public texts of sections outside every concept set,
        paid once in teacher queries), its alignment stored; then the later sets' packets through that
        stored alignment at 0 new queries (``m2kt-general-reuse``). With ``unlabelled``, each set's mapped
        concepts are also refined on that many of the student's own unlabelled texts of the set
        (``m2kt-general-refined``, ``m2kt-general-refined-reuse``): still 0 labels, 0 new queries."""
        store = self.work / f"store-{seed}-general"
        built = self.build(split, f"general-{seed}", anchors=[], source="none", words=general, words_source=GENERAL)
        acc, report, secs = self.ingest_and_classify(built, split, method="auto", store=str(store))
        info = report.alignment or {}
        common = {
            "labelled": 0,
            "teacher_labelled": built.labelled,
            "teacher_queries": built.queries,
            "anchors": len(general),
            "domain_anchors": 0,
            "seconds": secs,
            "build_seconds": built.seconds,
            "packet_bytes": built.bytes,
            "decision": report.decision,
            "method": info.get("method"),
            "param": info.get("param"),
        }
        self.record(split, seed, "m2kt-general", "0", acc, teacher_acc, **common)
        log(f"    general anchors ({len(general)}): {None if acc is None else round(acc, 3)} ({info.get('method')})")
        if unlabelled and acc is not None:
            acc, extra = self._refined(split, unlabelled)
            self.record(split, seed, "m2kt-general-refined", "0", acc, teacher_acc, **common, **extra)
            log(f"    ... refined on {extra['student_unlabelled']} of the student's own texts: {round(acc, 3)}")
        for other, other_built, other_teacher in reuse_packets:
            acc, refined = self._reuse(
                other, other_built, other_teacher, seed, store, "m2kt-general-reuse", "0", unlabelled=unlabelled
            )
            log(f"    {other.name} through it, 0 new queries: {None if acc is None else round(acc, 3)}")
            if refined is not None:
                log(f"    ... refined on the student's own texts: {round(refined, 3)}")

    def _refined(self, split: SetSplit, unlabelled: int) -> tuple[float, dict[str, Any]]:
        """The concepts the student holds, refined on its own unlabelled texts of ``split``; (test accuracy, the
        record's extra fields)."""
        texts = split.unlabelled(unlabelled)
        t0 = time.perf_counter()
        members = self.student.refine_concepts(texts)
        test = [t for t, _ in split.test]
        acc = self.accuracy_of(self.student.classify(test), split)
        return acc, {"student_unlabelled": len(texts), "refine_seconds": time.perf_counter() - t0, "members": members}

    def _reuse(
        self,
        other: SetSplit,
        built: Built,
        other_teacher: float,
        seed: int,
        store: Path,
        condition: str,
        budget: str,
        *,
        unlabelled: int = 0,
    ) -> tuple[float | None, float | None]:
        """A later set's packet (no anchors) through the alignment stored in ``store``: 0 new queries. With
        ``unlabelled``, also its concepts refined on the student's own texts (``<condition>`` with ``-refined``
        before ``-reuse``). Returns the two accuracies (None: rolled back, or not refined)."""
        acc, report, secs = self.ingest_and_classify(built, other, method="auto", store=str(store))
        info = report.alignment or {}
        fields = {
            "labelled": 0,
            "teacher_labelled": built.labelled,
            "teacher_queries": built.queries,
            "anchors": 0,
            "new_anchor_queries": 0,
            "seconds": secs,
            "decision": report.decision,
            "reused": info.get("reused"),
            "method": info.get("method"),
        }
        self.record(other, seed, condition, budget, acc, other_teacher, **fields)
        if not unlabelled or acc is None:
            return acc, None
        refined, extra = self._refined(other, unlabelled)
        refined_condition = condition.removesuffix("-reuse") + "-refined-reuse"
        self.record(other, seed, refined_condition, budget, refined, other_teacher, **fields, **extra)
        return acc, refined

    def _later_set_references(
        self, other: SetSplit, seed: int, other_teacher: float, words: list[str], words_source: str
    ) -> None:
        """What a later concept set gets without reuse, to read the reuse rows against: its own word-list
        packet aligned afresh (the word-list queries paid again), and the student with the set's k labels."""
        fresh = self.build(
            other, f"{other.name}-fresh-{seed}", anchors=[], source="none", words=words, words_source=words_source
        )
        acc, report, secs = self.ingest_and_classify(fresh, other, method="auto")
        self.record(
            other,
            seed,
            "m2kt-words-fresh",
            "0",
            acc,
            other_teacher,
            labelled=0,
            teacher_labelled=fresh.labelled,
            teacher_queries=fresh.queries,
            anchors=len(words),
            seconds=secs,
            packet_bytes=fresh.bytes,
            decision=report.decision,
        )
        self.student_k_centroid(other, seed, other_teacher)

    def student_k_centroid(self, split: SetSplit, seed: int, teacher_accuracy: float) -> None:
        """The student with the set's k labelled examples per section: its own nearest-centroid classifier."""
        texts = [t for s in split.sections for t in split.labelled[s]]
        y = torch.tensor([i for i, s in enumerate(split.sections) for _ in split.labelled[s]])
        t0 = time.perf_counter()
        own = centroids(self.student_vectors(texts), y, len(split.sections))
        acc = self.accuracy_of(nearest(self.student_vectors([t for t, _ in split.test]), own), split)
        self.record(
            split,
            seed,
            "student-k-centroid",
            "k",
            acc,
            teacher_accuracy,
            labelled=len(texts),
            teacher_labelled=0,
            teacher_queries=0,
            anchors=0,
            seconds=time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ timings on a cold cache

    def timings(
        self, split: SetSplit, n: int, words: list[str], words_source: str, log: Callable[[str], None]
    ) -> list[dict[str, Any]]:
        """Packet build, ingestion (anchors embedded afresh, the fit) and classification of the test set, on
        a cold cache: for N domain anchors alone and with the word list."""
        out = []
        for label, general in (("pool", None), ("words+pool", words)):
            built = self.build(
                split,
                f"timing-{label}-{n}",
                anchors=split.pool[:n],
                source="timing",
                words=general,
                words_source=words_source,
            )
            saved = self.student._embeddings
            self.student._embeddings = {}
            try:
                report, ingest_s = self.ingest(built, method="auto")
                test = [t for t, _ in split.test]
                t0 = time.perf_counter()
                self.student.classify(test)
                classify_s = time.perf_counter() - t0
            finally:
                self.student._embeddings = {**saved, **self.student._embeddings}
            out.append(
                {
                    "scenario": self.scenario,
                    "packet": label,
                    "device": self.device,
                    "anchors": n + (len(general) if general else 0),
                    "build_seconds": built.seconds,
                    "teacher_queries": built.queries,
                    "ingest_seconds": ingest_s,
                    "map_seconds": report.timings["probe"],
                    "fit_seconds": report.timings["fit"],
                    "classify_seconds": classify_s,
                    "classified": len(split.test),
                    "packet_bytes": built.bytes,
                }
            )
            log(
                f"  timings {label} N={n}: build {built.seconds:.2f} s ({built.queries} teacher queries), "
                f"ingest {ingest_s:.2f} s (fit {report.timings['fit']:.3f} s), classify {len(test)} texts "
                f"{classify_s:.2f} s"
            )
        return out
