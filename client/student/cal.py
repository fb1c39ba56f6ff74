"""The Concept Alignment Layer (CAL) φθ: teacher concept embeddings ``(K, d_T)`` → student space ``(K, d_S)``.

Four kinds, all built by :func:`build_cal` from a :class:`CALConfig` and the N shared anchors
(concepts both models know, embedded by each: ``(N, d_T)`` and ``(N, d_S)``):

* ``linear`` — ``W x + b``;
* ``lowrank`` — ``(d_S × r)(r × d_T) x + b``;
* ``mlp`` — a linear path plus a 2-layer GELU residual whose output layer starts at zero;
* ``anchor`` — relative representations: a concept is described by its cosine similarities to
  the teacher anchors and mapped to the softmax-weighted mean of the student's own anchors,
  plus a zero-initialised linear correction.

``linear`` / ``lowrank`` / ``mlp`` start from a closed-form fit on the anchors (ridge regression
or generalised orthogonal Procrustes, :func:`ridge_fit` / :func:`procrustes_fit`) unless
``init='none'``. Every fresh layer is exactly its closed-form (or pure anchor-relative) map;
training only moves it from there. :func:`cal_state` / :func:`load_cal_state` save and restore
the weights (anchors included) as plain tensors for safetensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2kt._fields import check_known_fields

__all__ = [
    "AnchorRelativeCAL",
    "CALConfig",
    "ConceptAlignmentLayer",
    "LinearCAL",
    "LowRankCAL",
    "MLPCAL",
    "build_cal",
    "cal_state",
    "load_cal_state",
    "procrustes_fit",
    "ridge_fit",
]

CALKind = Literal["linear", "lowrank", "mlp", "anchor"]
CALInit = Literal["none", "procrustes", "ridge"]
_KINDS = ("linear", "lowrank", "mlp", "anchor")
_INITS = ("none", "procrustes", "ridge")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class CALConfig:
    """Which CAL to build and how to initialise it.

    ``ridge`` is relative: the penalty added to ``X_cᵀX_c`` is ``ridge * trace(X_cᵀX_c) / d_T``
    (``ridge`` times the mean eigenvalue of the anchors' scatter), so it does not depend on the
    scale of the teacher's embeddings. ``center`` centres each space on its anchors' mean before
    fitting (the bias then carries the means) and, for ``anchor``, before taking cosines; with
    ``center=False`` the closed-form fits go through the origin (bias 0).
    """

    kind: CALKind = "anchor"
    rank: int = 16  # lowrank: inner rank (capped at min(d_T, d_S))
    hidden: int = 256  # mlp: hidden width
    init: CALInit = "ridge"  # closed-form init from paired anchors (linear/lowrank/mlp); ignored by 'anchor'
    ridge: float = 1e-2  # relative ridge strength, see above
    temperature: float = 0.1  # anchor: softmax temperature over cosine similarities
    center: bool = True  # centre each space on its anchors' mean before fitting / comparing

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"cal.kind must be one of {', '.join(_KINDS)}, not {self.kind!r}")
        if self.init not in _INITS:
            raise ValueError(f"cal.init must be one of {', '.join(_INITS)}, not {self.init!r}")
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"cal.rank must be an integer >= 1, not {self.rank!r}")
        if not _is_int(self.hidden) or self.hidden < 1:
            raise ValueError(f"cal.hidden must be an integer >= 1, not {self.hidden!r}")
        if not _is_number(self.ridge) or not math.isfinite(self.ridge) or self.ridge < 0:
            raise ValueError(f"cal.ridge must be a finite number >= 0, not {self.ridge!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"cal.temperature must be a finite number > 0, not {self.temperature!r}")
        if not isinstance(self.center, bool):
            raise ValueError(f"cal.center must be true or false, not {self.center!r}")
        self.ridge = float(self.ridge)
        self.temperature = float(self.temperature)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CALConfig:
        """Inverse of :meth:`to_json`; missing fields take their defaults, unknown ones are a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a CAL config must be a JSON object, not {type(d).__name__}")
        check_known_fields(cls, d, "cal")
        return cls(**d)


# --------------------------------------------------------------------------- closed-form fits


def _check_pair(x: Tensor, y: Tensor, where: str) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}: {name} must be a torch.Tensor, not {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{where}: {name} must be 2-D (N, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating-point tensor, not {t.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: x and y need the same number of rows N, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 1:
        raise ValueError(f"{where}: need at least one paired row, got N=0")


def _centred(x: Tensor, y: Tensor, center: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 copies on x's device: ``x_c, y_c, mean_x, mean_y`` (means are zero without ``center``)."""
    xd = x.detach().to(torch.float64)  # (N, d_T)
    yd = y.detach().to(device=x.device, dtype=torch.float64)  # (N, d_S)
    if center:
        mx, my = xd.mean(dim=0), yd.mean(dim=0)  # (d_T,), (d_S,)
    else:
        mx, my = xd.new_zeros(xd.shape[1]), yd.new_zeros(yd.shape[1])
    return xd - mx, yd - my, mx, my


def ridge_fit(x: Tensor, y: Tensor, lam: float, *, center: bool = True) -> tuple[Tensor, Tensor]:
    """Ridge least squares ``y ≈ x Wᵀ + b``: returns ``W (d_S, d_T)`` and ``b (d_S,)`` in ``x.dtype``.

    ``lam`` is relative (penalty ``lam * trace(X_cᵀX_c) / d_T``); the bias is not penalised.
    Solved in float64, in the primal when ``N >= d_T`` and the dual (``N × N``) otherwise;
    ``lam = 0`` gives the minimum-norm least-squares solution (pseudo-inverse).
    """
    _check_pair(x, y, "ridge_fit")
    if not _is_number(lam) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"ridge_fit: lam must be a finite number >= 0, not {lam!r}")
    xc, yc, mx, my = _centred(x, y, center)  # (N, d_T), (N, d_S), (d_T,), (d_S,)
    n, d_t = xc.shape
    reg = float(lam) * float((xc * xc).sum()) / d_t
    if reg > 0:
        if n >= d_t:
            eye = torch.eye(d_t, dtype=xc.dtype, device=xc.device)
            wt = torch.linalg.solve(xc.T @ xc + reg * eye, xc.T @ yc)  # (d_T, d_S)
        else:
            eye = torch.eye(n, dtype=xc.dtype, device=xc.device)
            wt = xc.T @ torch.linalg.solve(xc @ xc.T + reg * eye, yc)  # (d_T, d_S)
    else:
        wt = torch.linalg.pinv(xc) @ yc  # (d_T, d_S)
    w = wt.T  # (d_S, d_T)
    b = my - w @ mx  # (d_S,)
    return w.to(x.dtype).contiguous(), b.to(x.dtype).contiguous()


def procrustes_fit(x: Tensor, y: Tensor, *, center: bool = True) -> tuple[Tensor, Tensor]:
    """Scaled orthogonal Procrustes ``y ≈ x Wᵀ + b`` with ``W = s U Vᵀ`` semi-orthogonal: ``(d_S, d_T)``, ``(d_S,)``.

    ``U Vᵀ`` comes from the SVD of ``y_cᵀ x_c``; for ``d_T != d_S`` it has orthonormal rows or
    columns (whichever is fewer). ``s`` is the least-squares isotropic scale for that rotation;
    ``b = mean_y - W mean_x``. Float64 inside, returned in ``x.dtype``.
    """
    _check_pair(x, y, "procrustes_fit")
    xc, yc, mx, my = _centred(x, y, center)  # (N, d_T), (N, d_S), (d_T,), (d_S,)
    u, s_vals, vh = torch.linalg.svd(yc.T @ xc, full_matrices=False)  # (d_S, k), (k,), (k, d_T)
    rot = u @ vh  # (d_S, d_T)
    denom = (xc @ rot.T).square().sum()
    scale = s_vals.sum() / denom if float(denom) > 0 else denom.new_zeros(())
    w = scale * rot  # (d_S, d_T)
    b = my - w @ mx  # (d_S,)
    return w.to(x.dtype).contiguous(), b.to(x.dtype).contiguous()


# --------------------------------------------------------------------------- layers


class ConceptAlignmentLayer(nn.Module):
    """φθ: teacher concept embeddings (K, d_T) -> student space (K, d_S)."""

    kind: ClassVar[str] = ""

    def __init__(self, config: CALConfig, d_teacher: int, d_student: int) -> None:
        super().__init__()
        if not _is_int(d_teacher) or d_teacher < 1 or not _is_int(d_student) or d_student < 1:
            raise ValueError(f"d_teacher and d_student must be integers >= 1, got {d_teacher!r} and {d_student!r}")
        self.config = config
        self.d_teacher = d_teacher
        self.d_student = d_student

    def forward(self, concepts: Tensor) -> Tensor:
        """Map ``(..., d_T)`` to ``(..., d_S)``; the input is cast to the layer's dtype."""
        if not isinstance(concepts, Tensor):
            raise ValueError(f"concepts must be a torch.Tensor, not {type(concepts).__name__}")
        if concepts.ndim < 1 or concepts.shape[-1] != self.d_teacher:
            raise ValueError(f"concepts must have shape (..., {self.d_teacher}), got {tuple(concepts.shape)}")
        lead = concepts.shape[:-1]
        flat = concepts.reshape(-1, self.d_teacher).to(self._dtype())  # (K, d_T)
        return self._map(flat).reshape(*lead, self.d_student)  # (..., d_S)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _map(self, x: Tensor) -> Tensor:  # (K, d_T) -> (K, d_S)
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, d_teacher={self.d_teacher}, d_student={self.d_student}"


def _closed_form(config: CALConfig, anchors_teacher: Tensor, anchors_student: Tensor) -> tuple[Tensor, Tensor]:
    """The configured closed-form fit in float64: ``W (d_S, d_T)``, ``b (d_S,)``."""
    x = anchors_teacher.detach().to(torch.float64)  # (N, d_T)
    y = anchors_student.detach().to(device=x.device, dtype=torch.float64)  # (N, d_S)
    if config.init == "procrustes":
        return procrustes_fit(x, y, center=config.center)
    return ridge_fit(x, y, config.ridge, center=config.center)


class _FittableCAL(ConceptAlignmentLayer):
    """A CAL with a closed-form starting point fitted on paired anchors."""

    def init_from_anchors(self, anchors_teacher: Tensor, anchors_student: Tensor) -> None:
        """Set the weights to the configured closed-form fit (``config.init``; ``'none'`` means ridge here)."""
        _check_anchor_shapes(anchors_teacher, anchors_student, self.d_teacher, self.d_student, min_n=2)
        w, b = _closed_form(self.config, anchors_teacher, anchors_student)  # (d_S, d_T), (d_S,)
        with torch.no_grad():
            self._set_linear(w, b)

    def _set_linear(self, w: Tensor, b: Tensor) -> None:
        raise NotImplementedError


class LinearCAL(_FittableCAL):
    """``W x + b``."""

    kind: ClassVar[str] = "linear"

    def __init__(self, config: CALConfig, d_teacher: int, d_student: int) -> None:
        super().__init__(config, d_teacher, d_student)
        self.linear = nn.Linear(d_teacher, d_student)

    def _set_linear(self, w: Tensor, b: Tensor) -> None:
        self.linear.weight.copy_(w)
        self.linear.bias.copy_(b)

    def _map(self, x: Tensor) -> Tensor:
        return self.linear(x)  # (K, d_S)


class LowRankCAL(_FittableCAL):
    """``up(down(x)) + b`` with ``down: d_T → r`` and ``up: r → d_S``; ``r = min(config.rank, d_T, d_S)``.

    The closed-form init is the truncated SVD of the fitted ``W``, split evenly (``√σ`` on each side).
    """

    kind: ClassVar[str] = "lowrank"

    def __init__(self, config: CALConfig, d_teacher: int, d_student: int) -> None:
        super().__init__(config, d_teacher, d_student)
        self.rank = min(config.rank, d_teacher, d_student)
        self.down = nn.Linear(d_teacher, self.rank, bias=False)
        self.up = nn.Linear(self.rank, d_student)

    def _set_linear(self, w: Tensor, b: Tensor) -> None:
        u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)  # (d_S, k), (k,), (k, d_T)
        root = s[: self.rank].sqrt()  # (r,)
        self.up.weight.copy_(u[:, : self.rank] * root)  # (d_S, r)
        self.down.weight.copy_(root[:, None] * vh[: self.rank])  # (r, d_T)
        self.up.bias.copy_(b)

    def _map(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (K, d_S)


class MLPCAL(_FittableCAL):
    """``linear(x) + mlp(x)``: a closed-form linear path plus a GELU residual whose output layer starts at zero."""

    kind: ClassVar[str] = "mlp"

    def __init__(self, config: CALConfig, d_teacher: int, d_student: int) -> None:
        super().__init__(config, d_teacher, d_student)
        self.linear = nn.Linear(d_teacher, d_student)
        self.mlp = nn.Sequential(nn.Linear(d_teacher, config.hidden), nn.GELU(), nn.Linear(config.hidden, d_student))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def _set_linear(self, w: Tensor, b: Tensor) -> None:
        self.linear.weight.copy_(w)
        self.linear.bias.copy_(b)

    def _map(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.mlp(x)  # (K, d_S)


class AnchorRelativeCAL(ConceptAlignmentLayer):
    """Relative representations: ``softmax(cos(c, A_T) / τ) @ A_S + correction(c)``.

    ``A_T (N, d_T)`` / ``A_S (N, d_S)`` are the shared anchors as each model embeds them (buffers,
    saved in the state dict); with ``center`` the teacher side is centred on its anchors' mean
    before the cosines. Trainable: ``log_temperature`` (starts at ``log(config.temperature)``) and
    a linear correction ``d_T → d_S`` that starts at zero, so a fresh layer is the pure anchor map.
    """

    kind: ClassVar[str] = "anchor"

    def __init__(
        self, config: CALConfig, d_teacher: int, d_student: int, anchors_teacher: Tensor, anchors_student: Tensor
    ) -> None:
        super().__init__(config, d_teacher, d_student)
        _check_anchor_shapes(anchors_teacher, anchors_student, d_teacher, d_student, min_n=1)
        dtype, device = torch.get_default_dtype(), anchors_teacher.device
        self.register_buffer("anchors_teacher", anchors_teacher.detach().to(dtype=dtype).clone())  # (N, d_T)
        self.register_buffer("anchors_student", anchors_student.detach().to(device, dtype).clone())  # (N, d_S)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature), dtype=dtype, device=device))
        self.correction = nn.Linear(d_teacher, d_student, device=device)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    @property
    def temperature(self) -> float:
        """The current softmax temperature."""
        return float(self.log_temperature.detach().exp())

    def similarities(self, concepts: Tensor) -> Tensor:
        """Cosine similarities of ``(K, d_T)`` concepts to the teacher anchors: ``(K, N)``."""
        x, anchors = self._centre(concepts.to(self.anchors_teacher.dtype))
        return F.normalize(x, dim=-1) @ F.normalize(anchors, dim=-1).T  # (K, N)

    def _centre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        anchors = self.anchors_teacher  # (N, d_T)
        if self.config.center:
            mean = anchors.mean(dim=0)  # (d_T,)
            return x - mean, anchors - mean
        return x, anchors

    def _map(self, x: Tensor) -> Tensor:
        xc, anchors = self._centre(x)  # (K, d_T), (N, d_T)
        sims = F.normalize(xc, dim=-1) @ F.normalize(anchors, dim=-1).T  # (K, N)
        weights = torch.softmax(sims / self.log_temperature.exp(), dim=-1)  # (K, N)
        return weights @ self.anchors_student + self.correction(xc)  # (K, d_S)


_LAYERS: dict[str, type[_FittableCAL]] = {"linear": LinearCAL, "lowrank": LowRankCAL, "mlp": MLPCAL}


def _check_anchor_shapes(
    anchors_teacher: Tensor, anchors_student: Tensor, d_teacher: int, d_student: int, *, min_n: int
) -> None:
    for name, t, width, side in (
        ("anchors_teacher", anchors_teacher, d_teacher, "d_teacher"),
        ("anchors_student", anchors_student, d_student, "d_student"),
    ):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
        if t.ndim != 2 or t.shape[1] != width:
            raise ValueError(f"{name} must have shape (N, {width}) ({side}={width}), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, not {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    n_t, n_s = anchors_teacher.shape[0], anchors_student.shape[0]
    if n_t != n_s:
        raise ValueError(
            f"anchors_teacher and anchors_student must describe the same N anchors, got N={n_t} and N={n_s} "
            f"(shapes {tuple(anchors_teacher.shape)} and {tuple(anchors_student.shape)})"
        )
    if n_t < min_n:
        raise ValueError(f"need at least {min_n} shared anchor(s), got N={n_t}")


def build_cal(
    config: CALConfig,
    d_teacher: int,
    d_student: int,
    *,
    anchors_teacher: Tensor | None = None,
    anchors_student: Tensor | None = None,
) -> ConceptAlignmentLayer:
    """Build the configured CAL on the anchors' device (CPU without anchors), initialised as configured.

    ``anchor`` needs both anchor sets (N >= 1); ``linear``/``lowrank``/``mlp`` need them (N >= 2)
    unless ``init='none'``, which keeps torch's default random init (seeded by ``torch.manual_seed``).
    """
    if not isinstance(config, CALConfig):
        raise ValueError(f"config must be a CALConfig, not {type(config).__name__}")
    if not _is_int(d_teacher) or d_teacher < 1 or not _is_int(d_student) or d_student < 1:
        raise ValueError(f"d_teacher and d_student must be integers >= 1, got {d_teacher!r} and {d_student!r}")
    have = (anchors_teacher is not None, anchors_student is not None)
    needs = config.kind == "anchor" or config.init != "none"
    if needs and not all(have):
        missing = [n for n, h in zip(("anchors_teacher", "anchors_student"), have, strict=True) if not h]
        why = "kind='anchor'" if config.kind == "anchor" else f"kind={config.kind!r} with init={config.init!r}"
        raise ValueError(
            f"{why} needs both anchor sets (the shared concepts embedded by teacher and student); "
            f"missing: {', '.join(missing)} (use init='none' for a random start without anchors)"
        )
    if any(have) and not all(have):
        raise ValueError("give both anchors_teacher and anchors_student, or neither")
    device = None
    if all(have):
        assert anchors_teacher is not None and anchors_student is not None
        min_n = 1 if config.kind == "anchor" or config.init == "none" else 2
        _check_anchor_shapes(anchors_teacher, anchors_student, d_teacher, d_student, min_n=min_n)
        device = anchors_teacher.device
    if config.kind == "anchor":
        assert anchors_teacher is not None and anchors_student is not None
        return AnchorRelativeCAL(config, d_teacher, d_student, anchors_teacher, anchors_student)
    layer = _LAYERS[config.kind](config, d_teacher, d_student)
    if device is not None:
        layer = layer.to(device)
    if config.init != "none":
        assert anchors_teacher is not None and anchors_student is not None
        layer.init_from_anchors(anchors_teacher, anchors_student)
    return layer


# --------------------------------------------------------------------------- saving


def cal_state(cal: ConceptAlignmentLayer) -> dict[str, Tensor]:
    """The state dict as contiguous CPU tensors (ready for ``safetensors.torch.save_file``)."""
    return {name: t.detach().to("cpu").contiguous() for name, t in cal.state_dict().items()}


def load_cal_state(cal: ConceptAlignmentLayer, tensors: dict[str, Tensor]) -> None:
    """Strictly load :func:`cal_state` tensors into ``cal``; missing, unexpected or misshapen keys are a ValueError."""
    expected = cal.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{name}: expected {tuple(expected[name].shape)}, got {tuple(tensors[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tuple(tensors[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {'; '.join(shapes)}")
    if problems:
        raise ValueError(f"cannot load CAL state into {type(cal).__name__}: {'; '.join(problems)}")
    cal.load_state_dict(tensors, strict=True)
