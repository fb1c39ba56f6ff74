"""What to extract from a teacher: the packet spec, read from YAML/JSON or built in Python.

A spec says which layer to read, which probe inputs to run, how to turn hidden states into
concepts (named probes, clustering or gradient attribution), and whether to add attention
maps, reasoning traces, the abstraction graph and safety scores. It is checked twice before
any heavy work: on its own when it is parsed (:func:`PacketSpec.from_dict`), and against the
model when extraction starts (:func:`m2kt.teacher.build.check_spec`). Every problem is a
:class:`SpecError` naming the field and what is wrong.

Example (YAML)::

    topic: arith.mod23
    layer: blocks.1
    position: last
    concepts:
      method: named
      named:
        - {label: "op:add", inputs: ["3 add 5 =", "7 add 1 ="]}
        - {label: "op:sub", inputs: ["3 sub 5 =", "7 sub 1 ="]}
    attention: {pool: heads}
    traces: {source: layers}
    graph: {method: similarity, threshold: 0.5}
    safety: {threshold: 0.8, flagged: [{label: "op:mul", inputs: ["2 mul 3 ="]}]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from m2kt._fields import check_known_fields
from m2kt.errors import SpecError
from m2kt.format.manifest import TOPIC_PATTERN
from m2kt.nn.programs import Template
from m2kt.teacher.selection import spread_probes

__all__ = [
    "AnchorsSpec",
    "AttentionSpec",
    "AttributionSpec",
    "ClusteringSpec",
    "ConceptsSpec",
    "GraphSpec",
    "NamedProbe",
    "PacketSpec",
    "DecomposeSpec",
    "SafetySpec",
    "SelectionSpec",
    "SpecError",
    "TracesSpec",
    "load_spec",
]

Position = int | Literal["last", "mean"]


def _fail(where: str, problem: str) -> SpecError:
    return SpecError(f"{where}: {problem}")


def _check_position(where: str, value: Any) -> Position:
    if value in ("last", "mean"):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _fail(where, f"position must be 'last', 'mean' or an integer token index, not {value!r}")


@dataclass(frozen=True)
class NamedProbe:
    """A labelled concept: its probe inputs (never outputs or labels of those inputs)."""

    label: str
    inputs: tuple[str, ...]
    position: Position | None = None  # overrides PacketSpec.position for this concept
    private: bool | None = None  # None: the packet's default (PacketSpec.private)

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label.strip():
            raise SpecError("a named probe needs a non-empty 'label'")
        if isinstance(self.inputs, str) or not isinstance(self.inputs, Sequence):
            raise _fail(f"concept {self.label!r}", "'inputs' must be a list of probe inputs")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.inputs:
            raise _fail(f"concept {self.label!r}", "the probe set is empty; give at least one input")
        for item in self.inputs:
            if not isinstance(item, str) or not item.strip():
                raise _fail(f"concept {self.label!r}", f"probe input {item!r} must be a non-empty string")
        if self.position is not None:
            _check_position(f"concept {self.label!r}", self.position)


@dataclass(frozen=True)
class ClusteringSpec:
    """k-means (k-means++ initialisation, seeded) over hidden states of all probe inputs."""

    k: int = 4
    iterations: int = 100
    restarts: int = 4
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SpecError(f"concepts.clustering.k must be >= 1, not {self.k}")
        if self.iterations < 1 or self.restarts < 1:
            raise SpecError("concepts.clustering.iterations and restarts must be >= 1")


@dataclass(frozen=True)
class AttributionSpec:
    """Integrated gradients toward target output tokens; the top-attributed concepts are kept.

    ``mode: dimensions`` ranks hidden dimensions at the spec's layer: a target's concept is the
    attribution vector (hidden state × mean path gradient, averaged over probes) with all but
    the ``top`` dimensions zeroed. ``mode: tokens`` ranks input tokens (IG on the input
    embeddings): a target's concept is the mean hidden state, at the spec's layer, of the most
    attributed token of each probe. ``targets`` are output tokens, or ``predicted`` (one
    target per token the teacher predicts on the probes — the teacher's own outputs, no labels).
    """

    targets: tuple[str, ...] | Literal["predicted"] = "predicted"
    mode: Literal["dimensions", "tokens"] = "dimensions"
    steps: int = 16
    top: int = 8
    max_concepts: int = 16

    def __post_init__(self) -> None:
        if self.targets != "predicted":
            if isinstance(self.targets, str) or not self.targets:
                raise SpecError("concepts.attribution.targets must be 'predicted' or a non-empty list of tokens")
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.mode not in ("dimensions", "tokens"):
            raise SpecError(f"concepts.attribution.mode must be 'dimensions' or 'tokens', not {self.mode!r}")
        if self.steps < 1 or self.top < 1 or self.max_concepts < 1:
            raise SpecError("concepts.attribution.steps, top and max_concepts must be >= 1")


@dataclass(frozen=True)
class ConceptsSpec:
    method: Literal["named", "clustering", "attribution"] = "named"
    named: tuple[NamedProbe, ...] = ()
    clustering: ClusteringSpec = field(default_factory=ClusteringSpec)
    attribution: AttributionSpec = field(default_factory=AttributionSpec)

    def __post_init__(self) -> None:
        if self.method not in ("named", "clustering", "attribution"):
            raise SpecError(f"concepts.method must be 'named', 'clustering' or 'attribution', not {self.method!r}")
        object.__setattr__(self, "named", tuple(self.named))
        labels = [p.label for p in self.named]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dupes:
            raise SpecError(f"concepts.named: labels must be unique; repeated: {', '.join(dupes)}")


@dataclass(frozen=True)
class AttentionSpec:
    """Attention maps: per concept (mean over its probes) or per probe, optionally pooled."""

    enabled: bool = True
    per: Literal["concept", "probe"] = "concept"
    pool: Literal["none", "heads", "layers", "all"] = "none"

    def __post_init__(self) -> None:
        if self.per not in ("concept", "probe"):
            raise SpecError(f"attention.per must be 'concept' or 'probe', not {self.per!r}")
        if self.pool not in ("none", "heads", "layers", "all"):
            raise SpecError(f"attention.pool must be one of none, heads, layers, all; not {self.pool!r}")


@dataclass(frozen=True)
class TracesSpec:
    """Reasoning traces: m states per probe, through the layers or through greedy decoding steps."""

    enabled: bool = True
    source: Literal["layers", "decode"] = "layers"
    steps: int | None = None  # decode: number of generated steps (required); layers: all readable layers

    def __post_init__(self) -> None:
        if self.source not in ("layers", "decode"):
            raise SpecError(f"traces.source must be 'layers' or 'decode', not {self.source!r}")
        if self.source == "decode" and (self.steps is None or self.steps < 1):
            raise SpecError("traces.steps must be >= 1 when traces.source is 'decode'")


@dataclass(frozen=True)
class GraphSpec:
    """The abstraction graph: concept pairs whose similarity (or co-activation) passes a threshold."""

    enabled: bool = True
    method: Literal["similarity", "coactivation"] = "similarity"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in ("similarity", "coactivation"):
            raise SpecError(f"graph.method must be 'similarity' or 'coactivation', not {self.method!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise SpecError(f"graph.threshold must be in [-1, 1], not {self.threshold}")


AnchorKind = Literal["general", "domain"]


@dataclass(frozen=True)
class AnchorsSpec:
    """One set of public, unlabelled inputs the packet carries with the teacher's vectors of them, for the
    student to align its space with: ``texts`` and/or a ``file`` (one per line), the first ``count``.

    ``kind``: ``general`` inputs unrelated to the concepts (a public word list: no shared corpus needed)
    give the alignment its prior; ``domain`` inputs (public text of the concepts' kind) refine it. Anchors
    are read where the concepts are (the spec's layer and position): only then are they one space."""

    texts: tuple[str, ...] = ()
    file: str | None = None
    source: str = "inline"  # provenance recorded in the manifest, e.g. "wordlist:wamerican"
    kind: AnchorKind = "domain"
    count: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if self.count is not None and self.count < 0:
            raise SpecError(f"anchors.count must be >= 0, not {self.count}")
        if not self.source.strip():
            raise SpecError("anchors.source must say where the anchors come from")
        if self.kind not in ("general", "domain"):
            raise SpecError(f"anchors.kind must be 'general' or 'domain', not {self.kind!r}")

    def inputs(self) -> list[str]:
        texts = list(self.texts)
        if self.file is not None:
            try:
                lines = Path(self.file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise SpecError(f"anchors.file {self.file!r}: {exc.strerror or exc}") from None
            texts += [line.strip() for line in lines if line.strip()]
        texts = list(dict.fromkeys(texts))
        return texts if self.count is None else texts[: self.count]


@dataclass(frozen=True)
class SelectionSpec:
    """Spend teacher queries on ``count`` of the unlabelled ``probes``, spread over the operand values of
    ``template`` (:func:`m2kt.teacher.selection.spread_probes`); named concepts' inputs are untouched."""

    count: int | None = None  # None: every probe
    template: str = "{a} {op} {b} ="
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise SpecError(f"select.count must be >= 1, not {self.count}")
        _template("select.template", self.template)


@dataclass(frozen=True)
class DecomposeSpec:
    """Declare ``operator`` as a composition of ``known`` operators the teacher searches for on itself
    (:mod:`m2kt.teacher.decompose`); the search's teacher forward passes are counted as queries."""

    operator: str | None = None  # None: no declaration
    known: tuple[str, ...] = ()
    operands: tuple[str, ...] | None = None  # default: every operand of the probes
    template: str = "{a} {op} {b} ="

    def __post_init__(self) -> None:
        object.__setattr__(self, "known", tuple(self.known))
        if self.operands is not None:
            object.__setattr__(self, "operands", tuple(self.operands))
        if self.operator is not None and not self.known:
            raise SpecError("decompose.known must name the operators the decomposition may use")
        _template("decompose.template", self.template)


def _template(where: str, text: str) -> None:
    try:
        Template(text)
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class SafetySpec:
    """Teacher-side safety scoring against flagged concept directions.

    Flagged directions come from probe sets run through the teacher (``flagged``) and/or a
    safetensors file holding a ``directions`` tensor of shape [F, d_T] (``flagged_file``).
    """

    scorer: str = "cosine-flagged"
    threshold: float = 0.8
    flagged: tuple[NamedProbe, ...] = ()
    flagged_file: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise SpecError(f"safety.threshold must be in [0, 1], not {self.threshold}")
        object.__setattr__(self, "flagged", tuple(self.flagged))


@dataclass(frozen=True)
class PacketSpec:
    topic: str
    concepts: ConceptsSpec
    layer: str | None = None  # default: the model's last readable layer
    position: Position = "last"
    probes: tuple[str, ...] = ()  # extra unlabelled probe inputs (clustering, attribution)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    traces: TracesSpec = field(default_factory=TracesSpec)
    graph: GraphSpec = field(default_factory=GraphSpec)
    safety: SafetySpec = field(default_factory=SafetySpec)
    model_name: str | None = None
    parents: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    dtype: Literal["float32", "float16"] = "float32"  # dtype of the float tensors in the packet
    answers: bool = False  # the teacher's own answer to each probe (argmax output at the last token), as text
    private: bool = True  # named concepts' inputs stay out of the packet (only the vectors travel), unless opted in
    anchors: tuple[AnchorsSpec, ...] = ()  # public anchor sets, in order (their rows follow one another)
    select: SelectionSpec = field(default_factory=SelectionSpec)
    decompose: DecomposeSpec = field(default_factory=DecomposeSpec)

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not re.fullmatch(TOPIC_PATTERN, self.topic):
            raise SpecError(
                f"topic {self.topic!r} is not a valid topic name (lowercase letters, digits, '.', '_', '-')"
            )
        _check_position("position", self.position)
        object.__setattr__(self, "probes", tuple(self.probes))
        object.__setattr__(self, "parents", tuple(self.parents))
        anchors = (self.anchors,) if isinstance(self.anchors, AnchorsSpec) else tuple(self.anchors)
        object.__setattr__(self, "anchors", anchors)
        if self.batch_size < 1:
            raise SpecError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.dtype not in ("float32", "float16"):
            raise SpecError(f"dtype must be 'float32' or 'float16', not {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise SpecError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {self.device!r}")
        method = self.concepts.method
        if method == "named" and not self.concepts.named:
            raise SpecError("concepts.named is empty: the 'named' method needs at least one labelled probe set")
        if method != "named" and not (self.concepts.named or self.probes):
            raise SpecError(f"the probe set is empty: '{method}' needs probe inputs in 'probes' or 'concepts.named'")
        if method == "clustering" and self.concepts.clustering.k > len(self.probe_inputs()):
            raise SpecError(
                f"concepts.clustering.k = {self.concepts.clustering.k} but there are only "
                f"{len(self.probe_inputs())} probe inputs"
            )

    def probe_inputs(self) -> list[str]:
        """All distinct probe inputs in a fixed order: named concepts' inputs first, then ``probes``
        (only the ``select.count`` of them the selection picks, when it is set)."""
        seen: dict[str, None] = {}
        for probe in self.concepts.named:
            seen.update(dict.fromkeys(probe.inputs))
        seen.update(dict.fromkeys(self.selected_probes()))
        return list(seen)

    def anchor_inputs(self) -> list[tuple[AnchorsSpec, list[str]]]:
        """Each anchor set with its inputs; an input already in an earlier set is not repeated."""
        seen: set[str] = set()
        out = []
        for anchors in self.anchors:
            texts = [t for t in anchors.inputs() if t not in seen]
            seen.update(texts)
            out.append((anchors, texts))
        return out

    def is_private(self, probe: NamedProbe) -> bool:
        return self.private if probe.private is None else probe.private

    def private_inputs(self) -> set[str]:
        """Inputs that must not travel: those of private named concepts, unless also a public input. With
        clustering or attribution the named sets are probe inputs of an unsupervised method, not concepts:
        they travel (a concept there is a cluster, not anyone's labelled examples)."""
        if self.concepts.method != "named":
            return set()
        public = {t for p in self.concepts.named if not self.is_private(p) for t in p.inputs}
        public |= set(self.selected_probes())
        return {t for p in self.concepts.named if self.is_private(p) for t in p.inputs} - public

    def labelled_inputs(self) -> set[str]:
        """Inputs whose concept the teacher was told: the named concepts' inputs (when they form the
        concepts) and every flagged set's."""
        named = self.concepts.named if self.concepts.method == "named" else ()
        return {t for p in (*named, *self.safety.flagged) for t in p.inputs}

    def selected_probes(self) -> list[str]:
        if self.select.count is None:
            return list(self.probes)
        return spread_probes(self.probes, self.select.count, Template(self.select.template), seed=self.select.seed)

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PacketSpec:
        """Build from parsed YAML/JSON; unknown keys and wrong types are :class:`SpecError`."""
        if not isinstance(data, Mapping):
            raise SpecError("the spec must be a mapping (YAML/JSON object)")
        data = dict(data)
        try:
            concepts = dict(_section(data, "concepts", required=True))
            concepts["named"] = tuple(_named(p, "concepts.named") for p in concepts.get("named") or ())
            concepts["clustering"] = _build(ClusteringSpec, _section(concepts, "clustering"), "concepts.clustering")
            concepts["attribution"] = _build(AttributionSpec, _section(concepts, "attribution"), "concepts.attribution")
            data["concepts"] = _build(ConceptsSpec, concepts, "concepts")
            safety = dict(_section(data, "safety"))
            safety["flagged"] = tuple(_named(p, "safety.flagged") for p in safety.get("flagged") or ())
            data["safety"] = _build(SafetySpec, safety, "safety")
            data["select"] = _build(SelectionSpec, _section(data, "select"), "select")
            data["anchors"] = _anchor_sets(data.get("anchors"))
            data["decompose"] = _build(DecomposeSpec, _section(data, "decompose"), "decompose")
            for name, kind in (("attention", AttentionSpec), ("traces", TracesSpec), ("graph", GraphSpec)):
                section = data.get(name)
                if section is False:
                    data[name] = kind(enabled=False)
                else:
                    data[name] = _build(kind, _section(data, name), name)
            return _build(cls, data, "spec")
        except TypeError as exc:  # a value of the wrong type reached a comparison
            raise SpecError(f"spec: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _section(data: Mapping[str, Any], name: str, *, required: bool = False) -> Mapping[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise SpecError(f"'{name}' is missing")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"'{name}' must be a mapping, not {type(value).__name__}")
    return value


def _anchor_sets(value: Any) -> tuple[AnchorsSpec, ...]:
    """``anchors``: one set (a mapping) or a list of them."""
    if value is None:
        return ()
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise SpecError("'anchors' must be a mapping or a list of mappings (texts or file, source, kind, count)")
    return tuple(_build(AnchorsSpec, item, f"anchors[{i}]") for i, item in enumerate(items))


def _named(item: Any, where: str) -> NamedProbe:
    if not isinstance(item, Mapping):
        raise SpecError(f"{where}: each entry must be a mapping with 'label' and 'inputs'")
    return _build(NamedProbe, item, where)


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    check_known_fields(cls, values, where, SpecError)
    for name in ("k", "iterations", "restarts", "steps", "top", "max_concepts", "seed", "batch_size", "count"):
        if (
            name in values
            and values[name] is not None
            and (not isinstance(values[name], int) or isinstance(values[name], bool))
        ):
            raise SpecError(f"{where}.{name} must be an integer, not {values[name]!r}")
    try:
        return cls(**values)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from None


def load_spec(path: str | Path) -> PacketSpec:
    """Read a spec from a ``.yaml``/``.yml`` or ``.json`` file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path}: not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML: {exc}") from None
    return PacketSpec.from_dict(data or {})
