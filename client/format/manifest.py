"""The signed manifest of a knowledge packet: the paper's metadata M, as pydantic models.

The manifest is stored as canonical JSON (sorted keys, no spaces, UTF-8) in the packet's
safetensors ``__metadata__`` under ``m2kt.manifest``; the Ed25519 signature covers exactly
those bytes. Everything a receiver needs to trust the tensors is in here: the digest of the
tensor data section, the tensor table (names, dtypes, shapes, offsets), who signed it and
with which key, and what the packet cost the teacher (its data usage).

``ManifestBody`` is what a teacher fills in; ``Manifest`` adds the fields the packet writer
computes (format version, tensor table, data digest, key fingerprint).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_serializer,
    field_validator,
    model_validator,
)

__all__ = [
    "FORMAT_VERSION",
    "SHA256_PATTERN",
    "TOPIC_PATTERN",
    "AnchorInfo",
    "AnchorSet",
    "ConceptEntry",
    "DataUsage",
    "ExtractionInfo",
    "ExtractionStep",
    "Manifest",
    "ManifestBody",
    "SafetyInfo",
    "TeacherInfo",
    "TensorSpec",
    "canonical_json",
    "manifest_json_schema",
]

FORMAT_VERSION = 1
SHA256_PATTERN = r"^[0-9a-f]{64}$"
#: Topic names: lowercase letters, digits, '.', '_' and '-', starting and ending alphanumeric.
TOPIC_PATTERN = r"^[a-z0-9](?:[a-z0-9._-]{0,126}[a-z0-9])?$"
#: Tensor dtype codes, as safetensors spells them.
DTypeCode = Literal["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]

Sha256Hex = Field(pattern=SHA256_PATTERN)


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` the one way M2KT signs it: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _later(description: str) -> Any:
    """A field added after format version 1 shipped: absent from the JSON when unset, so every earlier
    manifest still serialises to exactly its signed bytes (and stays canonical)."""
    return Field(default=None, exclude_if=lambda v: v is None, description=description)


class TeacherInfo(_Strict):
    """The model the knowledge comes from."""

    node: str | None = Field(default=None, max_length=200, description="Broker node id of the teacher, if any.")
    model_name: str = Field(min_length=1, max_length=200)
    architecture: str = Field(min_length=1, max_length=200, description="e.g. 'TinyTransformer(d=64,L=2,H=4)'.")
    weights_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    d_model: int = Field(gt=0, le=1 << 20, description="d_T: width of the teacher's concept space.")
    layers: list[str] = Field(default_factory=list, max_length=1024, description="Layers / modules read.")


class ConceptEntry(_Strict):
    """One row of the ``concepts`` tensor."""

    id: str = Field(min_length=1, max_length=200)
    label: str = Field(max_length=1000)
    kind: str = Field(min_length=1, max_length=64, description="'named', 'cluster', 'attribution', ...")
    safety_score: float = Field(ge=0.0, le=1.0, description="0 = benign, 1 = flagged.")
    examples: int | None = _later("Labelled examples the concept was formed from (a named concept's inputs).")
    private: bool | None = _later("True: only the vector travels; the inputs it was formed from are not in the packet.")


class ExtractionStep(_Strict):
    """How one part of the packet was extracted: a method name and its parameters."""

    method: str = Field(min_length=1, max_length=100)
    params: dict[str, JsonValue] = Field(default_factory=dict)


class ExtractionInfo(_Strict):
    concepts: ExtractionStep
    attention: ExtractionStep | None = None
    traces: ExtractionStep | None = None
    graph: ExtractionStep | None = None


class DataUsage(_Strict):
    """What the packet cost, in currencies M2KT reports apart and never mixes.

    ``labelled_examples``: inputs whose concept or answer the teacher was told (the texts a named class
    concept was averaged from are labelled examples, whether or not they travel); ``unlabelled_probes``:
    inputs run with no label attached (clustering and attribution probes, probes of a new operation,
    public anchors); ``probe_count``: every input the teacher was run on — its queries, labelled,
    unlabelled and synthetic (its own operation tables) alike; ``teacher_forward_passes``: the passes.
    """

    probe_count: int = Field(ge=0, description="Every input the teacher was run on (teacher queries).")
    teacher_forward_passes: int = Field(ge=0)
    labelled_examples: int = Field(default=0, ge=0, description="Inputs whose concept or answer the teacher was told.")
    unlabelled_probes: int | None = _later("Inputs run without a label: probes and public anchors.")


class AnchorSet(_Strict):
    """One set of public anchors: where it comes from, what kind, how many rows of ``anchor_vectors``."""

    source: str = Field(min_length=1, max_length=200, description="Where they come from, e.g. 'wordlist:wamerican'.")
    kind: str = Field(pattern=r"^(general|domain)$", description="general: a prior (a word list); domain: refines it.")
    count: int = Field(ge=0, le=1 << 24)


class AnchorInfo(_Strict):
    """Public, unlabelled inputs the packet carries with the teacher's vectors of them (``anchor_vectors``,
    ``anchor_text``): what a student aligns its space to the teacher's with, without any private data.
    The rows are the sets' inputs, set after set."""

    sets: list[AnchorSet] = Field(min_length=1, max_length=64)
    count: int = Field(ge=0, le=1 << 24, description="All rows: the sum of the sets' counts.")
    layer: str = Field(min_length=1, max_length=200, description="The teacher layer the vectors were read at.")
    pooling: str = Field(min_length=1, max_length=32, description="'mean', 'last', or a token index.")

    @model_validator(mode="after")
    def _counts_add_up(self) -> AnchorInfo:
        if sum(s.count for s in self.sets) != self.count:
            raise ValueError(f"anchors: the sets hold {sum(s.count for s in self.sets)} rows, not {self.count}")
        return self


