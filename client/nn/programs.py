"""Programs over a model's own operations: how a new operation can be re-bound to ones the model has.

A task's inputs follow a :class:`Template` (``"{a} {op} {b} ="``). A model that computes some operations
— its *own* — can compute more by composing them: ``a + b = a − (0 − b)``, ``a + 2b = a + (b + b)``,
``b − a`` (the operands swapped). An :class:`Expr` is such a composition; its operations are operator
tokens, its leaves the input's operands ``a`` and ``b`` or constant operand tokens.

Nothing here knows arithmetic: every value comes from the model. :meth:`OperationTables.probe` runs the
model once on every ``x op y`` over an operand domain (its answers, not the truth), and :func:`search`
scores candidate compositions ``op(U(a), V(b))`` — ``U`` and ``V`` each the identity, ``op'(x, x)``,
``op'(c, x)`` or ``op'(x, c)`` — and their swaps against observed ``(a, b) → answer`` pairs, by table
lookup alone. Teacher and student both use it (the teacher to declare a decomposition of its own
operation, the student to find one that explains the teacher's answers). Pure Python; no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Expr", "Observation", "OperationTables", "SearchResult", "Template", "search"]

Predict = Callable[[Sequence[str]], Sequence[str]]  # input texts -> the model's answer tokens


@dataclass(frozen=True)
class Template:
    """How a task input is spelled, one word per token: ``"{a} {op} {b} ="``."""

    text: str = "{a} {op} {b} ="

    def __post_init__(self) -> None:
        words = self.text.split()
        for slot in ("{a}", "{op}", "{b}"):
            if words.count(slot) != 1:
                raise ValueError(f"template {self.text!r} must name {slot} once, as a word of its own")
        if any("{" in w and w not in ("{a}", "{op}", "{b}") for w in words):
            raise ValueError(f"template {self.text!r}: only {{a}}, {{op}} and {{b}} may be slots")

    @property
    def words(self) -> list[str]:
        return self.text.split()

    def position(self, slot: str) -> int:
        """The word (token) index of slot ``a``, ``op`` or ``b``."""
        return self.words.index("{" + slot + "}")

    def format(self, a: str, op: str, b: str) -> str:
        return " ".join({"{a}": a, "{op}": op, "{b}": b}.get(w, w) for w in self.words)

    def parse(self, text: str) -> tuple[str, str, str] | None:
        """(a, op, b) of an input spelled by this template, or None when it is not."""
        words, pattern = text.split(), self.words
        if len(words) != len(pattern):
            return None
        slots: dict[str, str] = {}
        for word, want in zip(words, pattern, strict=True):
            if want in ("{a}", "{op}", "{b}"):
                slots[want] = word
            elif word != want:
                return None
        return slots["{a}"], slots["{op}"], slots["{b}"]


_TOKEN = re.compile(r'\s*(?:(?P<name>[A-Za-z_][\w\-\']*)|(?P<const>"(?:[^"\\]|\\.)*")|(?P<punct>[(),]))')


@dataclass(frozen=True)
class Expr:
    """A composition of operations: a leaf (``a``, ``b``, or a constant operand) or ``op(x, y)``."""

    op: str | None = None
    args: tuple[Expr, ...] = ()
    leaf: str | None = None
    constant: bool = False

    @staticmethod
    def var(name: str) -> Expr:
        return Expr(leaf=name)

    @staticmethod
    def const(token: str) -> Expr:
        return Expr(leaf=token, constant=True)

    @staticmethod
    def apply(op: str, x: Expr, y: Expr) -> Expr:
        return Expr(op=op, args=(x, y))

    @property
    def size(self) -> int:
        """Operations in it (each is one forward pass of the model)."""
        return 0 if self.op is None else 1 + sum(a.size for a in self.args)

    def variables(self) -> set[str]:
        if self.op is None:
            return set() if self.constant else {str(self.leaf)}
        return set().union(*(a.variables() for a in self.args))

    def substitute(self, name: str, by: Expr) -> Expr:
        if self.op is None:
            return by if (not self.constant and self.leaf == name) else self
        return Expr(op=self.op, args=tuple(a.substitute(name, by) for a in self.args))

    def evaluate(self, env: Mapping[str, str], run: Callable[[str, str, str], str | None]) -> str | None:
        """The value for operands ``env``; ``run(op, x, y)`` computes one operation (None: unknown)."""
        if self.op is None:
            return str(self.leaf) if self.constant else env.get(str(self.leaf))
        x, y = (a.evaluate(env, run) for a in self.args)
        return None if x is None or y is None else run(self.op, x, y)

    def __str__(self) -> str:
        if self.op is None:
            if self.constant:
                return '"' + str(self.leaf).replace("\\", "\\\\").replace('"', '\\"') + '"'
            return str(self.leaf)
        return f"{self.op}({', '.join(str(a) for a in self.args)})"

    @classmethod
    def parse(cls, text: str) -> Expr:
        """The inverse of ``str()``: ``sub(a, sub("0", b))``."""
        tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text.rstrip()):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"cannot read program {text!r} at {pos}")
            kind = m.lastgroup or ""
            tokens.append((kind, m.group(kind)))
            pos = m.end()

        def take(i: int) -> tuple[Expr, int]:
            if i >= len(tokens):
                raise ValueError(f"program {text!r} ends too soon")
            kind, value = tokens[i]
            if kind == "const":
                return cls.const(value[1:-1].replace('\\"', '"').replace("\\\\", "\\")), i + 1
            if kind != "name":
                raise ValueError(f"program {text!r}: unexpected {value!r}")
            if i + 1 < len(tokens) and tokens[i + 1] == ("punct", "("):
                x, j = take(i + 2)
                if j >= len(tokens) or tokens[j] != ("punct", ","):
                    raise ValueError(f"program {text!r}: expected ','")
                y, k = take(j + 1)
                if k >= len(tokens) or tokens[k] != ("punct", ")"):
                    raise ValueError(f"program {text!r}: expected ')'")
                return cls.apply(value, x, y), k + 1
            return cls.var(value), i + 1

        expr, end = take(0)
        if end != len(tokens):
            raise ValueError(f"program {text!r}: unexpected text after the expression")
        return expr


@dataclass
class OperationTables:
    """A model's own answers to ``x op y`` for every pair of a domain, per operation."""

    template: Template
    domain: list[str]
    tables: dict[str, dict[tuple[str, str], str]]
    passes: int  # model forward passes (inputs) it took

    @classmethod
    def probe(
        cls, predict: Predict, template: Template, operators: Sequence[str], domain: Sequence[str]
    ) -> OperationTables:
        pairs = [(x, y) for x in domain for y in domain]
        tables: dict[str, dict[tuple[str, str], str]] = {}
        for op in operators:
            answers = predict([template.format(x, op, y) for x, y in pairs])
            tables[op] = dict(zip(pairs, answers, strict=True))
        return cls(template, list(domain), tables, len(pairs) * len(operators))

    def run(self, op: str, x: str, y: str) -> str | None:
        table = self.tables.get(op)
        return None if table is None else table.get((x, y))

    def function(self, expr: Expr) -> tuple[str | None, ...]:
        """``expr`` over every (a, b) of the domain: two programs with equal functions are the same here."""
        return tuple(expr.evaluate({"a": a, "b": b}, self.run) for a in self.domain for b in self.domain)


