"""Probe inputs for the symbolic tasks: expressions without their answers."""

from __future__ import annotations

__all__ = ["operator_probes"]


def operator_probes(op: str, p: int, n: int = 12) -> tuple[str, ...]:
    """The first ``n`` expressions ``a op b =`` over Z_p (inputs only: the teacher is never given answers)."""
    return tuple(f"{a} {op} {b} =" for a in range(p) for b in range(p))[:n]
