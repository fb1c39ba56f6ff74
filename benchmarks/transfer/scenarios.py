"""The benchmark's world: one vocabulary, the teacher/student pairs, and the scenarios.

Everything is generated from :class:`m2kt.toy.symbolic.ModularTask` — no dataset. One fixed split of
every expression holds out the test set first; nothing in ``test`` is ever a teacher training
example, a probe, a KD query, a labelled example or an anchor.

* **concept transfer** (renaming) — teacher and student share the base skill (``add``, ``sub`` over
  Z_p), learned independently. The teacher also knows synonyms (``plus`` = add, ``minus`` = sub) and
  number aliases (``seven'`` = 7, ``three'`` = 3); the student has those tokens in its vocabulary and
  never trained them.
* **new operations** — data, one :class:`OpSpec` each: the student's core learned some operations
  (``known``) and receives a new one, written as an expression (``a+b``, ``a+2*b``, ``b-a``, ``a*b``).
  The defaults: **skill** (a core that learned only ``sub`` receives ``add`` = a + b) and
  **composition** (an add/sub core receives ``twice`` = a + 2b). ``m2kt bench transfer --scenario
  NAME=KNOWN:EXPR`` runs others with no code change; the teacher learns every operation of the run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from m2kt.toy.symbolic import Example, ModularTask, operation

__all__ = [
    "CONCEPT_KINDS",
    "DEFAULT_OPS",
    "PAIRS",
    "TEMPLATE",
    "OpSpec",
    "PairShape",
    "Scenario",
    "World",
    "build_world",
]

SYNONYMS = {"plus": "add", "minus": "sub"}
BASE_OPERATORS = {"add": "add", "sub": "sub"}
ALIAS_VALUES = (7, 3)
TEMPLATE = "{a} {op} {b} ="  # how every input of the task is spelled


@dataclass(frozen=True)
class OpSpec:
    """A new-operation scenario as data: its name, the operator token, the student's own operations, the
    new operation as an expression in ``a`` and ``b`` (see :func:`m2kt.toy.symbolic.operation`)."""

    name: str
    operator: str
    known: tuple[str, ...]
    expression: str

    @classmethod
    def parse(cls, text: str) -> OpSpec:
        """``NAME=KNOWN[,KNOWN…]:EXPR`` (the operator token is NAME), e.g. ``a-2b=add,sub:a-2*b``; or the
        bare name of a default scenario (``skill``, ``composition``), which is that scenario as it is."""
        defaults = {spec.name: spec for spec in DEFAULT_OPS}
        if text.strip() in defaults:
            return defaults[text.strip()]
        name, eq, rest = text.partition("=")
        known, colon, expression = rest.partition(":")
        ops = tuple(k.strip() for k in known.split(",") if k.strip())
        if not (eq and colon and name.strip() and ops and expression.strip()):
            raise ValueError(f"scenario {text!r}: expected NAME=KNOWN[,KNOWN...]:EXPR, e.g. a-2b=add,sub:a-2*b")
        unknown = [k for k in ops if k not in BASE_OPERATORS]
        if unknown:
            raise ValueError(f"scenario {text!r}: the student's operations must be among {sorted(BASE_OPERATORS)}")
        operation(expression.strip())  # raises ValueError for an expression it cannot compute
        return cls(name.strip(), name.strip(), ops, expression.strip())


DEFAULT_OPS = (
    OpSpec("skill", "add", ("sub",), "a+b"),
    OpSpec("composition", "twice", ("add", "sub"), "a+2*b"),
)


def alias_tokens(p: int) -> dict[str, int]:
    names = {7: "seven'", 3: "three'"}
    return {names[v]: v % p for v in ALIAS_VALUES}


CONCEPT_KINDS = ("synonym", "alias")


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
    whether residual adapters are part of the trainable set (a new operation: the core alone cannot
    change what it computes). ``pool`` is the KD query pool (teacher-answerable expressions with a
    target token, never test); ``test`` is held out; ``groups`` are the reporting groups.
    ``known`` are the student's own operator tokens; ``operator`` the new one (new-operation
    scenarios, where re-binding runs); ``ablations`` whether the composite-loss ablations run.
    """

    name: str
    family: str  # "concept" or "skill" (a new operation)
    student_examples: list[Example]  # what the student's core is trained on (train split only)
    targets: list[str]
    pool: list[Example]
    test: list[Example]
    adapters: bool
    groups: dict[str, list[Example]] = field(default_factory=dict)  # reporting group -> its test examples
    known: tuple[str, ...] = ("add", "sub")
    operator: str | None = None
    expression: str | None = None
    ablations: bool = True

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
    """The shared task, the teacher's training set, the held-out test set and the scenarios."""

    task: ModularTask
    teacher_train: list[Example]
    test: list[Example]
    scenarios: list[Scenario]

    def scenario(self, name: str) -> Scenario:
        return next(s for s in self.scenarios if s.name == name)

    @property
    def concept(self) -> Scenario:
        return self.scenario("concept")

    @property
    def skill(self) -> Scenario:
        return self.scenario("skill")


