"""Small, valid packets for tests and benchmarks: a manifest body, tensors, and signed bytes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from m2kt.format import write_packet
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import (
    ConceptEntry,
    DataUsage,
    ExtractionInfo,
    ExtractionStep,
    ManifestBody,
    SafetyInfo,
    TeacherInfo,
)

__all__ = ["make_body", "make_tensors", "packet_bytes"]


def make_body(k: int = 4, d: int = 8, topic: str = "arith.mod97", **overrides: object) -> ManifestBody:
    fields: dict[str, object] = dict(
        topic=topic,
        teacher=TeacherInfo(
            model_name="tiny-transformer", architecture=f"TinyTransformer(d={d})", d_model=d, layers=["blocks.1"]
        ),
        concepts=[
            ConceptEntry(id=f"op:{i}", label=f"concept {i} — ü", kind="named", safety_score=0.01 * i) for i in range(k)
        ],
        extraction=ExtractionInfo(
            concepts=ExtractionStep(method="named_probes", params={"layer": "blocks.1", "position": -1}),
            traces=ExtractionStep(method="layer_states", params={"steps": 3}),
        ),
        data_usage=DataUsage(probe_count=16, teacher_forward_passes=2),
        created_at=datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC),
        safety=SafetyInfo(scorer="flagged-cosine", version="1", threshold=0.8),
    )
    fields.update(overrides)
    return ManifestBody(**fields)  # type: ignore[arg-type]


def make_tensors(k: int = 4, d: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "concepts": rng.standard_normal((k, d)).astype(np.float32),
        "traces": rng.standard_normal((3, 3, d)).astype(np.float16),
        "probe_tokens": rng.integers(0, 97, (3, 5)).astype(np.int64),
    }


def packet_bytes(
    tmp: Path,
    key: SigningKey,
    topic: str,
    *,
    seed: int = 0,
    tensors: dict[str, np.ndarray] | None = None,
    **overrides: object,
) -> bytes:
    path = tmp / f"{uuid.uuid4().hex}.m2kt"
    write_packet(path, make_body(topic=topic, **overrides), tensors or make_tensors(seed=seed), key)
    data = path.read_bytes()
    path.unlink()
    return data