@dataclass(frozen=True)
class Observation:
    """One input the teacher answered: operands and the teacher's answer token."""

    a: str
    b: str
    answer: str


@dataclass
class SearchResult:
    program: Expr | None  # the simplest program among those explaining the most observations
    explained: int
    total: int
    considered: int  # candidate programs scored
    tied: list[Expr] = field(default_factory=list)  # other best programs computing different functions
    # with ``alternatives``: every other program explaining at least ``min_explained`` of the observations,
    # most explained first, then simplest
    alternatives: list[Expr] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.explained / self.total if self.total else 0.0


def _unary(tables: OperationTables, operators: Sequence[str], constants: bool) -> Iterator[tuple[Expr, dict[str, str]]]:
    """Operand transforms of one variable ``x``, with their values over the domain."""
    x = Expr.var("x")
    domain = tables.domain
    yield x, {d: d for d in domain}
    for op in operators:
        forms = [Expr.apply(op, x, x)]
        if constants:
            forms += [Expr.apply(op, Expr.const(c), x) for c in domain]
            forms += [Expr.apply(op, x, Expr.const(c)) for c in domain]
        for form in forms:
            values = {d: v for d in domain if (v := form.evaluate({"x": d}, tables.run)) is not None}
            yield form, values


def search(
    observations: Sequence[Observation],
    tables: OperationTables,
    operators: Sequence[str],
    *,
    slots: bool = True,
    constants: bool = True,
    min_explained: float = 1.0,
    keep: int = 32,
    alternatives: bool = False,
) -> SearchResult:
    """The program ``op(U(a), V(b))`` (or ``op(V(b), U(a))``) over ``operators`` that explains the most
    observations; ``slots=False`` allows only ``op(a, b)`` (a renaming: no operand is re-bound).

    Candidates failing more than ``(1 - min_explained)`` of the observations are dropped as soon as they
    do (without ``alternatives``, also as soon as they cannot reach the best so far). Among the best, the
    fewest operations win; best programs computing another function over the domain are returned in
    ``tied``, and with ``alternatives`` every other program that explains enough in ``alternatives``.
    """
    n = len(observations)
    if n == 0:
        return SearchResult(None, 0, 0, 0)
    allowed = int((1.0 - min_explained) * n + 1e-9)
    unary = list(_unary(tables, operators, constants)) if slots else [(Expr.var("x"), {d: d for d in tables.domain})]
    unary.sort(key=lambda item: item[0].size)  # simple transforms first: the best count rises early
    best_count, best = 0, []
    enough: list[tuple[int, Expr]] = []  # (explained, program) of every program within the allowance
    considered = 0
    a_values = [o.a for o in observations]
    b_values = [o.b for o in observations]
    answers = [o.answer for o in observations]
    orders = ("ab", "ba") if slots else ("ab",)
    for op in operators:
        table = tables.tables.get(op, {})
        for order in orders:
            first_vals, second_vals = (a_values, b_values) if order == "ab" else (b_values, a_values)
            for u_expr, u_map in unary:
                left = [u_map.get(v) for v in first_vals]
                for v_expr, v_map in unary:
                    considered += 1
                    misses = 0
                    for i in range(n):
                        if left[i] is None or table.get((left[i], v_map.get(second_vals[i]))) != answers[i]:
                            misses += 1
                            if n - misses < best_count and (not alternatives or misses > allowed):
                                break
                    else:
                        hits = n - misses
                        first, second = ("a", "b") if order == "ab" else ("b", "a")
                        program = Expr.apply(
                            op, u_expr.substitute("x", Expr.var(first)), v_expr.substitute("x", Expr.var(second))
                        )
                        if alternatives and misses <= allowed:
                            enough.append((hits, program))
                        if hits < best_count:
                            continue
                        if hits > best_count:
                            best_count, best = hits, [program]
                        elif len(best) < keep:
                            best.append(program)
                        else:  # keep the simplest ``keep`` of the tied programs
                            worst = max(range(len(best)), key=lambda j: best[j].size)
                            if program.size < best[worst].size:
                                best[worst] = program
    if not best or best_count < n - allowed:
        return SearchResult(None, best_count, n, considered)
    best.sort(key=lambda e: (e.size, str(e)))
    chosen = best[0]
    seen = {tables.function(chosen)}
    tied = []
    for other in best[1:]:
        f = tables.function(other)
        if f not in seen:
            seen.add(f)
            tied.append(other)
    enough.sort(key=lambda item: (-item[0], item[1].size, str(item[1])))
    others = [program for _, program in enough if program != chosen]
    return SearchResult(chosen, best_count, n, considered, tied, others)
