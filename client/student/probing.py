"""Read a verified packet into torch, and probe the student for its own concept representations.

Student probing (Algorithm 2, line 2): run each concept's probe inputs — inputs only, never
labels — through the student and take its state at the probe's position: c^S_k is the mean
over the concept's member probes. The probe inputs come from the packet as text, so the
student's own tokenizer reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from m2kt.errors import IngestError
from m2kt.format import open_packet, packet_id
from m2kt.format.keys import VerifyKey
from m2kt.format.manifest import Manifest
from m2kt.format.probe_text import ANCHOR_TEXT, PROBE_ANSWER, decode_probe_texts, decode_texts, has_texts
from m2kt.nn.select import select
from m2kt.student.student import Student

__all__ = ["PacketContents", "StudentProbe", "probe_student", "read_packet"]


_READ = frozenset(
    {"concepts", "concept_members", "probe_positions", "probe_lengths", "attention", "traces", "anchor_vectors"}
)


@dataclass
class PacketContents:
    """A packet's tensors as torch tensors (copies; the file is closed)."""

    path: Path
    id: str
    manifest: Manifest
    concepts: torch.Tensor  # (K, d_T)
    labels: list[str]
    members: torch.Tensor  # (P,) long, -1 for none
    texts: list[str]  # P probe inputs
    positions: torch.Tensor  # (P,) long, -1 = mean
    lengths: torch.Tensor  # (P,) long: teacher token counts
    attention: torch.Tensor | None  # (K or P, layers', heads', L, L)
    traces: torch.Tensor | None  # (P, m, d_T)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # any other float tensor, by name
    answers: list[str] | None = None  # the teacher's own answer to each probe, when the packet carries them
    anchor_texts: list[str] = field(default_factory=list)  # public anchors, when the packet carries them
    anchor_vectors: torch.Tensor | None = None  # (N, d_T): the teacher's vectors of them

    @property
    def anchor_general(self) -> torch.Tensor:
        """(N,) bool: the anchors of ``general`` sets (a prior, e.g. a word list), per the manifest."""
        anchors = self.manifest.anchors
        if anchors is None:
            return torch.zeros(len(self.anchor_texts), dtype=torch.bool)
        flags = [s.kind == "general" for s in anchors.sets for _ in range(s.count)]
        return torch.tensor(flags, dtype=torch.bool)

    def concept_index(self, label: str) -> int:
        return self.labels.index(label)


def read_packet(path: str | Path, keys: VerifyKey | Sequence[VerifyKey]) -> PacketContents:
    """Verify (structure, digest, signature, finiteness), then load. Nothing is unpickled or executed."""
    with open_packet(path) as packet:
        packet.verify(keys)  # the mapped file itself: what is verified is what is read
        t = packet.tensors

        def get(name: str) -> torch.Tensor | None:
            return torch.from_numpy(np.array(t[name])).float() if name in t else None

        members = torch.from_numpy(np.array(t["concept_members"], dtype=np.int64)) if "concept_members" in t else None
        texts = decode_probe_texts(t) if "probe_text" in t else []
        answers = decode_texts(t, PROBE_ANSWER) if has_texts(t, PROBE_ANSWER) else None
        if answers is not None and len(answers) != len(texts):
            raise IngestError(f"the packet has {len(answers)} probe answers for {len(texts)} probes")
        concepts = get("concepts")
        assert concepts is not None
        return PacketContents(
            path=Path(path),
            id=packet_id(path),
            manifest=packet.manifest,
            concepts=concepts,
            labels=[c.label for c in packet.manifest.concepts],
            members=members if members is not None else torch.full((len(texts),), -1),
            texts=texts,
            positions=torch.from_numpy(np.array(t["probe_positions"], dtype=np.int64))
            if "probe_positions" in t
            else torch.full((len(texts),), -1),
            lengths=torch.from_numpy(np.array(t["probe_lengths"], dtype=np.int64))
            if "probe_lengths" in t
            else torch.zeros(len(texts), dtype=torch.long),
            attention=get("attention"),
            traces=get("traces"),
            extra={name: get(name) for name in t if name not in _READ and np.dtype(t[name].dtype).kind == "f"},
            answers=answers,
            anchor_texts=decode_texts(t, ANCHOR_TEXT) if has_texts(t, ANCHOR_TEXT) else [],
            anchor_vectors=get("anchor_vectors"),
        )


@dataclass
class StudentProbe:
    """The student's own view of the packet's probes."""

    concepts: torch.Tensor  # (K, d_S): c^S_k, zero where a concept has no probe
    has_probes: torch.Tensor  # (K,) bool
    states: torch.Tensor  # (P, d_S) at each probe's position
    positions: list[int | str]  # per probe, in the student's tokenization
    passes: int  # student forward passes used


def _student_positions(contents: PacketContents, lengths: list[int]) -> list[int | str]:
    """Where the student reads each probe: the mean over its own tokens where the teacher mean-pooled
    (whatever either tokenizer's count), its last token where the teacher read its last, the same index
    where both tokenise the probe to the same length, else the same offset from the end."""
    out: list[int | str] = []
    for i, n in enumerate(lengths):
        pos = int(contents.positions[i]) if i < len(contents.positions) else -1
        teacher_n = int(contents.lengths[i]) if i < len(contents.lengths) else n
        if pos == -1:
            out.append("mean")
        elif pos == teacher_n - 1:
            out.append(n - 1)
        elif teacher_n == n:
            out.append(pos)
        else:
            out.append(min(n - 1, max(0, n - (teacher_n - pos))))
    return out


def probe_student(student: Student, contents: PacketContents, layer: str, batch_size: int = 256) -> StudentProbe:
    """c^S_k for every concept with member probes, at the student's ``layer`` (no injection active)."""
    if not contents.texts:
        raise IngestError(
            "the packet carries no probe inputs (probe_text) for the student to probe itself with — its concepts "
            "are private (only their vectors travel); align on the packet's public anchors instead "
            "(a student without an output head does; or set alignment.enabled in the ingest config)"
        )
    batch = student.reader.tokenize(contents.texts)
    positions = _student_positions(contents, batch.lengths)
    saved = (student.injector.token_ids, student.injector.labels, student.injector.vectors)
    student.injector.clear()  # the student's own representations, not what a previous packet injected
    try:
        rows = []
        for start in range(0, len(contents.texts), batch_size):
            stop = min(start + batch_size, len(contents.texts))
            ids, mask = batch.slice(start, stop, student.device)
            capture = student.forward(ids, mask)
            rows.append(select(capture.hidden[layer].float(), mask, positions[start:stop]).cpu())
    finally:
        student.injector.set(*saved)
    states = torch.cat(rows)  # (P, d_S)
    k = len(contents.labels)
    concepts = torch.zeros(k, states.shape[1])
    has = torch.zeros(k, dtype=torch.bool)
    for c in range(k):
        chosen = torch.nonzero(contents.members == c).flatten()
        if len(chosen):
            concepts[c] = states[chosen].mean(0)
            has[c] = True
    return StudentProbe(concepts, has, states, positions, len(contents.texts))
