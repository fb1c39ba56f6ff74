"""Tiny symbolic-reasoning tasks, generated without any dataset.

A :class:`ModularTask` is the family of expressions ``a OP b =`` over Z_p, answered by one number
token. The same task object drives the teacher, the student, the transfer benchmark and the demo,
so everything here is deterministic: vocabularies, example order and train/test splits depend only
on the task's fields and a seed. Pure standard library (no torch, no numpy).

Operator tokens are separate from operation names so a task can have synonyms (``plus`` and
``add`` both meaning addition), and ``number_aliases`` adds extra tokens for numbers (``three'``
meaning 3) so that learning an alias can be measured. ``vocab_operators`` reserves vocabulary
slots for operator tokens that no example uses yet, so a model trained on the task has room for
tokens it will only be taught later.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EQUALS",
    "OPERATIONS",
    "PAD",
    "Example",
    "ModularTask",
    "UnknownTokenError",
    "Vocabulary",
    "operation",
    "parse_expression",
]

PAD = "<pad>"
EQUALS = "="

OPERATIONS: dict[str, Callable[[int, int, int], int]] = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "add2b": lambda a, b, p: (a + 2 * b) % p,
    "max": lambda a, b, p: max(a, b) % p,
    "min": lambda a, b, p: min(a, b) % p,
}


def operation(name: str) -> Callable[[int, int, int], int]:
    """The operation a name means: one of :data:`OPERATIONS`, an arithmetic expression in ``a`` and ``b``
    (``"a+2*b"``, ``"b-a"``, ``"2*a+b"``, ``"a*b"``: integers, ``+ - *`` and parentheses, taken mod p), or
    ``"table:<seed>"`` — a random table over Z_p that no arithmetic composes (for tests of refusal)."""
    if name in OPERATIONS:
        return OPERATIONS[name]
    if name.startswith("table:"):
        seed = name.removeprefix("table:")
        return lambda a, b, p: random.Random(f"{seed}:{p}:{a}:{b}").randrange(p)
    return _compile_expression(name)


_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.USub, ast.UAdd)


def _compile_expression(text: str) -> Callable[[int, int, int], int]:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"unknown operation {text!r}: not a name in OPERATIONS nor an expression in a and b") from None
    for node in ast.walk(tree):
        ok = isinstance(node, _ALLOWED_NODES) or (isinstance(node, ast.Name) and node.id in ("a", "b"))
        ok = ok or (isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool))
        if not ok and not isinstance(node, ast.Load):
            raise ValueError(
                f"unknown operation {text!r}: not a name in OPERATIONS, table:SEED, nor an expression in a and b "
                "(only integers, a, b, + - * and parentheses are allowed)"
            )

    def evaluate(node: ast.AST, a: int, b: int) -> int:
        if isinstance(node, ast.Expression):
            return evaluate(node.body, a, b)
        if isinstance(node, ast.Constant):
            return int(node.value)
        if isinstance(node, ast.Name):
            return a if node.id == "a" else b
        if isinstance(node, ast.UnaryOp):
            value = evaluate(node.operand, a, b)
            return -value if isinstance(node.op, ast.USub) else value
        assert isinstance(node, ast.BinOp)
        left, right = evaluate(node.left, a, b), evaluate(node.right, a, b)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        return left * right

    return lambda a, b, p: evaluate(tree, a, b) % p


def parse_expression(text: str) -> tuple[str, ...]:
    """Split an expression such as ``"3 add 5 ="`` into tokens (on any whitespace)."""
    return tuple(text.split())


class _FrozenMap(Mapping[str, Any]):
    """A read-only, hashable mapping with a fixed (sorted-key) iteration order."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        pairs = dict(items.items() if isinstance(items, Mapping) else items)
        self._items: dict[str, Any] = {k: pairs[k] for k in sorted(pairs)}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def _default_operators() -> _FrozenMap:
    return _FrozenMap({"add": "add", "sub": "sub"})


