"""A teacher/student pair for ingestion tests and benchmarks/ingest.py.

The teacher (d=64, L=2) is trained on a OP b = over Z_11 with add, sub and the synonym
'minus' (= sub); the student (d=48, L=3, another seed) on add and sub only, with 'minus' in its
vocabulary but never trained. The packet carries token concepts read at the embedding layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.keys import SigningKey
from client.student import ProbeSuite, Student
from client.symbolic import ModularTask
from client.teacher import ConceptsSpec, NamedProbe, PacketSpec, build_packet
from client.teacher.tiny_model import TinyConfig, TrainConfig, train_tiny

P = 11
TEACHER_TASK = ModularTask(p=P, operators={"add": "add", "sub": "sub", "minus": "sub"})
STUDENT_TASK = ModularTask(p=P, operators={"add": "add", "sub": "sub"}, vocab_operators=("minus",))


def probes(op: str, n: int = 12) -> tuple[str, ...]:
    return tuple(f"{a} {op} {b} =" for a in range(P) for b in range(P))[:n]


def make_synonym_pair(directory: Path) -> dict[str, Any]:
    """Independently trained, differently shaped teacher and student, and the teacher's signed packet."""
    assert TEACHER_TASK.vocabulary() == STUDENT_TASK.vocabulary()
    teacher, teacher_metrics = train_tiny(
        TEACHER_TASK, TinyConfig.for_task(TEACHER_TASK), TrainConfig(seed=0, steps=600)
    )
    student, student_metrics = train_tiny(
        STUDENT_TASK,
        TinyConfig.for_task(STUDENT_TASK, d_model=48, n_heads=3, n_layers=3),
        TrainConfig(seed=1, steps=600),
    )
    key = SigningKey.from_seed(bytes(range(32)))
    named = tuple(NamedProbe(label=f"token:{op}", inputs=probes(op), position=1) for op in ("add", "sub", "minus"))
    path = build_packet(
        teacher,
        PacketSpec(topic="arith.synonyms", layer="embed", concepts=ConceptsSpec(named=named)),
        key,
        directory / "synonyms.m2kt",
    )
    subs = [e for e in STUDENT_TASK.examples() if e.operator == "sub"]
    return {
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


def accuracy(student: Student, texts: list[str], answers: list[str]) -> float:
    return sum(p == a for p, a in zip(student.predict(texts), answers, strict=True)) / len(texts)
