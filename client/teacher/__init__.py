"""The teacher side (Algorithm 1): turn a trained model's understanding into a signed packet.

    from client.teacher import PacketSpec, build_packet, load_spec
    path = build_packet(model, load_spec("spec.yaml"), signing_key, "out.m2kt")

Modules, one job each: ``spec`` (what to extract, checked before heavy work), ``adapters``
(reading hidden states / attention / logits from a TinyTransformer, any ``nn.Module`` via
hooks, or a ``transformers`` model), ``probing`` (one batched pass over the probes),
``concepts`` (named probes, k-means clustering, integrated-gradients attribution),
``kmeans``, ``structure`` (attention maps, reasoning traces, abstraction graph), ``safety``
(pluggable scorers), ``build`` (the whole algorithm, then :func:`client.packet.write_packet`),
``tiny_model`` (the small transformer the demo and benchmarks train), ``loading`` (models
by reference, for the CLI).

This package imports torch; the rest of ``client`` does not.
"""

from __future__ import annotations

from client.teacher.adapters import HookAdapter, ModelAdapter, TransformersAdapter, adapter_for
from client.teacher.build import Extraction, Plan, build_packet, check_spec, extract
from client.teacher.safety import CosineFlaggedScorer, SafetyScorer
from client.teacher.spec import (
    AttentionSpec,
    AttributionSpec,
    ClusteringSpec,
    ConceptsSpec,
    GraphSpec,
    NamedProbe,
    PacketSpec,
    SafetySpec,
    SpecError,
    TracesSpec,
    load_spec,
)

__all__ = [
    "AttentionSpec",
    "AttributionSpec",
    "ClusteringSpec",
    "ConceptsSpec",
    "CosineFlaggedScorer",
    "Extraction",
    "GraphSpec",
    "HookAdapter",
    "ModelAdapter",
    "NamedProbe",
    "PacketSpec",
    "Plan",
    "SafetyScorer",
    "SafetySpec",
    "SpecError",
    "TracesSpec",
    "TransformersAdapter",
    "adapter_for",
    "build_packet",
    "check_spec",
    "extract",
    "load_spec",
]