@dataclass(frozen=True)
class Example:
    """One expression and its answer, e.g. tokens ``("3", "plus", "5", "=")`` and answer ``"8"``."""

    tokens: tuple[str, ...]
    answer: str
    operator: str  # the operator token used, e.g. "plus"
    operation: str  # the operation it means, e.g. "add"


@dataclass(frozen=True)
class ModularTask:
    """`a OP b =` over Z_p. `operators` maps an operator token to an operation name, so synonyms are
    several tokens for one operation (e.g. {"add": "add", "plus": "add"}). `number_aliases` maps extra
    number tokens to the number they mean (e.g. {"three'": 3}) so aliases of numbers can be taught.

    Mappings given as dicts are stored as read-only hashable mappings, so tasks can be dict keys.
    """

    p: int = 23
    operators: Mapping[str, str] = field(default_factory=_default_operators)
    number_aliases: Mapping[str, int] = field(default_factory=_FrozenMap)
    vocab_operators: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, int) or self.p < 2:
            raise ValueError(f"p must be an integer >= 2, got {self.p!r}")
        operators = _FrozenMap(self.operators)
        aliases = _FrozenMap(self.number_aliases)
        vocab_operators = tuple(self.vocab_operators)
        object.__setattr__(self, "operators", operators)
        object.__setattr__(self, "number_aliases", aliases)
        object.__setattr__(self, "vocab_operators", vocab_operators)

        if not operators:
            raise ValueError("a task needs at least one operator")
        for token, name in operators.items():
            try:
                operation(name)
            except ValueError as exc:
                known = ", ".join(sorted(OPERATIONS))
                raise ValueError(f"operator {token!r}: {exc} (names: {known})") from None
        for alias, value in aliases.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.p:
                raise ValueError(f"number alias {alias!r} must map to an integer in [0, {self.p}), got {value!r}")
        if len(set(vocab_operators)) != len(vocab_operators):
            raise ValueError(f"vocab_operators has duplicates: {vocab_operators!r}")

        numbers = {str(n) for n in range(self.p)}
        reserved = numbers | {PAD, EQUALS}
        seen: dict[str, str] = {}
        groups = (("number alias", aliases), ("operator", operators), ("vocab operator", vocab_operators))
        for kind, tokens in groups:
            for token in tokens:
                if not isinstance(token, str) or not token or token != token.strip() or len(token.split()) != 1:
                    raise ValueError(f"{kind} token must be a non-empty string without whitespace, got {token!r}")
                if token in reserved:
                    raise ValueError(f"{kind} token {token!r} collides with a number, {PAD!r} or {EQUALS!r}")
                # An operator listed again in vocab_operators is harmless; anything else is a clash.
                if token in seen and not (kind == "vocab operator" and seen[token] == "operator"):
                    raise ValueError(f"{kind} token {token!r} is already used as a {seen[token]}")
                seen.setdefault(token, kind)

    # -- vocabulary -----------------------------------------------------------------------------

    def operator_tokens(self) -> list[str]:
        """Every operator token in the vocabulary (used by examples or reserved), sorted."""
        return sorted(set(self.operators) | set(self.vocab_operators))

    def vocabulary(self) -> list[str]:
        """[PAD, "0".."p-1", sorted number aliases, sorted operator tokens, EQUALS]."""
        return [PAD, *(str(n) for n in range(self.p)), *sorted(self.number_aliases), *self.operator_tokens(), EQUALS]

    def number_tokens(self, *, use_aliases: bool = False) -> list[tuple[str, int]]:
        """(token, value) for every number token: canonical first, then aliases in sorted order."""
        tokens = [(str(n), n) for n in range(self.p)]
        if use_aliases:
            tokens += [(alias, self.number_aliases[alias]) for alias in sorted(self.number_aliases)]
        return tokens

    # -- examples -------------------------------------------------------------------------------

    def _check_operator(self, token: str) -> None:
        if token not in self.operators:
            known = ", ".join(sorted(self.operators))
            raise ValueError(f"operator token {token!r} is not used by this task's examples; known: {known}")

    def answer(self, a: int, operator_token: str, b: int) -> int:
        """The value of ``a OP b`` in Z_p (``a`` and ``b`` are reduced mod p first)."""
        self._check_operator(operator_token)
        return operation(self.operators[operator_token])(a % self.p, b % self.p, self.p)

    def examples(self, operators: Iterable[str] | None = None, *, use_aliases: bool = False) -> list[Example]:
        """Every ``a OP b =`` over the given operator tokens (default: all of ``operators``, sorted).

        Order: operator tokens (given order, duplicates dropped), then ``a``, then ``b``. Without
        aliases that is ``p * p`` examples per operator. With ``use_aliases`` each operand also runs
        over the alias tokens, so the result is a superset ((p + n_aliases)^2 per operator); answers
        are always canonical number tokens.
        """
        chosen = sorted(self.operators) if operators is None else list(dict.fromkeys(operators))
        for token in chosen:
            self._check_operator(token)
        numbers = self.number_tokens(use_aliases=use_aliases)
        out: list[Example] = []
        for token in chosen:
            name = self.operators[token]
            fn = operation(name)
            for a_tok, a in numbers:
                for b_tok, b in numbers:
                    out.append(Example((a_tok, token, b_tok, EQUALS), str(fn(a, b, self.p)), token, name))
        return out

    def split(
        self, examples: Sequence[Example], *, test_fraction: float, seed: int
    ) -> tuple[list[Example], list[Example]]:
        """Shuffle with ``random.Random(seed)`` and hold out ``round(n * test_fraction)`` as test.

        Returns ``(train, test)``; deterministic for a given example order, fraction and seed.
        """
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
        shuffled = list(examples)
        random.Random(seed).shuffle(shuffled)
        n_test = int(round(len(shuffled) * test_fraction))
        return shuffled[n_test:], shuffled[:n_test]

    # -- JSON -----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "operators": dict(self.operators),
            "number_aliases": dict(self.number_aliases),
            "vocab_operators": list(self.vocab_operators),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModularTask:
        unknown = set(d) - {"p", "operators", "number_aliases", "vocab_operators"}
        if unknown:
            raise ValueError(f"unknown ModularTask fields: {sorted(unknown)}")
        return cls(
            p=d.get("p", 23),
            operators=d.get("operators", {"add": "add", "sub": "sub"}),
            number_aliases=d.get("number_aliases", {}),
            vocab_operators=tuple(d.get("vocab_operators", ())),
        )


