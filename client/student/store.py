"""Keeping a teacher's anchor pairs, so an alignment fitted once is reused for that teacher's later packets.

Pairs are kept per (teacher weights digest, teacher layer and pooling, student core digest, student layer
and pooling): the teacher's vectors of the public anchors (from its packet) and the student's own vectors
of the same texts. A later packet of the same teacher that carries no anchors is mapped with them — its
concepts cost no new teacher queries. One safetensors file per pair of models; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from m2kt.format.probe_text import decode_texts, encode_texts

__all__ = ["AlignmentStore", "AnchorPairs"]


@dataclass
class AnchorPairs:
    texts: list[str]
    teacher: torch.Tensor  # (N, d_T)
    student: torch.Tensor  # (N, d_S)
    source: str  # where the anchors came from (the manifest's anchor sets)
    packet: str  # the id of the packet they came with
    general: torch.Tensor | None = None  # (N,) bool: rows of general sets (the prior); None: all domain

    def general_mask(self) -> torch.Tensor:
        return self.general if self.general is not None else torch.zeros(len(self.texts), dtype=torch.bool)


class AlignmentStore:
    """A directory of anchor pairs; :meth:`key` names the pair of models and read points."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(teacher_sha: str, teacher_read: str, student_sha: str, student_read: str) -> str:
        return hashlib.sha256(json.dumps([teacher_sha, teacher_read, student_sha, student_read]).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"anchors-{key}.safetensors"

    def save(self, key: str, pairs: AnchorPairs) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        texts = {k: torch.from_numpy(v) for k, v in encode_texts(pairs.texts, "text").items()}
        tensors = {
            "teacher": pairs.teacher.float().contiguous(),
            "student": pairs.student.float().contiguous(),
            "general": pairs.general_mask().to(torch.uint8).contiguous(),
            **texts,
        }
        path = self._path(key)
        save_file(
            tensors, str(path), metadata={"m2kt.anchors": json.dumps({"source": pairs.source, "packet": pairs.packet})}
        )
        return path

    def load(self, key: str) -> AnchorPairs | None:
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("m2kt.anchors", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        texts = decode_texts({k: v.numpy() for k, v in tensors.items()}, "text")
        general = tensors["general"].bool() if "general" in tensors else None
        return AnchorPairs(
            texts, tensors["teacher"], tensors["student"], str(meta.get("source")), str(meta.get("packet")), general
        )
