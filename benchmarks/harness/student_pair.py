"""A teacher/student pair for ingestion tests and benchmarks/ingest.py.

The teacher (d=64, L=2) is trained on a OP b = over Z_11 with add, sub, the synonyms 'plus'
and 'minus' and the number alias "seven'" (= 7); the student (d=48, L=3, another seed) on add and
sub with plain numbers only — 'plus', 'minus' and "seven'" are in its vocabulary, never trained.
(An untrained operator token is not neutral: the student falls back to one of its operations,
so one synonym may be right by accident before ingestion; tests look at both.)
The packet carries operator concepts read at the embedding layer (token + position);
:func:`alias_packet` writes one with number concepts read at the token embedding alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m2kt.format.keys import SigningKey
from m2kt.student import ProbeSuite
from m2kt.teacher import ConceptsSpec, NamedProbe, PacketSpec, build_packet
from m2kt.toy.model import TinyConfig
from m2kt.toy.probes import operator_probes
from m2kt.toy.symbolic import ModularTask
from m2kt.toy.train import TrainConfig, train_tiny

P = 11  # the demo's task size
ALIAS = "seven'"
TEACHER_TASK = ModularTask(
    p=P, operators={"add": "add", "sub": "sub", "plus": "add", "minus": "sub"}, number_aliases={ALIAS: 7}
)
STUDENT_TASK = ModularTask(
    p=P, operators={"add": "add", "sub": "sub"}, number_aliases={ALIAS: 7}, vocab_operators=("minus", "plus")
)
SYNONYMS = {"plus": "add", "minus": "sub"}


def probes(op: str, n: int = 12) -> tuple[str, ...]:
    """The first ``n`` expressions ``a op b =`` over Z_11: the demo's probes (inputs, never answers)."""
    return operator_probes(op, P, n)


def accuracy(student: Any, texts: list[str], answers: list[str]) -> float:
    """The share of ``texts`` the student answers right (the demo's measure)."""
    return float(student.accuracy(texts, answers))


def make_synonym_pair(directory: Path) -> dict[str, Any]:
    """Independently trained, differently shaped teacher and student, and the teacher's signed packet."""
    assert TEACHER_TASK.vocabulary() == STUDENT_TASK.vocabulary()
    teacher, teacher_metrics = train_tiny(
        TEACHER_TASK,
        TinyConfig.for_task(TEACHER_TASK),
        TrainConfig(seed=0, steps=600),
        examples=TEACHER_TASK.examples(use_aliases=True),
    )
    student, student_metrics = train_tiny(
        STUDENT_TASK,
        TinyConfig.for_task(STUDENT_TASK, d_model=48, n_heads=3, n_layers=3),
        TrainConfig(seed=1, steps=600),
    )
    key = SigningKey.from_seed(bytes(range(32)))
    named = tuple(
        NamedProbe(label=f"token:{op}", inputs=probes(op), position=1) for op in ("add", "sub", "plus", "minus")
    )
    path = build_packet(
        teacher,
        PacketSpec(topic="arith.synonyms", layer="embed", concepts=ConceptsSpec(named=named), private=False),
        key,
        directory / "synonyms.m2kt",
    )
    subs = [e for e in STUDENT_TASK.examples() if e.operator == "sub"]
    adds = [e for e in STUDENT_TASK.examples() if e.operator == "add"]
    return {
        "plus": [" ".join(e.tokens).replace(" add ", " plus ") for e in adds],
        "add": [" ".join(e.tokens) for e in adds],
        "add_answers": [e.answer for e in adds],
        "teacher": teacher,
        "teacher_metrics": teacher_metrics,
        "student": student,
        "student_metrics": student_metrics,
        "key": key,
        "packet": path,
        "minus": [" ".join(e.tokens).replace(" sub ", " minus ") for e in subs],
        "sub": [" ".join(e.tokens) for e in subs],
        "answers": [e.answer for e in subs],
        "suite": ProbeSuite(task=[" ".join(e.tokens) for e in STUDENT_TASK.examples()][::3]),
    }


def alias_packet(pair: dict[str, Any], path: Path) -> Path:
    """Number concepts ``token:<n>`` (and the alias) read at ``embed.tok``: position-free token embeddings."""
    numbers = [str(n) for n in range(P)] + [ALIAS]
    named = tuple(NamedProbe(label=f"token:{n}", inputs=(f"{n} add 1 =", f"{n} sub 2 ="), position=0) for n in numbers)
    spec = PacketSpec(topic="arith.aliases", layer="embed.tok", concepts=ConceptsSpec(named=named), private=False)
    return build_packet(pair["teacher"], spec, pair["key"], path)
