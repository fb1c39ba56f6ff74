"""Choosing which probes to spend teacher queries on: spread them over the operand values.

With few queries, where they fall matters: eight probes that share operands say less about a new
operation than eight that each bring new operand values. :func:`spread_probes` picks, greedily, the input
whose operand values have been used least so far (a seeded tie-break), so every value of every operand
slot appears before any appears twice. It reads inputs through a :class:`~m2kt.nn.programs.Template`
only; no input is run through the teacher to choose.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from m2kt.nn.programs import Template

__all__ = ["spread_probes"]


def spread_probes(inputs: Sequence[str], n: int, template: Template, *, seed: int = 0) -> list[str]:
    """``n`` of ``inputs`` (distinct), spread over the values of the template's operand slots.

    Inputs the template does not spell are never chosen. Deterministic for a given order and seed.
    """
    parsed = [(text, template.parse(text)) for text in dict.fromkeys(inputs)]
    candidates = [(text, slots) for text, slots in parsed if slots is not None]
    random.Random(seed).shuffle(candidates)
    used_a: Counter[str] = Counter()
    used_b: Counter[str] = Counter()
    chosen: list[str] = []
    remaining = candidates
    while remaining and len(chosen) < n:
        best = min(range(len(remaining)), key=lambda i: used_a[remaining[i][1][0]] + used_b[remaining[i][1][2]])
        text, (a, _op, b) = remaining.pop(best)
        used_a[a] += 1
        used_b[b] += 1
        chosen.append(text)
    return chosen
