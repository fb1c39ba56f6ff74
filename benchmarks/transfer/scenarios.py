"""The benchmark's world: one vocabulary, the teacher/student pairs, and the two scenario families.

Everything is generated from :class:`m2kt.toy.symbolic.ModularTask` — no dataset. One fixed split of
every expression holds out the test set first; nothing in ``test`` is ever a teacher training
example, a probe, a KD query, a labelled example or an anchor.

* **concept transfer** — teacher and student share the base skill (``add``, ``sub`` over Z_p),
  learned independently. The teacher also knows synonyms (``plus`` = add, ``minus`` = sub), number
  aliases (``seven'`` = 7, ``three'`` = 3) and a composition (``twice``: a + 2b). The student has
  those tokens in its vocabulary and never trained them.
* **skill transfer** — the student's core learned only ``sub`` (a − b); it receives ``add`` (a + b).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from m2kt.toy.symbolic import Example, ModularTask

__all__ = [
    "CONCEPT_KINDS",
    "PAIRS",
    "PairShape",
    "Scenario",
    "World",
    "build_world",
]

SYNONYMS = {"plus": "add", "minus": "sub"}
COMPOSITION = {"twice": "add2b"}  # a twice b = a + 2b
BASE_OPERATORS = {"add": "add", "sub": "sub"}
ALIAS_VALUES = (7, 3)


def alias_tokens(p: int) -> dict[str, int]:
    names = {7: "seven'", 3: "three'"}
    return {names[v]: v % p for v in ALIAS_VALUES}


CONCEPT_KINDS = ("synonym", "alias", "composition")


@dataclass(frozen=True)
class PairShape:
    """One heterogeneous, independently trained teacher/student pair (shapes and seeds)."""

    name: str
    teacher: dict[str, int]
    student: dict[str, int]
    teacher_seed: int
    student_seed: int

    def describe(self) -> str:
        t, s = self.teacher, self.student
        return (
            f"{self.name}: teacher d={t['d_model']} L={t['n_layers']} H={t['n_heads']} (seed {self.teacher_seed}) → "
            f"student d={s['d_model']} L={s['n_layers']} H={s['n_heads']} (seed {self.student_seed})"
        )


PAIRS: tuple[PairShape, ...] = (
    PairShape(
        "pair-a",
        {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
        {"d_model": 48, "n_layers": 3, "n_heads": 3, "d_ff": 192},
        teacher_seed=100,
        student_seed=200,
    ),
    PairShape(
        "pair-b",
        {"d_model": 96, "n_layers": 2, "n_heads": 4, "d_ff": 256},
        {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128},
        teacher_seed=101,
        student_seed=201,
    ),
    PairShape(
        "pair-c",
        {"d_model": 64, "n_layers": 3, "n_heads": 8, "d_ff": 256},
        {"d_model": 80, "n_layers": 2, "n_heads": 4, "d_ff": 320},
        teacher_seed=102,
        student_seed=202,
    ),
)


@dataclass
class Scenario:
    """One transfer problem: what the student's core learned, what it should receive, pool and test.

    ``targets`` are the tokens whose concepts cross (injected into the student); ``adapters`` says
    whether residual adapters are part of the trainable set (skill transfer: the core alone cannot
    change what it computes). ``pool`` is the KD query pool (teacher-answerable expressions with a
    target token, never test); ``test`` is held out; ``kind_of`` maps a test example to its
    reporting group (``synonym``/``alias``/``composition``, or ``skill``).
    """

    name: str
    family: str  # "concept" or "skill"
    student_examples: list[Example]  # what the student's core is trained on (train split only)
    targets: list[str]
    pool: list[Example]
    test: list[Example]
    adapters: bool
    groups: dict[str, list[Example]] = field(default_factory=dict)  # reporting group -> its test examples

    def report_groups(self) -> dict[str, list[Example]]:
        """The test sets reported: the whole scenario, then each group when there are several."""
        return {self.name: self.test, **(self.groups if len(self.groups) > 1 else {})}

    def budget(self, fraction_or_count: float | int) -> int:
        """A budget as a count of queries: ints are counts, floats fractions of the pool."""
        if isinstance(fraction_or_count, float):
            return max(1, round(fraction_or_count * len(self.pool)))
        return min(int(fraction_or_count), len(self.pool))

    def sample(self, n: int, seed: int) -> list[Example]:
        """The first ``n`` of one seeded shuffle of the pool: smaller budgets are prefixes of larger ones."""
        order = list(self.pool)
        random.Random(seed).shuffle(order)
        return order[:n]


@dataclass
class World:
    """The shared task, the teacher's training set, the held-out test set and both scenarios."""

    task: ModularTask
    teacher_train: list[Example]
    test: list[Example]
    concept: Scenario
    skill: Scenario


def _kind(example: Example, aliases: Sequence[str]) -> str | None:
    if example.operator in SYNONYMS:
        return "synonym"
    if example.operator in COMPOSITION:
        return "composition"
    if any(t in aliases for t in example.tokens):
        return "alias"
    return None


def build_world(p: int, *, test_fraction: float = 0.2, seed: int = 0) -> World:
    """Every expression over one vocabulary, split once; the teacher trains on all of the train split.

    Aliases appear with the base operators only (``seven' add 4``, ``3 sub three'``); synonyms and the
    composition use plain numbers.
    """
    aliases = alias_tokens(p)
    operators = {**BASE_OPERATORS, **SYNONYMS, **COMPOSITION}
    task = ModularTask(p=p, operators=operators, number_aliases=aliases)
    plain = task.examples()
    with_alias = [
        e
        for e in task.examples(list(BASE_OPERATORS), use_aliases=True)
        if any(t in aliases for t in (e.tokens[0], e.tokens[2]))
    ]
    everything = plain + with_alias
    train, test = task.split(everything, test_fraction=test_fraction, seed=seed)
    alias_names = list(aliases)

    def base(examples: list[Example], ops: Sequence[str]) -> list[Example]:
        return [e for e in examples if e.operator in ops and _kind(e, alias_names) is None]

    concept_targets = [*SYNONYMS, *COMPOSITION, *alias_names]
    concept_pool = [e for e in train if _kind(e, alias_names) is not None]
    concept_test = [e for e in test if _kind(e, alias_names) is not None]
    concept = Scenario(
        name="concept",
        family="concept",
        student_examples=base(train, ["add", "sub"]),
        targets=concept_targets,
        pool=concept_pool,
        test=concept_test,
        adapters=False,
        groups={k: [e for e in concept_test if _kind(e, alias_names) == k] for k in CONCEPT_KINDS},
    )
    skill_test = base(test, ["add"])
    skill = Scenario(
        name="skill",
        family="skill",
        student_examples=base(train, ["sub"]),
        targets=["add"],
        pool=base(train, ["add"]),
        test=skill_test,
        adapters=True,
        groups={"add": skill_test},
    )
    return World(task=task, teacher_train=train, test=test, concept=concept, skill=skill)
