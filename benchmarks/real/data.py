"""Real text nobody on the project wrote: Debian package descriptions, classified by archive section.

``apt-cache dumpavail`` (after ``apt-get update``) prints every available package's stanza; a text is
its one-line description (the package lists carry no long ones; those live in translation files),
cut to ``MAX_WORDS`` words, and its class is its section (``contrib/games`` → ``games``). Identical
descriptions are kept once, and a description found in two sections in none. Package names are not
part of the text.

Splits are fixed and seeded: per section, a fixed test set (the same for every seed), then per seed
``k`` labelled examples for the teacher and a pool of public, unlabelled texts (labels hidden) from
which anchors and KD's queries are drawn.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["CONCEPT_SETS", "MAX_WORDS", "Corpus", "SetSplit", "load_corpus", "parse_dumpavail"]

MAX_WORDS = 64
# Three disjoint concept sets of nine sections each, chosen before any result: the first is the one
# packets are measured on (its pool gives the anchors); the second and third test alignment reuse.
CONCEPT_SETS: dict[str, tuple[str, ...]] = {
    "topics": ("games", "science", "sound", "graphics", "mail", "editors", "math", "fonts", "video"),
    "systems": ("admin", "net", "text", "web", "database", "electronics", "x11", "interpreters", "gnome"),
    "languages": ("python", "perl", "haskell", "rust", "golang", "javascript", "java", "ruby", "ocaml"),
}


def _text(description: str) -> str:
    return " ".join(description.split()[:MAX_WORDS])


def parse_dumpavail(output: str) -> dict[str, list[str]]:
    """Section → distinct description texts, from ``apt-cache dumpavail`` output."""
    by_text: dict[str, set[str]] = defaultdict(set)
    seen_packages: set[str] = set()
    for stanza in output.split("\n\n"):
        fields = dict(line.partition(":")[::2] for line in stanza.splitlines() if line and not line[0].isspace())
        package, section = fields.get("Package", "").strip(), fields.get("Section", "").strip()
        description = fields.get("Description", "").strip()
        if not package or not section or not description or package in seen_packages:
            continue
        seen_packages.add(package)
        by_text[_text(description)].add(section.rsplit("/", 1)[-1])
    out: dict[str, list[str]] = defaultdict(list)
    for text, sections in sorted(by_text.items()):
        if len(sections) == 1:  # one text in two sections would be a label conflict
            out[next(iter(sections))].append(text)
    return dict(out)


def dumpavail() -> str:
    """The output of ``apt-cache dumpavail``; a clear error where the package lists are missing."""
    if shutil.which("apt-cache") is None:
        raise RuntimeError("the real-model benchmark reads Debian package descriptions: apt-cache is not installed")
    out = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    if out.count("\nPackage:") < 1000:
        raise RuntimeError("apt-cache knows few packages: run `apt-get update` first (a setup step of this benchmark)")
    return out


@dataclass
class SetSplit:
    """One concept set's texts for one seed."""

    name: str
    sections: tuple[str, ...]
    labelled: dict[str, list[str]]  # the teacher's k labelled examples per section
    test: list[tuple[str, str]]  # (text, section), the same for every seed
    pool: list[str]  # public unlabelled texts (labels hidden), seeded order: anchors and KD queries
    pool_labels: dict[str, str] = field(default_factory=dict)  # hidden; used only by the oracle
    train_all: list[tuple[str, str]] = field(default_factory=list)  # every non-test text: the oracle's labels

    def unlabelled(self, count: int) -> list[str]:
        """Up to ``count`` of the set's non-test texts that are not the teacher's labelled examples, in a seeded
        order, without their labels: the student's own unlabelled texts of the domain."""
        labelled = {t for texts in self.labelled.values() for t in texts}
        return [t for t, _ in self.train_all if t not in labelled][:count]


@dataclass
class Corpus:
    sections: dict[str, list[str]]  # section → texts, in a fixed order
    general: list[str] = field(default_factory=list)  # texts of every other section: public, unlabelled

    def general_sample(self, seed: int, count: int) -> list[str]:
        """``count`` texts from the sections outside every concept set, drawn with ``seed``: a general anchor
        set, public and unlabelled, that covers no concept set in particular."""
        if count > len(self.general):
            raise RuntimeError(f"only {len(self.general)} general texts, {count} asked for")
        return random.Random(f"general:{seed}").sample(self.general, count)

    def split(self, name: str, seed: int, *, k: int, test: int, pool_cap: int) -> SetSplit:
        sections = CONCEPT_SETS[name]
        labelled: dict[str, list[str]] = {}
        tests: list[tuple[str, str]] = []
        pool: list[tuple[str, str]] = []
        for s in sections:
            texts = list(self.sections[s])
            random.Random(f"test:{s}").shuffle(texts)  # the test set does not depend on the seed
            held, rest = texts[:test], texts[test:]
            random.Random(f"{seed}:{s}").shuffle(rest)
            labelled[s] = rest[:k]
            tests += [(t, s) for t in held]
            pool += [(t, s) for t in rest[k:]]
        random.Random(f"pool:{seed}:{name}").shuffle(pool)
        train_all = [(t, s) for s in sections for t in labelled[s]] + pool
        pool = pool[:pool_cap]
        return SetSplit(name, sections, labelled, tests, [t for t, _ in pool], {t: s for t, s in pool}, train_all)


def load_corpus(*, minimum: int) -> Corpus:
    """Every section of the concept sets, each with at least ``minimum`` distinct texts (else an error)."""
    sections = parse_dumpavail(dumpavail())
    wanted = [s for names in CONCEPT_SETS.values() for s in names]
    short = {s: len(sections.get(s, [])) for s in wanted if len(sections.get(s, [])) < minimum}
    if short:
        raise RuntimeError(f"sections with fewer than {minimum} distinct descriptions: {short}")
    general = sorted(t for s, texts in sections.items() if s not in wanted for t in texts)
    return Corpus({s: sections[s] for s in wanted}, general)
