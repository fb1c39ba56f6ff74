"""The student side (Algorithm 2): ingest a packet through a Concept Alignment Layer, verify, roll back.

    from client.student import IngestConfig, ProbeSuite, Student, ingest
    student = Student(model)                                   # core frozen
    report = ingest(student, "arith.m2kt", IngestConfig(targets=["token:plus"]), keys=teacher_key, suite=suite)

Modules, one job each: ``config`` (the dataclass tree, saved as JSON), ``cal`` (linear, low-rank,
MLP and anchor-relative CALs, closed-form initialisation), ``losses`` (L_geo absolute and
relational, L_struct, L_reason, L_safety), ``student`` (the frozen core with injector and
adapters; save/load of what was trained), ``probing`` (read a verified packet; c^S_k),
``verifier`` (probe suite, verifier and safety auditor), ``ingest`` (the algorithm and its
report). This package imports torch.
"""

from __future__ import annotations

from client.student.cal import CALConfig, ConceptAlignmentLayer, build_cal
from client.student.config import AdapterConfig, IngestConfig, InjectConfig, VerifierConfig
from client.student.ingest import IngestError, ingest
from client.student.losses import CompositeLoss, LossWeights
from client.student.student import ResidualAdapter, Student, TokenInjector
from client.student.verifier import ProbeSuite

__all__ = [
    "AdapterConfig",
    "CALConfig",
    "CompositeLoss",
    "ConceptAlignmentLayer",
    "IngestConfig",
    "IngestError",
    "InjectConfig",
    "LossWeights",
    "ProbeSuite",
    "ResidualAdapter",
    "Student",
    "TokenInjector",
    "VerifierConfig",
    "build_cal",
    "ingest",
]
