"""The teacher side (Algorithm 1): turn a trained model's understanding into a signed packet.

    from m2kt.teacher import PacketSpec, build_packet, load_spec
    path = build_packet(model, load_spec("spec.yaml"), signing_key, "out.m2kt")

Modules, one job each: ``spec`` (what to extract, checked before heavy work), ``probing`` (one
batched pass over the probes through the model's adapter, :mod:`m2kt.nn`),
``concepts`` (named probes, k-means clustering, integrated-gradients attribution),
``kmeans``, ``structure`` (attention maps, reasoning traces, abstraction graph), ``safety``
(pluggable scorers), ``selection`` and ``decompose`` (spending queries on a new operation),
``build`` (the whole algorithm — private concepts kept out, public anchors in — then
:func:`m2kt.format.write_packet`).

This package imports torch and the torch layer; it never imports the student or the toy model.
"""

from __future__ import annotations

from m2kt.errors import SpecError
from m2kt.teacher.build import Extraction, Plan, build_packet, check_spec, extract
from m2kt.teacher.safety import CosineFlaggedScorer, SafetyScorer
from m2kt.teacher.spec import (
    AnchorsSpec,
    AttentionSpec,
    AttributionSpec,
    ClusteringSpec,
    ConceptsSpec,
    DecomposeSpec,
    GraphSpec,
    NamedProbe,
    PacketSpec,
    SafetySpec,
    SelectionSpec,
    TracesSpec,
    load_spec,
)

__all__ = [
    "AnchorsSpec",
    "AttentionSpec",
    "AttributionSpec",
    "ClusteringSpec",
    "ConceptsSpec",
    "DecomposeSpec",
    "CosineFlaggedScorer",
    "Extraction",
    "GraphSpec",
    "NamedProbe",
    "PacketSpec",
    "Plan",
    "SafetyScorer",
    "SafetySpec",
    "SelectionSpec",
    "SpecError",
    "TracesSpec",
    "build_packet",
    "check_spec",
    "extract",
    "load_spec",
]
