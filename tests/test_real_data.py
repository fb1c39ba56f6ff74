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


def test_a_sets_unlabelled_texts_are_neither_its_test_texts_nor_the_teachers_labelled_examples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data, "dumpavail", _dumpavail)
    split = load_corpus(minimum=5).split("languages", 0, k=1, test=2, pool_cap=0)
    unlabelled = split.unlabelled(100)
    labelled = {t for texts in split.labelled.values() for t in texts}
    assert len(unlabelled) == 9 * 2  # five texts per section: two tested, one labelled, two unlabelled
    assert not set(unlabelled) & labelled and not set(unlabelled) & {t for t, _ in split.test}
    assert split.unlabelled(3) == unlabelled[:3]
