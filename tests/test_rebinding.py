"""Re-binding: a student acquires a new operation as a composition of its own, from a handful of probes.

The programs and the search on hand-made tables; then a real TinyTransformer core (p = 23, add and sub,
trained here) ingesting packets that carry a teacher's probes and answers: accepted when a composition
explains them (one-pass slot binding or a multi-pass trace, saved and loaded), refused and rolled back
bit for bit when none does.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from m2kt.benchmarks.harness.packets import make_body
from m2kt.format import write_packet
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import ConceptEntry, DataUsage, ExtractionInfo, ExtractionStep
from m2kt.format.probe_text import PROBE_ANSWER, encode_probe_texts, encode_texts
from m2kt.nn.programs import Expr, Observation, OperationTables, Template, search
from m2kt.teacher.selection import spread_probes
from m2kt.toy.symbolic import ModularTask, operation

P = 23  # the transfer benchmark's size: a d=48 core groks add/sub here in ~400 steps (at p = 13 it did not in 800)
KNOWN = ["add", "sub"]
TEMPLATE = Template()


def _truth(predict_ops: dict[str, str]):  # noqa: ANN202 - a predict callable over the true operations
    def predict(texts: list[str]) -> list[str]:
        out = []
        for text in texts:
            a, op, b = TEMPLATE.parse(text) or ("", "", "")
            out.append(str(operation(predict_ops[op])(int(a), int(b), P)))
        return out

    return predict


def _observations(expression: str, n: int, seed: int = 0) -> list[Observation]:
    pool = [TEMPLATE.format(str(a), "new", str(b)) for a in range(P) for b in range(P)]
    fn = operation(expression)
    chosen = spread_probes(pool, n, TEMPLATE, seed=seed)
    return [Observation(a, b, str(fn(int(a), int(b), P))) for a, _, b in (TEMPLATE.parse(t) for t in chosen)]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------- programs


def test_template_and_program_round_trips() -> None:
    assert TEMPLATE.parse("3 add 5 =") == ("3", "add", "5") and TEMPLATE.parse("3 add 5") is None
    assert TEMPLATE.format("3", "add", "5") == "3 add 5 =" and TEMPLATE.position("b") == 2
    expr = Expr.parse('sub(a, sub("0", b))')
    assert str(expr) == 'sub(a, sub("0", b))' and expr.size == 2 and expr.variables() == {"a", "b"}
    with pytest.raises(ValueError):
        Template("{a} {a} =")
    with pytest.raises(ValueError):
        Expr.parse("sub(a b)")


@pytest.mark.parametrize(
    ("known", "expression", "program"),
    [
        pytest.param(["sub"], "a+b", 'sub(a, sub("0", b))', id="add-from-sub"),
        pytest.param(KNOWN, "a+2*b", "add(a, add(b, b))", id="a+2b"),
        pytest.param(KNOWN, "b-a", "sub(b, a)", id="b-a"),
        pytest.param(KNOWN, "2*a+b", "add(add(a, a), b)", id="2a+b"),
        pytest.param(KNOWN, "a-2*b", "sub(a, add(b, b))", id="a-2b"),
    ],
)
def test_eight_spread_probes_identify_a_composition(known: list[str], expression: str, program: str) -> None:
    tables = OperationTables.probe(_truth({"add": "add", "sub": "sub"}), TEMPLATE, known, [str(v) for v in range(P)])
    result = search(_observations(expression, 8), tables, known)
    assert str(result.program) == program and result.explained == 8 and result.tied == []
    assert tables.passes == len(known) * P * P


def test_what_no_composition_explains_is_not_explained() -> None:
    tables = OperationTables.probe(_truth({"add": "add", "sub": "sub"}), TEMPLATE, KNOWN, [str(v) for v in range(P)])
    for expression in ("a*b", "table:3"):
        result = search(_observations(expression, 16), tables, KNOWN)
        assert result.program is None and result.explained < 16, (expression, result)
    renaming_only = search(_observations("a+2*b", 8), tables, KNOWN, slots=False)
    assert renaming_only.program is None


def test_voters_compute_the_same_operation_and_outvote_a_wrong_cell_of_the_core() -> None:
    """A sub core wrong on one cell: the simplest a+b program runs into it for a = 3, b = 3; the voters are
    other programs that explain the probes and compute a+b elsewhere, and their majority is right on every
    pair of the domain."""
    from m2kt.student import RebindConfig
    from m2kt.student.rebind import voters

    def predict(texts: list[str]) -> list[str]:
        out = _truth({"sub": "sub"})(texts)
        return [str((int(y) + 1) % P) if t == "3 sub 20 =" else y for t, y in zip(texts, out, strict=True)]

    domain = [str(v) for v in range(P)]
    tables = OperationTables.probe(predict, TEMPLATE, ["sub"], domain)
    result = search(_observations("a+b", 8), tables, ["sub"], min_explained=0.9, alternatives=True)
    assert str(result.program) == 'sub(a, sub("0", b))' and result.explained == 8
    config = RebindConfig(enabled=True, operators=["sub"], apply="trace", vote=9)
    found = voters(result, tables, config)
    assert len(found) == 8 and result.program not in found
    truth = [str((int(a) + int(b)) % P) for a in domain for b in domain]
    assert tables.function(result.program).count(None) == 0
    single = [x == y for x, y in zip(tables.function(result.program), truth, strict=True)]
    assert single.count(False) == 1  # the one wrong cell of the core, on the chosen program's path
    functions = [tables.function(p) for p in (result.program, *found)]
    for f in functions[1:]:  # each voter computes a+b, but for the cells of the core it runs into
        assert sum(x == y for x, y in zip(f, truth, strict=True)) >= 0.9 * len(truth)
    majority = [max(set(column), key=column.count) for column in zip(*functions, strict=True)]
    assert majority == truth
    # a program that computes another operation is never a voter, however many probes it explains
    other = search(_observations("a+b", 8), tables, ["sub"], min_explained=0.9, alternatives=True)
    other.alternatives.insert(0, Expr.parse("sub(a, b)"))
    assert Expr.parse("sub(a, b)") not in voters(other, tables, config)


def test_vote_needs_a_trace() -> None:
    from m2kt.student import RebindConfig

    with pytest.raises(ValueError, match="apply='trace'"):
        RebindConfig(enabled=True, operators=["sub"], vote=3)
    with pytest.raises(ValueError, match="at least 1"):
        RebindConfig(enabled=True, operators=["sub"], apply="trace", vote=0)


def test_spread_probes_use_every_operand_value_before_any_twice() -> None:
    pool = [TEMPLATE.format(str(a), "x", str(b)) for a in range(P) for b in range(P)]
    chosen = spread_probes(pool, P, TEMPLATE, seed=5)
    slots = [TEMPLATE.parse(t) for t in chosen]
    assert len({s[0] for s in slots}) == P and len({s[2] for s in slots}) == P  # type: ignore[index]
    assert spread_probes(pool, P, TEMPLATE, seed=5) == chosen


# ----------------------------------------------------------------------------------------- a real core


@pytest.fixture(scope="module")
def core():  # noqa: ANN201
    pytest.importorskip("torch")
    from m2kt.toy.model import TinyConfig
    from m2kt.toy.train import TrainConfig, train_tiny

    task = ModularTask(p=P, operators={"add": "add", "sub": "sub"}, vocab_operators=("twice", "times", "swap"))
    model, metrics = train_tiny(
        task,
        TinyConfig.for_task(task, d_model=48, n_heads=3, n_layers=3),
        TrainConfig(seed=1, steps=800, target_test_accuracy=1.0),  # the held-out split decides when to stop only
    )
    assert metrics["test_accuracy"] >= 0.97, metrics  # the student's own skill, before anything else
    return model, task


def _packet(
    tmp_path: Path, key: SigningKey, operator: str, expression: str, n: int, *, declared: str | None = None
) -> Path:
    """A teacher's packet: ``n`` spread probes of ``operator`` and the teacher's answers (here, exact)."""
    pool = [TEMPLATE.format(str(a), operator, str(b)) for a in range(P) for b in range(P)]
    texts = spread_probes(pool, n, TEMPLATE, seed=1)
    fn = operation(expression)
    answers = [str(fn(int(t.split()[0]), int(t.split()[2]), P)) for t in texts]
    params: dict = {"answers": PROBE_ANSWER}
    if declared:
        params["decomposition"] = {"operator": operator, "program": declared}
    body = make_body(
        k=1,
        d=8,
        topic="arith.rebind",
        concepts=[ConceptEntry(id="c0", label=f"token:{operator}", kind="named", safety_score=0.0)],
        extraction=ExtractionInfo(
            concepts=ExtractionStep(method="named"), traces=ExtractionStep(method="teacher-answers", params=params)
        ),
        data_usage=DataUsage(probe_count=n, teacher_forward_passes=1, labelled_examples=0),
    )
    tensors = {
        "concepts": np.ones((1, 8), np.float32),
        **encode_probe_texts(texts),
        **encode_texts(answers, PROBE_ANSWER),
    }
    return write_packet(tmp_path / f"{operator}-{n}.m2kt", body, tensors, key).path


def _config(apply: str = "inject", **rebind: object):  # noqa: ANN202
    from m2kt.student import IngestConfig, InjectConfig, RebindConfig

    return IngestConfig(
        rebind=RebindConfig(enabled=True, operators=KNOWN, apply=apply, **rebind),  # type: ignore[arg-type]
        inject=InjectConfig(layer="embed.tok"),
        device="cpu",
    )


def _cases(operator: str, expression: str) -> tuple[list[str], list[str]]:
    fn = operation(expression)
    texts = [TEMPLATE.format(str(a), operator, str(b)) for a in range(P) for b in range(P)]
    return texts, [str(fn(a, b, P)) for a in range(P) for b in range(P)]


def _suite(task: ModularTask):  # noqa: ANN202
    from m2kt.student import ProbeSuite

    return ProbeSuite(task=[" ".join(e.tokens) for e in task.examples()][::3])


@pytest.mark.parametrize("apply", ["inject", "trace"])
def test_a_composition_is_acquired_from_eight_probes(core, tmp_path: Path, apply: str) -> None:
    from m2kt.student import Student, ingest

    model, task = core
    key = SigningKey.from_seed(bytes(32))
    student = Student(copy.deepcopy(model))
    texts, answers = _cases("twice", "a+2*b")
    before = student.accuracy(texts, answers)
    report = ingest(
        student, _packet(tmp_path, key, "twice", "a+2*b", 8), _config(apply), keys=key.verify_key, suite=_suite(task)
    )
    assert report.decision == "accepted", report.reasons
    assert report.rebinding is not None and report.rebinding["program"] == "add(a, add(b, b))"
    assert report.rebinding["explained"] == 8 and report.rebinding["student_passes"] == 2 * P * P
    assert report.data_usage["teacher_queries"] == 8 and report.data_usage["labelled_examples"] == 0
    after = student.accuracy(texts, answers)
    assert before < 0.3 and after >= 0.95, (before, after)
    known_texts = [" ".join(e.tokens) for e in task.examples()]
    known_answers = [e.answer for e in task.examples()]
    assert student.accuracy(known_texts, known_answers) >= 0.97  # its own operations are untouched
    # what ingestion bound is saved with the trainable state and loads strictly
    saved = student.save_trainable(tmp_path / "ingested.safetensors")
    again = Student(copy.deepcopy(model))
    again.load_trainable(saved)
    assert again.predict(texts) == student.predict(texts)
    assert report.to_json()["rebinding"]["apply"] == apply


def test_voting_programs_answer_together_and_the_majority_wins(core, tmp_path: Path) -> None:
    """A trace with voters: ingestion finds programs computing a+b from sub alone on the student's own tables
    (through other cells of the core: sub(sub(a, c), sub(c', b)), ...) and binds them all; answers are the
    majority's (a wrong program bound first is outvoted), and the voters are saved."""
    import torch

    from m2kt.student import Student, ingest
    from m2kt.student.binding import ProgramBinding

    model, task = core
    key = SigningKey.from_seed(bytes(32))
    student = Student(copy.deepcopy(model))
    texts, answers = _cases("swap", "a+b")
    config = _config("trace")
    config.rebind = replace(config.rebind, operators=["sub"], vote=5)
    report = ingest(student, _packet(tmp_path, key, "swap", "a+b", 8), config, keys=key.verify_key, suite=_suite(task))
    assert report.decision == "accepted", report.reasons
    assert report.rebinding is not None and report.rebinding["apply"] == "trace"
    program, voters = Expr.parse(report.rebinding["program"]), [Expr.parse(v) for v in report.rebinding["voters"]]
    assert {op for e in (program, *voters) for op in _ops(e)} == {"sub"} and len(voters) <= 4
    assert student.programs["swap"].programs == (program, *voters)
    assert student.accuracy(texts, answers) >= 0.9
    saved = student.save_trainable(tmp_path / "voted.safetensors")
    again = Student(copy.deepcopy(model))
    again.load_trainable(saved)
    assert again.programs["swap"] == student.programs["swap"] and again.predict(texts) == student.predict(texts)

    # majority, not the first program: a wrong program bound first is outvoted by two right ones
    right = [Expr.parse("add(a, add(b, b))"), Expr.parse("add(add(b, b), a)")]
    outvoted = Student(copy.deepcopy(model))
    outvoted.programs = {"twice": ProgramBinding("twice", TEMPLATE, Expr.parse("sub(a, b)"), tuple(right))}
    texts, answers = _cases("twice", "a+2*b")
    alone = Student(copy.deepcopy(model))
    alone.programs = {"twice": ProgramBinding("twice", TEMPLATE, Expr.parse("sub(a, b)"))}
    assert alone.accuracy(texts, answers) < 0.2 and outvoted.accuracy(texts, answers) >= 0.95
    shares = outvoted.answer_distribution(texts[:5])  # each row: the share of the three programs per answer
    assert torch.allclose(shares.sum(-1), torch.ones(5)) and float(shares.max(-1).values.min()) >= 1 / 3


def _ops(e: Expr) -> set[str]:
    return set() if e.op is None else {e.op, *(op for a in e.args for op in _ops(a))}


def test_a_declared_decomposition_is_checked_not_searched(core, tmp_path: Path) -> None:
    from m2kt.student import Student, ingest

    model, task = core
    key = SigningKey.from_seed(bytes(32))
    packet = _packet(tmp_path, key, "swap", "b-a", 8, declared="sub(b, a)")
    report = ingest(
        Student(copy.deepcopy(model)), packet, _config(search=False), keys=key.verify_key, suite=_suite(task)
    )
    assert report.decision == "accepted" and report.rebinding["source"] == "declared", report.reasons
    wrong = _packet(tmp_path, key, "swap", "b-a", 9, declared="add(a, b)")  # a claim the probes contradict
    student = Student(copy.deepcopy(model))
    refused = ingest(student, wrong, _config(search=False), keys=key.verify_key, suite=_suite(task))
    assert refused.decision == "rolled_back" and "declared decomposition" in refused.reasons[0]


@pytest.mark.parametrize("expression", ["a*b", "table:7"])
def test_a_new_operation_no_composition_explains_is_refused_and_rolled_back_bit_for_bit(
    core, tmp_path: Path, expression: str
) -> None:
    import torch

    from m2kt.student import Student, ingest

    model, task = core
    key = SigningKey.from_seed(bytes(32))
    student = Student(copy.deepcopy(model))
    # the student already holds a binding from an earlier ingestion: a refusal must keep it exactly
    first = ingest(
        student, _packet(tmp_path, key, "twice", "a+2*b", 8), _config(), keys=key.verify_key, suite=_suite(task)
    )
    assert first.decision == "accepted"
    state = student.trainable_state()
    probe = [*_cases("times", expression)[0], *_cases("twice", "a+2*b")[0]]
    outputs = student.answer_distribution(probe)
    bindings = [(b.meta(), b.table.clone()) for b in student.slots.bindings]
    report = ingest(
        student, _packet(tmp_path, key, "times", expression, 16), _config(), keys=key.verify_key, suite=_suite(task)
    )
    assert report.decision == "rolled_back" and report.injected == []
    assert "no composition of the student's own operations (add, sub) explains" in report.reasons[0]
    assert report.rebinding["program"] is None and report.rebinding["explained"] < 16
    restored = student.trainable_state()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert [(b.meta(), b.table) for b in student.slots.bindings] and all(
        m == b.meta() and torch.equal(t, b.table) for (m, t), b in zip(bindings, student.slots.bindings, strict=True)
    )
    assert torch.equal(student.answer_distribution(probe), outputs)


def test_slot_binding_off_can_only_rename(core, tmp_path: Path) -> None:
    from m2kt.student import Student, ingest

    model, task = core
    key = SigningKey.from_seed(bytes(32))
    report = ingest(
        Student(copy.deepcopy(model)),
        _packet(tmp_path, key, "twice", "a+2*b", 8),
        _config(slots=False),
        keys=key.verify_key,
        suite=_suite(task),
    )
    assert report.decision == "rolled_back"


def test_a_packet_without_answers_is_refused_before_anything_changes(core, tmp_path: Path) -> None:
    from m2kt.errors import IngestError
    from m2kt.student import Student, ingest

    model, task = core
    key = SigningKey.from_seed(bytes(32))
    body = make_body(k=1, d=8, concepts=[ConceptEntry(id="c0", label="token:twice", kind="named", safety_score=0.0)])
    tensors = {"concepts": np.ones((1, 8), np.float32), **encode_probe_texts(["1 twice 2 ="])}
    path = write_packet(tmp_path / "bare.m2kt", body, tensors, key).path
    student = Student(copy.deepcopy(model))
    with pytest.raises(IngestError, match="teacher's answers"):
        ingest(student, path, _config(), keys=key.verify_key, suite=_suite(task))
    assert student.slots.bindings == [] and student.programs == {}


def test_a_teacher_spec_selects_answers_and_declares_with_every_query_counted(core, tmp_path: Path) -> None:
    """The library path: m2kt.teacher spreads 8 probes, answers them, and declares add = sub(a, 0 - b)
    from its own behaviour, paying for its own operation table in teacher queries."""
    from m2kt.format import open_packet
    from m2kt.format.probe_text import decode_texts
    from m2kt.student import Student, ingest
    from m2kt.teacher import ConceptsSpec, DecomposeSpec, NamedProbe, PacketSpec, SelectionSpec, build_packet

    model, task = core
    key = SigningKey.from_seed(bytes(32))
    pool = tuple(TEMPLATE.format(str(a), "add", str(b)) for a in range(P) for b in range(P))
    spec = PacketSpec(
        topic="arith.add",
        layer="embed",
        concepts=ConceptsSpec(named=(NamedProbe(label="token:add", inputs=("1 add 2 =",), position=1),)),
        probes=pool,
        select=SelectionSpec(count=8),
        answers=True,
        decompose=DecomposeSpec(operator="add", known=("sub",), operands=tuple(str(v) for v in range(P))),
    )
    path = build_packet(copy.deepcopy(model), spec, key, tmp_path / "spec.m2kt")
    with open_packet(path) as packet:
        m = packet.manifest
        assert m.data_usage.probe_count == 1 + 8 + P * P and m.data_usage.labelled_examples == 1  # the named input
        assert m.data_usage.unlabelled_probes == 8
        assert m.extraction.traces is not None
        declared = m.extraction.traces.params["decomposition"]
        assert declared["program"] == 'sub(a, sub("0", b))' and declared["forward_passes"] == P * P
        texts = decode_texts(packet.tensors, "probe_text")
        assert len(texts) == 8 and len(decode_texts(packet.tensors, PROBE_ANSWER)) == 8  # the named input is private
        assert "1 add 2 =" not in texts
    student = Student(copy.deepcopy(model))
    config = _config(search=False)
    config.rebind.operators = ["sub"]
    report = ingest(student, path, config, keys=key.verify_key, suite=_suite(task))
    assert report.decision == "accepted" and report.rebinding["source"] == "declared", report.reasons