class UnknownTokenError(KeyError, ValueError):
    """A token (or id) that the vocabulary does not have. Both a KeyError and a ValueError."""

    def __init__(self, token: object, message: str | None = None) -> None:
        self.token = token
        self.message = message or f"unknown token {token!r}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class Vocabulary:
    """Token <-> id mapping; id 0 is always :data:`PAD`."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if not tokens or tokens[0] != PAD:
            raise ValueError(f"token 0 must be {PAD!r}")
        if len(set(tokens)) != len(tokens):
            dupes = sorted({t for t in tokens if tokens.count(t) > 1})
            raise ValueError(f"vocabulary tokens must be unique; duplicated: {dupes}")
        self.tokens: list[str] = tokens
        self.pad_id: int = 0
        self._ids: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def for_task(cls, task: ModularTask) -> Vocabulary:
        return cls(task.vocabulary())

    def id(self, token: str) -> int:
        try:
            return self._ids[token]
        except (KeyError, TypeError):
            raise UnknownTokenError(token) from None

    def encode(self, tokens: Sequence[str]) -> list[int]:
        if isinstance(tokens, str):
            tokens = parse_expression(tokens)
        return [self.id(t) for t in tokens]

    def decode(self, ids: Iterable[Any]) -> list[str]:
        """Ids (ints, or anything with ``int()`` such as 0-d tensors) back to tokens."""
        out: list[str] = []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < len(self.tokens):
                raise UnknownTokenError(i, f"unknown token id {i} (vocabulary has {len(self.tokens)} tokens)")
            out.append(self.tokens[i])
        return out

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and token in self._ids

    def __repr__(self) -> str:
        return f"Vocabulary({len(self.tokens)} tokens)"
