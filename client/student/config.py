"""The ingestion config: one dataclass tree, saved as sorted JSON next to what it produced."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from m2kt._fields import check_known_fields
from m2kt.student.alignment import METHODS
from m2kt.student.cal import CALConfig
from m2kt.student.losses import LossWeights

__all__ = ["AdapterConfig", "AlignmentConfig", "IngestConfig", "InjectConfig", "RebindConfig", "VerifierConfig"]


@dataclass
class InjectConfig:
    """How mapped concepts enter the frozen student.

    ``token``: a concept labelled ``token:<t>`` replaces the output of the student's ``layer``
    wherever the input token is ``<t>`` — e.g. a synonym the student never learned gets the
    mapped meaning. ``none``: nothing is injected (alignment and adapters only).
    """

    mode: Literal["token", "none"] = "token"
    layer: str = "embed"

    def __post_init__(self) -> None:
        if self.mode not in ("token", "none"):
            raise ValueError(f"inject.mode must be 'token' or 'none', not {self.mode!r}")


@dataclass
class AdapterConfig:
    """Residual bottleneck adapters after student layers (zero-initialised output: a fresh one is a no-op)."""

    enabled: bool = False
    rank: int = 8
    layers: list[str] = field(default_factory=list)  # default: the student's last readable layer

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter.rank must be >= 1, not {self.rank}")


@dataclass
class RebindConfig:
    """Re-binding: the packet's new operation as a composition of the student's own operations.

    The student answers every ``x op y`` of its own ``operators`` over the operand domain (its forward
    passes, no teacher queries), scores the compositions ``op(U(a), V(b))`` against the teacher's answers
    to the packet's probes, and binds the new operator to the one that explains them — by slot injection
    (``apply="inject"``: one pass) or as a trace of the core's own passes (``apply="trace"``). When none
    explains at least ``min_explained`` of the probes, ingestion refuses and rolls back. With ``vote`` > 1
    (trace only), several such compositions answer together and the majority wins.
    """

    enabled: bool = False
    template: str = "{a} {op} {b} ="  # how the student's inputs are spelled, one word per token
    operators: list[str] = field(default_factory=list)  # the student's own operations (its trained operators)
    operands: list[str] | None = None  # the operand domain; default: every operand in the probes and the suite
    target: str | None = None  # the operator to bind; default: the one the packet's probes use
    slots: bool = True  # re-bind operands (False: the new operator can only be renamed to a known one)
    constants: bool = True  # operand transforms may use constants, e.g. sub(0, x)
    search: bool = True  # False: only a decomposition the packet declares is considered
    apply: Literal["inject", "trace"] = "inject"
    min_explained: float = 0.9  # share of the packet's probes the binding must answer as the teacher did
    # programs that answer together (trace only): the chosen one and up to vote - 1 others that explain the
    # probes and compute the same operation on the student's own tables; the answer most give wins, so an
    # error of the core on one program's path is outvoted (each costs its own passes per answer)
    vote: int = 1

    def __post_init__(self) -> None:
        if self.apply not in ("inject", "trace"):
            raise ValueError(f"rebind.apply must be 'inject' or 'trace', not {self.apply!r}")
        if not 0 < self.min_explained <= 1:
            raise ValueError(f"rebind.min_explained must be in (0, 1], not {self.min_explained}")
        if self.vote < 1:
            raise ValueError(f"rebind.vote must be at least 1 (one program answers), not {self.vote}")
        if self.vote > 1 and self.apply != "trace":
            raise ValueError(
                "rebind.vote > 1 runs several programs per answer, which needs rebind.apply='trace' "
                "(a slot binding is one program in one pass)"
            )
        if self.enabled and not self.operators:
            raise ValueError("rebind.operators must name the student's own operations (e.g. ['add', 'sub'])")


@dataclass
class AlignmentConfig:
    """Mapping the packet's concepts into the student's space through public anchors (no probe texts).

    Used for a student without an output head (an encoder), or when ``enabled``. The student embeds the
    packet's anchors (``layer``: default its last; ``pooling``: mean over the tokens, whatever their
    count), fits ``method`` (:func:`m2kt.student.alignment.fit_alignment`; ``auto``: ``anchored`` when
    the packet has a general anchor set, else by leave-one-out), and keeps the mapped concepts for
    :meth:`Student.classify`. ``anchor_labels``: also place each
    concept among the student's own anchors the teacher's space puts nearest it (weight chosen on held-
    out anchors). ``store``: a directory where the anchor pairs of a teacher are kept, so a later packet
    of that teacher without anchors costs no new queries.
    """

    enabled: bool = False
    method: str = "auto"
    pooling: str = "mean"
    anchor_labels: bool = False  # measured worse than the mapped concepts alone (m2kt bench real)
    store: str | None = None
    # anchors (domain ones, if any) the student must now place as the teacher's space does, as a share
    # of the way from chance (one concept in K) to all of them
    min_agreement: float = 0.2

    def __post_init__(self) -> None:
        if self.method not in ("auto", *METHODS):
            raise ValueError(f"alignment.method must be auto or one of {', '.join(METHODS)}, not {self.method!r}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"alignment.min_agreement must be in [0, 1], not {self.min_agreement}")


@dataclass
class VerifierConfig:
    """When the verifier and safety auditor roll an ingestion back."""

    task_margin: float = 0.02  # largest allowed drop of the task score (accuracy, or agreement with before)
    safety_threshold: float = 0.8  # cosine of a mapped concept to a flagged direction that fires the auditor
    output_bound: float = 0.1  # largest allowed mean total-variation change of outputs on safety probes

    def __post_init__(self) -> None:
        if not 0 <= self.task_margin <= 1 or not -1 <= self.safety_threshold <= 1 or not 0 <= self.output_bound <= 1:
            raise ValueError("verifier: task_margin and output_bound in [0, 1], safety_threshold in [-1, 1]")


@dataclass
class IngestConfig:
    """Everything an ingestion depends on; ``to_json`` is what the report records."""

    cal: CALConfig = field(default_factory=CALConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    inject: InjectConfig = field(default_factory=InjectConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    rebind: RebindConfig = field(default_factory=RebindConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    layer: str | None = None  # student layer probed for c^S_k (default: inject.layer)
    targets: list[str] = field(default_factory=list)  # concept labels to inject (never used as anchors)
    anchors: list[str] | None = None  # concept labels shared with the student (default: all but targets)
    steps: int = 100
    lr: float = 1e-2
    holdout_fraction: float = 0.25  # of the anchors, for early stopping
    patience: int = 20
    trust_region: float | None = None  # max relative distance of mapped targets from the zero-shot map
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA (bfloat16 autocast); ignored on the CPU
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.steps < 0 or self.patience < 1 or self.batch_size < 1:
            raise ValueError("steps must be >= 0, patience and batch_size >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, not {self.lr}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), not {self.holdout_fraction}")
        if self.trust_region is not None and self.trust_region <= 0:
            raise ValueError("trust_region must be > 0 (or null for none)")
        overlap = sorted(set(self.targets) & set(self.anchors or ()))
        if overlap:
            raise ValueError(f"a concept cannot be both a target and an anchor: {', '.join(overlap)}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IngestConfig:
        if not isinstance(data, dict):
            raise ValueError("an ingest config must be a JSON object")
        check_known_fields(cls, data, "config")
        values = dict(data)
        parts = {
            "cal": CALConfig,
            "loss": LossWeights,
            "inject": InjectConfig,
            "adapter": AdapterConfig,
            "verifier": VerifierConfig,
            "rebind": RebindConfig,
            "alignment": AlignmentConfig,
        }
        for name, kind in parts.items():
            if name in values:
                section = values[name]
                if not isinstance(section, dict):
                    raise ValueError(f"config.{name} must be an object")
                if hasattr(kind, "from_json"):
                    values[name] = kind.from_json(section)
                else:
                    check_known_fields(kind, section, f"config.{name}")
                    values[name] = kind(**section)
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), sort_keys=True, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> IngestConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_json(data)
