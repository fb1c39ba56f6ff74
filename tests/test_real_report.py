"""The real-model benchmark's report, on records made here (the benchmark itself needs mpnet and Debian text).

The claim lines must say what the numbers say: the first set against KD, and for a later concept set both
the issue's "within 5 points of the first set" and what reuse keeps against the same set aligned afresh.
"""

from __future__ import annotations

from typing import Any

from m2kt.benchmarks.real.report import claims, markdown


def _row(scenario: str, condition: str, budget: str | None, pct: float, seed: int, **fields: Any) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "set": scenario.split(" / ")[-1],
        "condition": condition,
        "budget": budget,
        "seed": seed,
        "accuracy": pct / 100 * 0.7,
        "pct_of_teacher": pct,
        "labelled": fields.get("labelled", 0),
        "teacher_labelled": 144,
        "teacher_queries": fields.get("teacher_queries", 144),
        "anchors": fields.get("anchors", 0),
        "seconds": 0.1,
        "method": fields.get("method"),
    }


def _document() -> dict[str, Any]:
    first, later = "a→b", "a→b / systems"
    records = []
    for seed in range(3):
        records += [
            _row(first, "teacher", None, 100.0, seed),
            _row(first, "m2kt-words", "0", 90.0 + seed, seed, anchors=5000, teacher_queries=5144, method="anchored"),
            _row(first, "m2kt-words", "16", 92.0, seed, anchors=5016, teacher_queries=5160),
            _row(first, "kd-centroid", "16", 80.0, seed, teacher_queries=160),
            _row(later, "teacher", None, 100.0, seed),
            _row(later, "m2kt-words-reuse", "0", 84.0, seed),
            _row(later, "m2kt-words-fresh", "0", 84.0, seed, anchors=5000, teacher_queries=5144),
            _row(later, "student-k-centroid", "k", 86.0, seed, labelled=144, teacher_queries=0),
            _row(first, "m2kt-general", "0", 94.0, seed, anchors=1000, teacher_queries=1144, method="ridge"),
            _row(later, "m2kt-general-reuse", "0", 91.0 + seed, seed),
            _row(first, "m2kt-general-refined", "0", 97.0, seed, anchors=1000, teacher_queries=1144),
            _row(later, "m2kt-general-refined-reuse", "0", 91.0, seed),
        ]
    return {
        "command": "m2kt bench real",
        "settings": {"seeds": 3, "classes": 9, "k": 16, "test": 100, "words": 5000, "general": 1000},
        "records": records,
        "timings": [],
        "cli": [],
    }


def test_reuse_is_read_against_the_first_set_and_against_the_same_set_aligned_afresh() -> None:
    lines = "\n".join(claims(_document()))
    assert "a→b / systems: m2kt-words-reuse of the N=0 alignment, 0 new queries, within 5 points: **FAIL (7.0" in lines
    assert (
        "a→b / systems: what reuse keeps — the stored word-list alignment 84.0% (0 new queries) vs this set's own "
        "word-list packet aligned afresh 84.0% (5144 teacher queries): +0.0 points; the student with this set's "
        "k labels 86.0%"
    ) in lines
    assert "a→b: m2kt-words ≥ KD at N=16: **PASS** — 92.0 ± 0.0%, best KD 80.0 ± 0.0%" in lines


def test_the_later_sets_table_shows_the_fresh_and_the_labelled_reference_rows() -> None:
    text = markdown(_document())
    section = text.split("### a→b / systems")[1]
    assert "| m2kt-words-fresh | 84.0 ± 0.0 |" in section
    assert "| student-k-centroid |" in section and "86.0 ± 0.0 (144 labels)" in section


def test_the_general_anchor_route_is_judged_like_the_others_and_its_reuse_against_its_own_first_set() -> None:
    lines = "\n".join(claims(_document()))
    assert (
        "a→b: m2kt-general ≥ 90% of teacher at ≤ 64 domain anchors: **PASS** — 94.0 ± 0.0% at N=0 "
        "(1000 anchors in all, 1144 teacher queries)"
    ) in lines
    # 92.0 ± 1.0 after reuse against the general route's own 94.0: within 5 points
    assert "a→b / systems: m2kt-general-reuse of the N=0 alignment, 0 new queries, within 5 points: **PASS**" in lines
    section = markdown(_document()).split("### a→b / systems")[1]
    assert "| m2kt-general-reuse | 92.0 ± 1.0 |" in section


def test_refined_concepts_are_judged_against_the_refined_first_set() -> None:
    """Refining raises the first set too: its reuse is measured from the refined first set, not the plain one."""
    lines = "\n".join(claims(_document()))
    assert (
        "a→b / systems: m2kt-general-refined-reuse of the N=0 alignment, 0 new queries, within 5 points: "
        "**FAIL (6.0 points below)** — 91.0 ± 0.0% vs the first set's 97.0%"
    ) in lines
    assert "a→b: m2kt-general-refined ≥ 90% of teacher at ≤ 64 domain anchors: **PASS**" in lines
    assert "| m2kt-general-refined-reuse | 91.0 ± 0.0 |" in markdown(_document()).split("### a→b / systems")[1]
