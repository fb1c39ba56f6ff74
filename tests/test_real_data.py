"""The real-model benchmark's text: concept sets from Debian sections, and a general anchor set from every
other section (checked on a made-up ``apt-cache dumpavail``; the benchmark itself reads the real one)."""

from __future__ import annotations

import pytest

from m2kt.benchmarks.real import data
from m2kt.benchmarks.real.data import CONCEPT_SETS, load_corpus


def _dumpavail() -> str:
    stanzas = []
    wanted = [s for names in CONCEPT_SETS.values() for s in names]
    for section in [*wanted, "libs", "utils"]:
        for i in range(5):
            stanzas.append(f"Package: {section}-{i}\nSection: {section}\nDescription: {section} tool number {i}\n")
    return "\n".join(stanzas)


def test_the_general_set_comes_from_sections_in_no_concept_set_and_is_drawn_by_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data, "dumpavail", _dumpavail)
    corpus = load_corpus(minimum=5)
    assert sorted(corpus.general) == sorted(f"{s} tool number {i}" for s in ("libs", "utils") for i in range(5))
    concept_texts = {t for texts in corpus.sections.values() for t in texts}
    assert not concept_texts & set(corpus.general)
    first = corpus.general_sample(0, 6)
    assert first == corpus.general_sample(0, 6) and len(set(first)) == 6
    assert first != corpus.general_sample(1, 6)
    with pytest.raises(RuntimeError, match="only 10 general texts"):
        corpus.general_sample(0, 11)
