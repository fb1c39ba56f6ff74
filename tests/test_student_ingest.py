"""Student side (Algorithm 2) end to end on real TinyTransformers: a teacher that knows a synonym
('minus' = sub) the student never saw, a signed packet, and ingestion through the CAL."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from m2kt.benchmarks.harness.student_pair import ALIAS, STUDENT_TASK, accuracy, alias_packet, make_synonym_pair, probes
from m2kt.cli.main import app
from m2kt.errors import IngestError
from m2kt.format.keys import SigningKey, generate_keypair, load_signing_key
from m2kt.nn.digest import state_dict_sha256
from m2kt.student import (
    AdapterConfig,
    CALConfig,
    IngestConfig,
    InjectConfig,
    LossWeights,
    ProbeSuite,
    Student,
    VerifierConfig,
    ingest,
)
from m2kt.teacher import ConceptsSpec, NamedProbe, PacketSpec, build_packet
from m2kt.toy.checkpoint import save_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_synonym_pair(tmp_path_factory.mktemp("packets"))


def fresh(pair: dict) -> Student:
    return Student(copy.deepcopy(pair["student"]))


def test_renamed_concepts_cross_zero_shot_with_the_anchor_relative_cal(pair: dict) -> None:
    student = fresh(pair)
    cases = {
        "plus": (pair["plus"], pair["add"], pair["add_answers"]),
        "minus": (pair["minus"], pair["sub"], pair["answers"]),
    }
    ceiling = {k: accuracy(student, own, ans) for k, (_, own, ans) in cases.items()}
    before = {k: accuracy(student, new, ans) for k, (new, _, ans) in cases.items()}
    config = IngestConfig(targets=["token:plus", "token:minus"], cal=CALConfig(kind="anchor"), steps=0)
    report = ingest(student, pair["packet"], config, keys=pair["key"].verify_key, suite=pair["suite"])
    after = {k: accuracy(student, new, ans) for k, (new, _, ans) in cases.items()}
    assert report.decision == "accepted" and report.injected == ["token:plus", "token:minus"]
    assert min(before.values()) < 0.35, before  # an untrained token falls back to one operation, not both
    assert all(after[k] >= 0.95 * ceiling[k] for k in cases), (before, after, ceiling)
    assert report.data_usage["labelled_examples"] == 48 and report.data_usage["teacher_queries"] == 48
    assert report.steps_run == 0 and report.device == "cpu"


@pytest.mark.parametrize("kind", ["anchor", "linear"])
def test_number_alias_crosses_at_the_token_embedding_in_every_position(pair: dict, kind: str, tmp_path: Path) -> None:
    packet = alias_packet(pair, tmp_path / "aliases.m2kt")
    examples = [e for e in STUDENT_TASK.examples(use_aliases=True) if ALIAS in e.tokens]
    texts, answers = [" ".join(e.tokens) for e in examples], [e.answer for e in examples]
    plain = [t.replace(ALIAS, "7") for t in texts]
    student = fresh(pair)
    ceiling, before = accuracy(student, plain, answers), accuracy(student, texts, answers)
    config = IngestConfig(
        targets=[f"token:{ALIAS}"], cal=CALConfig(kind=kind), inject=InjectConfig(layer="embed.tok"), steps=0
    )
    report = ingest(student, packet, config, keys=pair["key"].verify_key, suite=pair["suite"])
    after = accuracy(student, texts, answers)
    assert report.decision == "accepted" and len(report.anchors["train"]) + len(report.anchors["holdout"]) == 11
    assert after >= 0.95 * ceiling and after > before + 0.3, (before, after, ceiling)


def test_core_parameters_are_bit_identical_after_ingestion(pair: dict) -> None:
    student = fresh(pair)
    core_before = {k: v.clone() for k, v in student.core.state_dict().items()}
    config = IngestConfig(
        targets=["token:minus"], cal=CALConfig(kind="linear"), steps=15, adapter=AdapterConfig(enabled=True, rank=4)
    )
    report = ingest(student, pair["packet"], config, keys=pair["key"].verify_key, suite=pair["suite"])
    assert report.steps_run > 0 and report.trainable_parameters > 0
    after = student.core.state_dict()
    assert all(torch.equal(core_before[k], after[k]) for k in core_before)
    assert state_dict_sha256(student.core) == student.core_sha256
    assert not any(p.requires_grad for p in student.core.parameters())


def test_flagged_concept_is_caught_and_rolled_back_to_the_exact_previous_weights(pair: dict) -> None:
    """The paper's experiment 3: the packet would make 'minus' mean the student's flagged 'sub'."""
    student = fresh(pair)
    # a first, benign ingestion gives the student non-trivial trainable state to protect
    first = ingest(
        student,
        pair["packet"],
        IngestConfig(targets=[], cal=CALConfig(kind="linear"), steps=5, inject=InjectConfig(mode="none")),
        keys=pair["key"].verify_key,
        suite=pair["suite"],
    )
    assert first.decision == "accepted"
    state = student.trainable_state()
    outputs = student.answer_distribution(pair["minus"] + pair["sub"])
    suite = ProbeSuite(task=pair["suite"].task, flagged={"banned:subtraction": list(probes("sub"))}, flagged_position=1)

    # L_safety sees it during training...
    watched = ingest(
        fresh(pair),
        pair["packet"],
        IngestConfig(targets=["token:minus"], steps=3, loss=LossWeights(safety=1.0, safety_margin=0.5)),
        keys=pair["key"].verify_key,
        suite=suite,
    )
    assert watched.losses[0]["safety"] > 0
    # ...and the auditor refuses it and restores the exact previous state
    report = ingest(
        student,
        pair["packet"],
        IngestConfig(targets=["token:minus"], steps=10, loss=LossWeights(safety=0.0)),
        keys=pair["key"].verify_key,
        suite=suite,
    )
    assert report.decision == "rolled_back"
    assert any("banned:subtraction" in r for r in report.reasons), report.reasons
    restored = student.trainable_state()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(student.answer_distribution(pair["minus"] + pair["sub"]), outputs)
    assert report.injected == []


def test_each_loss_term_off_changes_the_report(pair: dict) -> None:
    suite = ProbeSuite(task=pair["suite"].task, flagged={"far": list(probes("add"))}, flagged_position=1)
    results = {}
    for off in (None, "geo", "struct", "reason", "safety"):
        weights = {"geo": 1.0, "struct": 0.5, "reason": 0.5, "safety": 1.0, "safety_margin": -1.0}
        if off:
            weights[off] = 0.0
        config = IngestConfig(
            targets=["token:minus"],
            cal=CALConfig(kind="linear"),
            steps=8,
            patience=100,
            loss=LossWeights(**weights),
            verifier=VerifierConfig(safety_threshold=1.0),
        )
        report = ingest(fresh(pair), pair["packet"], config, keys=pair["key"].verify_key, suite=suite)
        last = report.losses[-1]
        if off:
            assert last[off] == 0.0
        results[off] = (round(last["total"], 7), round(last["geo"], 7))
    assert len(set(results.values())) == 5, results


def test_save_then_load_reproduces_identical_outputs(pair: dict, tmp_path: Path) -> None:
    student = fresh(pair)
    config = IngestConfig(targets=["token:minus"], cal=CALConfig(kind="mlp", hidden=32), steps=10)
    ingest(student, pair["packet"], config, keys=pair["key"].verify_key, suite=pair["suite"])
    path = student.save_trainable(tmp_path / "ingested.safetensors")
    reloaded = fresh(pair)
    reloaded.load_trainable(path)
    assert torch.equal(reloaded.answer_distribution(pair["minus"]), student.answer_distribution(pair["minus"]))
    mapped = reloaded.cal(torch.ones(2, student.cal.d_teacher))
    assert torch.equal(mapped, student.cal(torch.ones(2, student.cal.d_teacher)))
    other = Student(copy.deepcopy(pair["student"]).requires_grad_(False).apply(_perturb))
    with pytest.raises(ValueError, match="different core"):
        other.load_trainable(path)


def _perturb(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Linear):
        module.weight.data.add_(1e-3)


def test_config_round_trip_and_refusals(pair: dict, tmp_path: Path) -> None:
    config = IngestConfig(targets=["token:minus"], cal=CALConfig(kind="lowrank", rank=4), steps=3)
    again = IngestConfig.load(config.save(tmp_path / "c.json"))
    assert again.to_json() == config.to_json()
    with pytest.raises(ValueError, match="unknown field"):
        IngestConfig.from_json({"stepz": 3})
    student = fresh(pair)
    with pytest.raises(IngestError, match="no concept"):
        ingest(student, pair["packet"], IngestConfig(targets=["token:times"]), keys=pair["key"].verify_key)
    other = SigningKey.from_seed(bytes(32))
    from m2kt.format import PacketError

    with pytest.raises(PacketError):
        ingest(student, pair["packet"], IngestConfig(targets=["token:minus"]), keys=other.verify_key)
    assert student.cal is None and student.injector.token_ids == []


def test_cli_ingest_writes_weights_and_report(pair: dict, tmp_path: Path) -> None:
    save_tiny(pair["student"], tmp_path / "student")
    keys = generate_keypair(tmp_path, "teacher")
    signing = load_signing_key(keys.private)
    packet = build_packet(
        copy.deepcopy(pair["student"]),  # any model signs a packet; here the student's own concepts
        PacketSpec(
            topic="arith.self",
            layer="embed",
            concepts=ConceptsSpec(
                named=tuple(NamedProbe(label=f"token:{op}", inputs=probes(op), position=1) for op in ("add", "sub"))
            ),
            private=False,  # the student probes itself with the concepts' inputs
        ),
        signing,
        tmp_path / "p.m2kt",
    )
    (tmp_path / "cfg.json").write_text(json.dumps({"targets": [], "steps": 3, "inject": {"mode": "none"}}))
    (tmp_path / "suite.json").write_text(json.dumps({"task": pair["suite"].task[:20]}))
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            str(packet),
            "--student",
            str(tmp_path / "student"),
            "--config",
            str(tmp_path / "cfg.json"),
            "--suite",
            str(tmp_path / "suite.json"),
            "--key",
            str(keys.public),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["decision"] == "accepted" and (tmp_path / "out" / "ingested.safetensors").is_file()
    assert "accepted" in result.output
    bad = CliRunner().invoke(
        app,
        [
            "ingest",
            str(packet),
            "--student",
            str(tmp_path / "student"),
            "--config",
            str(tmp_path / "cfg.json"),
            "--suite",
            str(tmp_path / "suite.json"),
            "--key",
            str(tmp_path / "missing.pub"),
            "--out",
            str(tmp_path / "out2"),
        ],
    )
    assert bad.exit_code == 3


def test_cli_ingest_posts_a_receipt_to_the_broker(pair: dict, live_broker, tmp_path: Path) -> None:
    from m2kt.benchmarks.harness.brokers import register_node, unique

    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    student_node = register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)
    topic = unique("arith")
    packet = build_packet(
        copy.deepcopy(pair["student"]),
        PacketSpec(
            topic=topic,
            layer="embed",
            concepts=ConceptsSpec(
                named=tuple(NamedProbe(label=f"token:{op}", inputs=probes(op), position=1) for op in ("add", "sub"))
            ),
            private=False,  # the student probes itself with the concepts' inputs
        ),
        teacher.key,
        tmp_path / "p.m2kt",
    )
    r = teacher.http.post(f"/v1/topics/{topic}/packets", content=packet.read_bytes())
    assert r.status_code in (200, 201), r.text
    packet_id = r.json()["id"]
    save_tiny(pair["student"], tmp_path / "student")
    (tmp_path / "teacher.pub").write_text(teacher.key.verify_key.to_pem())
    (tmp_path / "cfg.json").write_text(json.dumps({"targets": [], "steps": 2, "inject": {"mode": "none"}}))
    (tmp_path / "suite.json").write_text(json.dumps({"task": pair["suite"].task}))
    result = CliRunner().invoke(
        app,
        [
            "--broker",
            live_broker.url,
            "--token",
            student_node.token,
            "ingest",
            str(packet),
            "--student",
            str(tmp_path / "student"),
            "--config",
            str(tmp_path / "cfg.json"),
            "--suite",
            str(tmp_path / "suite.json"),
            "--key",
            str(tmp_path / "teacher.pub"),
            "--out",
            str(tmp_path / "out"),
            "--receipt",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"receipt  posted for {packet_id}" in result.output
    receipts = student_node.http.get(f"/v1/packets/{packet_id}/receipts")
    assert receipts.status_code == 200, receipts.text
    body = receipts.json()
    items = body["items"] if isinstance(body, dict) else body
    assert items and items[0]["decision"] == "accepted"


def test_trust_region_keeps_mapped_targets_near_the_zero_shot_map(pair: dict) -> None:
    zero = fresh(pair)
    ingest(
        zero,
        pair["packet"],
        IngestConfig(targets=["token:minus"], cal=CALConfig(kind="linear"), steps=0),
        keys=pair["key"].verify_key,
        suite=pair["suite"],
    )
    bounded = fresh(pair)
    config = IngestConfig(
        targets=["token:minus"],
        cal=CALConfig(kind="linear"),
        steps=20,
        lr=0.1,
        patience=100,
        holdout_fraction=0.0,  # fit on the anchors the 0-step map used (0 steps hold none out)
        trust_region=0.01,
        loss=LossWeights(geo=1.0, struct=1.0, reason=1.0),
    )
    report = ingest(bounded, pair["packet"], config, keys=pair["key"].verify_key, suite=pair["suite"])
    assert report.steps_run == 20 and report.decision == "accepted"
    base, moved = zero.injector.vectors, bounded.injector.vectors
    assert float((moved - base).norm() / base.norm()) <= 0.0101


def test_an_interrupted_ingestion_leaves_the_student_as_it_was(pair: dict) -> None:
    student = fresh(pair)
    outputs = student.answer_distribution(pair["minus"])

    def interrupt(step: int, total: int, terms: object) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(
            student,
            pair["packet"],
            IngestConfig(targets=["token:minus"], steps=10, adapter=AdapterConfig(enabled=True)),
            keys=pair["key"].verify_key,
            progress=interrupt,
        )
    assert student.cal is None and len(student.adapters) == 0 and student.injector.token_ids == []
    assert torch.equal(student.answer_distribution(pair["minus"]), outputs)


def test_an_ingestion_that_verifies_nothing_is_rolled_back(pair: dict) -> None:
    """With no probe suite the verifier has nothing to check; such an ingestion is never reported as
    accepted (issue 19): it is rolled back with a check that says what to give."""
    student = fresh(pair)
    report = ingest(
        student, pair["packet"], IngestConfig(targets=["token:minus"], steps=0), keys=pair["key"].verify_key
    )
    assert report.decision == "rolled_back" and report.injected == []
    assert [c["name"] for c in report.checks] == ["verified"]
    assert "no verifier check ran" in report.reasons[0] and "--suite" in report.reasons[0]
    assert student.injector.token_ids == [] and student.cal is None