class SafetyInfo(_Strict):
    scorer: str = Field(min_length=1, max_length=100)
    version: str = Field(min_length=1, max_length=50)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class TensorSpec(_Strict):
    """One entry of the tensor table; offsets are relative to the start of the data section."""

    name: str = Field(min_length=1, max_length=200)
    dtype: DTypeCode
    shape: list[int] = Field(max_length=8)
    data_offsets: tuple[int, int]

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, shape: list[int]) -> list[int]:
        if any(d < 0 for d in shape):
            raise ValueError("shape dimensions must be >= 0")
        return shape


class ManifestBody(_Strict):
    """The part of the manifest the teacher writes; the packet writer adds the rest."""

    topic: str = Field(pattern=TOPIC_PATTERN)
    teacher: TeacherInfo
    concepts: list[ConceptEntry] = Field(min_length=1, max_length=1 << 20)
    extraction: ExtractionInfo
    data_usage: DataUsage
    parents: list[str] = Field(default_factory=list, max_length=1024, description="Packet ids (sha256).")
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    safety: SafetyInfo
    anchors: AnchorInfo | None = _later("Public anchors the packet carries (anchor_vectors, anchor_text).")

    @field_validator("parents")
    @classmethod
    def _parents_are_ids(cls, parents: list[str]) -> list[str]:
        import re

        for p in parents:
            if not re.fullmatch(SHA256_PATTERN, p):
                raise ValueError(f"parent {p!r} is not a packet id (64 lowercase hex digits)")
        if len(set(parents)) != len(parents):
            raise ValueError("parents must not repeat")
        return parents

    @field_validator("concepts")
    @classmethod
    def _unique_concept_ids(cls, concepts: list[ConceptEntry]) -> list[ConceptEntry]:
        ids = [c.id for c in concepts]
        if len(set(ids)) != len(ids):
            raise ValueError("concept ids must be unique")
        return concepts

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @field_serializer("created_at")
    def _iso(self, value: datetime) -> str:
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Manifest(ManifestBody):
    """The full signed manifest, as stored in ``m2kt.manifest``."""

    format_version: Literal[1] = 1
    tensors: list[TensorSpec] = Field(min_length=1, max_length=4096)
    data_sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the tensor data section.")
    key_fingerprint: str = Field(pattern=SHA256_PATTERN, description="sha256 of the raw Ed25519 public key.")

    @model_validator(mode="after")
    def _tensors_agree_with_concepts(self) -> Manifest:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensor names must be unique")
        by_name = {t.name: t for t in self.tensors}
        concepts = by_name.get("concepts")
        if concepts is None:
            raise ValueError("the packet must carry a 'concepts' tensor")
        if concepts.dtype not in ("F64", "F32", "F16", "BF16"):
            raise ValueError(f"'concepts' must be a float tensor, not {concepts.dtype}")
        expected = [len(self.concepts), self.teacher.d_model]
        if concepts.shape != expected:
            raise ValueError(
                f"'concepts' has shape {concepts.shape} but the manifest lists "
                f"{len(self.concepts)} concepts of width d_model={self.teacher.d_model}"
            )
        return self

    def body(self) -> ManifestBody:
        """The teacher-written part, e.g. to re-sign the same content."""
        return ManifestBody.model_validate(self.model_dump(include=set(ManifestBody.model_fields)))

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed."""
        return canonical_json(self.model_dump(mode="json"))


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema of ``m2kt.manifest`` (what ``m2kt packet schema`` prints)."""
    schema = Manifest.model_json_schema(mode="serialization")
    schema["$id"] = "https://m2kt.dev/schema/manifest-v1.json"
    schema["title"] = "M2KT knowledge packet manifest (format version 1)"
    return schema