def _kind(example: Example, aliases: Sequence[str]) -> str | None:
    if example.operator in SYNONYMS:
        return "synonym"
    if any(t in aliases for t in example.tokens):
        return "alias"
    return None


def _check_ops(ops: Sequence[OpSpec], p: int) -> None:
    names = [o.name for o in ops]
    if len(set(names)) != len(names) or "concept" in names:
        raise ValueError(f"scenario names must be unique and not 'concept': {names}")
    for spec in ops:
        if spec.operator in BASE_OPERATORS:  # a base operator is taught as what it is; say so
            fn, base = operation(spec.expression), operation(BASE_OPERATORS[spec.operator])
            if any(fn(a, b, p) != base(a, b, p) for a in range(p) for b in range(p)):
                raise ValueError(f"scenario {spec.name!r}: {spec.operator!r} is {BASE_OPERATORS[spec.operator]}")


def build_world(
    p: int, *, test_fraction: float = 0.2, seed: int = 0, ops: Sequence[OpSpec] = DEFAULT_OPS, concept: bool = True
) -> World:
    """Every expression over one vocabulary, split once; the teacher trains on all of the train split.

    Aliases appear with the base operators only (``seven' add 4``, ``3 sub three'``); synonyms and the
    new operations use plain numbers.
    """
    _check_ops(ops, p)
    aliases = alias_tokens(p)
    new = {o.operator: o.expression for o in ops if o.operator not in BASE_OPERATORS}
    # "twice" (a + 2b) is always in the teacher's world, so adding scenarios never changes the default one
    operators = {**BASE_OPERATORS, **SYNONYMS, "twice": "add2b", **new}
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

    concept_targets = [*SYNONYMS, *alias_names]
    concept_pool = [e for e in train if _kind(e, alias_names) is not None]
    concept_test = [e for e in test if _kind(e, alias_names) is not None]
    scenarios = []
    if concept:
        scenarios.append(
            Scenario(
                name="concept",
                family="concept",
                student_examples=base(train, ["add", "sub"]),
                targets=concept_targets,
                pool=concept_pool,
                test=concept_test,
                adapters=False,
                groups={k: [e for e in concept_test if _kind(e, alias_names) == k] for k in CONCEPT_KINDS},
            )
        )
    for spec in ops:
        op_test = base(test, [spec.operator])
        scenarios.append(
            Scenario(
                name=spec.name,
                family="skill",
                student_examples=base(train, list(spec.known)),
                targets=[spec.operator],
                pool=base(train, [spec.operator]),
                test=op_test,
                adapters=True,
                groups={spec.operator: op_test},
                known=spec.known,
                operator=spec.operator,
                expression=spec.expression,
                ablations=spec.name == "skill",  # the composite-loss ablations: as before, on the skill scenario
            )
        )
    return World(task=task, teacher_train=train, test=test, scenarios=scenarios)
