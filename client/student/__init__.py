"""The student side (Algorithm 2): ingest a packet through a Concept Alignment Layer, verify, roll back.

    from m2kt.student import IngestConfig, ProbeSuite, Student, ingest
    student = Student(model)                                   # core frozen
    report = ingest(student, "arith.m2kt", IngestConfig(targets=["token:plus"]), keys=teacher_key, suite=suite)
    report.decision, report.save("report.json")                # an IngestReport

Modules, one job each: ``config`` (the dataclass tree, saved as JSON), ``cal`` (linear, low-rank,
MLP and anchor-relative CALs, closed-form initialisation), ``losses`` (L_geo absolute and
relational, L_struct, L_reason, L_safety), ``student`` (the frozen core with injector and
adapters; save/load of what was trained), ``probing`` (read a verified packet; c^S_k),
``verifier`` (probe suite, verifier and safety auditor), ``training`` (the train step: CAL, composite
loss, trust region), ``ingest`` (the algorithm, step by step), ``report`` (:class:`IngestReport`);
for encoders and private concepts: ``alignment`` (closed-form maps fitted on public anchors),
``mapping`` (the concepts mapped, verified, kept), ``concepts`` (labelled vectors and the nearest-
concept classifier), ``store`` (an alignment kept per teacher for reuse). It
imports torch and the torch layer (:mod:`m2kt.nn`), never the teacher.
"""

from __future__ import annotations

from m2kt.errors import IngestError
from m2kt.student.cal import CALConfig, ConceptAlignmentLayer, build_cal
from m2kt.student.concepts import ConceptMap
from m2kt.student.config import (
    AdapterConfig,
    AlignmentConfig,
    IngestConfig,
    InjectConfig,
    RebindConfig,
    VerifierConfig,
)
from m2kt.student.ingest import ingest
from m2kt.student.losses import CompositeLoss, LossWeights
from m2kt.student.mapping import map_concepts
from m2kt.student.report import IngestReport
from m2kt.student.student import ResidualAdapter, Student, TokenInjector
from m2kt.student.training import CALTrainer
from m2kt.student.verifier import ProbeSuite

__all__ = [
    "AdapterConfig",
    "AlignmentConfig",
    "CALTrainer",
    "CALConfig",
    "CompositeLoss",
    "ConceptAlignmentLayer",
    "ConceptMap",
    "IngestConfig",
    "IngestError",
    "IngestReport",
    "InjectConfig",
    "LossWeights",
    "ProbeSuite",
    "RebindConfig",
    "ResidualAdapter",
    "Student",
    "TokenInjector",
    "VerifierConfig",
    "build_cal",
    "ingest",
    "map_concepts",
]
