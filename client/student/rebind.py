"""Ingestion by re-binding: the student acquires a new operation as a composition of the ones it has.

    config = IngestConfig(rebind=RebindConfig(enabled=True, operators=["sub"]), inject=InjectConfig(layer="embed.tok"))
    report = ingest(student, "add.m2kt", config, keys=teacher_pub, suite=suite)   # e.g. add = sub(a, sub("0", b))

Steps, each a function:

1. :func:`observations` — the packet's probes of the new operator with the teacher's own answers
   (``probe_answer``: outputs of the probes' teacher queries, never labels);
2. :func:`find_rebinding` — the student's own operation tables (its forward passes over the operand
   domain: no teacher queries) and the search (:func:`m2kt.nn.programs.search`), or the decomposition the
   packet declares, checked the same way;
3. :func:`apply_rebinding` — slot bindings at the injection layer (one pass) or a program binding (a
   short trace of the core's own passes; with ``vote``, several programs of the same operation, found by
   :func:`voters`, answer together and the majority wins);
4. the verifier: the owner's suite before and after, and the student's answers to the packet's probes
   after the binding, which must agree with the teacher's on ``min_explained`` of them. Otherwise — or
   when no composition explains the probes — everything is rolled back, bit for bit.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from m2kt.errors import IngestError
from m2kt.nn.device import pick_device
from m2kt.nn.programs import Expr, Observation, OperationTables, SearchResult, Template, search
from m2kt.student.binding import ProgramBinding, SlotBinding
from m2kt.student.checkpoint import checkpoint, rollback
from m2kt.student.config import IngestConfig, RebindConfig
from m2kt.student.probing import PacketContents
from m2kt.student.report import IngestReport, outcome_fields
from m2kt.student.student import Student
from m2kt.student.verifier import Check, ProbeSuite, audit, decide, snapshot

__all__ = ["Rebinding", "apply_rebinding", "find_rebinding", "ingest_by_rebinding", "observations", "voters"]


@dataclass
class Rebinding:
    """What the student found for the new operator, and what it cost."""

    target: str
    program: Expr | None
    source: str  # "declared" (the packet's), "search" (the student's own), or "none"
    explained: int
    total: int
    candidates: int  # programs scored
    student_passes: int  # forward passes of the student's core for its operation tables
    declared: str | None = None
    tied: list[str] = field(default_factory=list)  # other programs that explain as much but compute differently
    voters: list[Expr] = field(default_factory=list)  # other programs that answer with it (``vote``)

    def as_dict(self, apply: str) -> dict[str, Any]:
        return {
            "target": self.target,
            "program": str(self.program) if self.program is not None else None,
            "source": self.source,
            "explained": self.explained,
            "observations": self.total,
            "candidates": self.candidates,
            "student_passes": self.student_passes,
            "declared": self.declared,
            "tied": self.tied,
            "voters": [str(v) for v in self.voters],
            "apply": apply,
        }


def observations(
    contents: PacketContents, template: Template, target: str | None, own: Sequence[str]
) -> tuple[str, list[Observation]]:
    """(the operator to bind, its probes with the teacher's answers) from a verified packet."""
    if contents.answers is None:
        raise IngestError(
            "re-binding needs the teacher's answers to its probes, and this packet carries none (probe_answer)"
        )
    parsed = [(template.parse(text), answer) for text, answer in zip(contents.texts, contents.answers, strict=True)]
    spelled = [(slots, answer) for slots, answer in parsed if slots is not None]
    if target is None:
        new = Counter(slots[1] for slots, _ in spelled if slots[1] not in own)
        if not new:
            raise IngestError(f"no probe of the packet uses an operator the student lacks (template {template.text!r})")
        target = new.most_common(1)[0][0]
    found = [Observation(slots[0], slots[2], answer) for slots, answer in spelled if slots[1] == target]
    if not found:
        raise IngestError(f"the packet has no probe of {target!r} spelled as {template.text!r}")
    return target, found


def _domain(config: RebindConfig, template: Template, found: Sequence[Observation], suite: ProbeSuite) -> list[str]:
    if config.operands is not None:
        return list(config.operands)
    values: dict[str, None] = {}
    for text in suite.task:
        slots = template.parse(text)
        if slots is not None:
            values.update(dict.fromkeys((slots[0], slots[2])))
    for o in found:
        values.update(dict.fromkeys((o.a, o.b)))
    return list(values)


def _declared(contents: PacketContents, target: str) -> str | None:
    traces = contents.manifest.extraction.traces
    decomposition = traces.params.get("decomposition") if traces is not None else None
    if isinstance(decomposition, dict) and decomposition.get("operator") == target:
        program = decomposition.get("program")
        return program if isinstance(program, str) else None
    return None


def find_rebinding(
    student: Student, contents: PacketContents, config: RebindConfig, suite: ProbeSuite
) -> tuple[Rebinding, OperationTables, list[Observation]]:
    """The composition of the student's own operations that explains the teacher's answers (no state change)."""
    template = Template(config.template)
    target, found = observations(contents, template, config.target, config.operators)
    domain = _domain(config, template, found, suite)
    tables = OperationTables.probe(student.predict, template, config.operators, domain)
    need = len(found) - int((1.0 - config.min_explained) * len(found) + 1e-9)
    declared = _declared(contents, target)
    if declared is not None:
        try:
            program = Expr.parse(declared)
        except ValueError:
            program = None
        if program is not None and program.variables() <= {"a", "b"}:
            hits = sum(program.evaluate({"a": o.a, "b": o.b}, tables.run) == o.answer for o in found)
            if hits >= need:
                return (
                    Rebinding(target, program, "declared", hits, len(found), 1, tables.passes, declared),
                    tables,
                    found,
                )
    result = (
        search(
            found,
            tables,
            config.operators,
            slots=config.slots,
            constants=config.constants,
            min_explained=config.min_explained,
            alternatives=config.vote > 1,
        )
        if config.search
        else SearchResult(None, 0, len(found), 0)
    )
    rebinding = Rebinding(
        target,
        result.program,
        "search" if result.program is not None else "none",
        result.explained,
        result.total,
        result.considered,
        tables.passes,
        declared,
        [str(t) for t in result.tied],
        voters(result, tables, config) if result.program is not None else [],
    )
    return rebinding, tables, found


def voters(result: SearchResult, tables: OperationTables, config: RebindConfig) -> list[Expr]:
    """Up to ``vote - 1`` of the search's alternatives that compute the chosen program's operation: over the
    whole operand domain, by the student's own tables, they give its answer on at least ``min_explained``
    of the pairs (they differ only where the core errs on one of the paths). Each computes a function of its
    own on those tables — a program that runs through exactly the same answers of the core as one already
    voting (``add(a, "0")`` for ``a`` where the core gets that right) would only repeat its vote."""
    assert result.program is not None
    chosen = tables.function(result.program)
    need = config.min_explained * len(chosen)
    seen = {chosen}
    found: list[Expr] = []
    for program in result.alternatives:
        if len(found) >= config.vote - 1:
            break
        function = tables.function(program)
        if function in seen:
            continue
        if sum(x == y and x is not None for x, y in zip(function, chosen, strict=True)) >= need:
            seen.add(function)
            found.append(program)
    return found


def _vectors_at(student: Student, texts: Sequence[str], position: int) -> torch.Tensor:
    """(N, d): the student's own vectors at the injection layer, at ``position`` of each text (nothing injected)."""
    batch = student.reader.tokenize(texts)
    saved = (student.injector.token_ids, student.injector.labels, student.injector.vectors)
    slots = list(student.slots.bindings)
    student.injector.clear()
    student.slots.clear()
    try:
        ids, mask = batch.slice(0, len(batch), student.device)
        capture = student.forward(ids, mask)
    finally:
        student.injector.set(*saved)
        student.slots.set(slots)
    return capture.hidden[student.inject_layer][:, position].detach()  # (N, d)


def apply_rebinding(student: Student, rebinding: Rebinding, tables: OperationTables, config: IngestConfig) -> None:
    """Bind the new operator: slot bindings at the injection layer (``inject``), or a program (``trace``)."""
    program, template = rebinding.program, Template(config.rebind.template)
    assert program is not None and program.op is not None
    if config.rebind.apply == "trace":
        binding = ProgramBinding(rebinding.target, template, program, tuple(rebinding.voters))
        student.programs = {**student.programs, rebinding.target: binding}
        return
    d0, known = tables.domain[0], config.rebind.operators[0]
    probe = template.format(d0, rebinding.target, d0)
    if student.reader.tokenize([probe]).lengths[0] != len(template.words):
        raise IngestError(
            f"slot binding needs one token per word of {template.text!r}; this student's tokenizer splits them "
            "differently — use rebind.apply='trace'"
        )

    def spelled(slot: str, token: str) -> str:
        """An input with ``token`` in ``slot`` and the student's own first operation and operand elsewhere."""
        fill = {"a": d0, "op": known, "b": d0, slot: token}
        return template.format(fill["a"], fill["op"], fill["b"])

    def table(slot: str, values: dict[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``id -> the student's vector for values[id] in slot``, and which rows are set."""
        ids = sorted(values)
        vectors = _vectors_at(student, [spelled(slot, values[i]) for i in ids], template.position(slot))  # (n, d)
        rows = torch.zeros(max(ids) + 1, vectors.shape[1], device=vectors.device, dtype=vectors.dtype)
        defined = torch.zeros(max(ids) + 1, dtype=torch.bool, device=vectors.device)
        rows[ids], defined[ids] = vectors, True
        return rows, defined

    op_pos = template.position("op")
    (target_id,) = _ids_at(student, [probe], op_pos)
    bindings = [SlotBinding(target_id, op_pos, op_pos, op_pos, *table("op", {target_id: str(program.op)}))]
    for arg, slot in zip(program.args, ("a", "b"), strict=True):
        if arg.op is None and not arg.constant and arg.leaf == slot:
            continue  # this operand stays as it is
        (source,) = arg.variables() or {slot}
        source_ids = _ids_at(student, [spelled(source, d) for d in tables.domain], template.position(source))
        values = {
            token_id: value
            for token, token_id in zip(tables.domain, source_ids, strict=True)
            if (value := arg.evaluate({source: token}, tables.run)) is not None
        }
        rows, defined = table(slot, values)
        bindings.append(
            SlotBinding(target_id, op_pos, template.position(slot), template.position(source), rows, defined)
        )
    student.slots.set([*student.slots.bindings, *bindings])


def _ids_at(student: Student, texts: Sequence[str], position: int) -> list[int]:
    batch = student.reader.tokenize(texts)
    return [int(i) for i in batch.input_ids[:, position]]


def _agreement(student: Student, template: Template, target: str, found: Sequence[Observation]) -> int:
    answers = student.predict([template.format(o.a, target, o.b) for o in found])
    return sum(a == o.answer for a, o in zip(answers, found, strict=True))


def ingest_by_rebinding(
    student: Student, contents: PacketContents, config: IngestConfig, suite: ProbeSuite, *, started: float
) -> IngestReport:
    """The whole re-binding ingestion (see the module docstring); rolls back unless every check passes."""
    t0 = time.perf_counter()
    device = pick_device(config.device)
    student.to(device)
    inject_layer = student.inject_layer
    saved = checkpoint(student, inject_layer=inject_layer)
    template = Template(config.rebind.template)
    notes: list[str] = []
    try:
        if config.rebind.apply == "inject":
            student.set_inject_layer(config.inject.layer)
        rebinding, tables, found = find_rebinding(student, contents, config.rebind, suite)
        before = snapshot(student, suite)
        probe_seconds = time.perf_counter() - t0
        t_apply = time.perf_counter()
        if rebinding.program is not None:
            apply_rebinding(student, rebinding, tables, config)
        apply_seconds = time.perf_counter() - t_apply
        t_verify = time.perf_counter()
        after = snapshot(student, suite)
        checks = audit(
            before,
            after,
            config=config.verifier,
            mapped=torch.zeros(0, 0),
            mapped_labels=[],
            flagged_labels=[],
            flagged=torch.zeros(0, 0),
            origin=torch.zeros(0),
        )
        need = len(found) - int((1.0 - config.rebind.min_explained) * len(found) + 1e-9)
        if rebinding.program is None:
            what = "re-binding" if config.rebind.search else "the packet's declared decomposition"
            checks.append(
                Check(
                    "rebinding",
                    False,
                    f"no composition of the student's own operations ({', '.join(config.rebind.operators)}) explains "
                    f"the teacher's answers to {rebinding.target!r}: the best explains {rebinding.explained} of "
                    f"{rebinding.total} probes ({what}, {rebinding.candidates} candidates)",
                    rebinding.explained / max(rebinding.total, 1),
                )
            )
        else:
            agree = _agreement(student, template, rebinding.target, found)
            checks.append(
                Check(
                    "rebinding",
                    agree >= need,
                    f"{rebinding.target} = {rebinding.program}: the student now answers {agree} of {len(found)} "
                    f"probes as the teacher did (needs {need})",
                    agree / len(found),
                )
            )
            if rebinding.voters:
                notes.append(f"{len(rebinding.voters) + 1} programs answer together, the majority wins")
            if rebinding.tied:
                notes.append(f"{len(rebinding.tied)} other program(s) explain the probes as well: {rebinding.tied[:3]}")
        accepted = decide(checks)
    except BaseException:
        rollback(student, saved)
        raise
    if not accepted:
        rollback(student, saved)
    verify_seconds = time.perf_counter() - t_verify
    m = contents.manifest
    return IngestReport(
        **outcome_fields(contents.id, m, checks, accepted),
        probe_scores={
            "before": before.task_score if before.task_score is not None else (1.0 if before.predictions else None),
            "after": after.task_score
            if after.task_score is not None
            else next((c.value for c in checks if c.name == "task"), None),
            "measure": "accuracy" if suite.answers is not None else "agreement with the student before ingestion",
        },
        injected=[f"token:{rebinding.target}"] if accepted else [],
        anchors={"train": [], "holdout": []},
        losses=[],
        zero_shot_holdout_geo=None,
        best_step=-1,
        steps_run=0,
        stopped_early=False,
        trainable_parameters=0,
        notes=notes,
        data_usage={
            "teacher_queries": m.data_usage.probe_count,
            "labelled_examples": m.data_usage.labelled_examples,
            "verifier_labelled_examples": suite.labelled,
            "student_probe_passes": rebinding.student_passes,
        },
        device=str(device),
        mixed_precision=None,
        timings={
            "read": t0 - started,
            "probe": probe_seconds,
            "train": apply_seconds,
            "verify": verify_seconds,
            "total": time.perf_counter() - started,
            "steps_per_second": None,
        },
        config=config.to_json(),
        student={"core_sha256": student.core_sha256, "layer": None, "inject_layer": student.inject_layer},
        rebinding=rebinding.as_dict(config.rebind.apply),
    )
