"""The student's composite training loss: L = α·L_geo + β·L_struct + γ·L_reason + λ·L_safety.

    loss_fn = CompositeLoss(LossWeights(geo=1.0, struct=0.1, reason=0.1, safety=1.0))
    total, terms = loss_fn(mapped=phi(teacher_concepts), target=student_anchor_concepts, flagged=flagged)
    total.backward()
    log(terms.as_dict())

Terms, one function each (usable on their own):

* :func:`geo_loss` — squared L2 between mapped concepts φ(c_k) and their targets c^S_k (paper Eq. 12);
  :func:`relational_geo_loss` matches the *structure* of the two sets instead (1 − linear CKA).
* :func:`struct_loss` — L1 between attention distributions (Eq. 13–14); :func:`pool_attention_to`
  brings (N, L, H, T, T) maps of any depth / head count down to (N, T, T).
* :func:`reason_loss` — KL between concept-similarity distributions along reasoning traces, so teacher
  and student widths never need to match; :func:`align_depth` resamples traces to a common step count.
* :func:`safety_loss` — squared hinge on the cosine between mapped concepts and flagged directions
  (Eq. 17–18); :func:`flagged_hits` lists the offending pairs for the safety auditor.

Every loss casts its inputs to float32 and runs with autocast disabled, on the inputs' device, so the
values are the same under ``torch.autocast`` (CUDA half / CPU bfloat16) as without it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from m2kt._fields import check_known_fields

__all__ = [
    "CompositeLoss",
    "LossTerms",
    "LossWeights",
    "align_depth",
    "flagged_hits",
    "geo_loss",
    "pool_attention_to",
    "reason_loss",
    "relational_geo_loss",
    "safety_loss",
    "struct_loss",
]

_EPS = 1e-8
_GEO_VARIANTS = ("absolute", "relational")
_WEIGHT_FIELDS = ("geo", "struct", "reason", "safety")


# --------------------------------------------------------------------------------------------- config


@dataclass
class LossWeights:
    """Weights α, β, γ, λ of the composite loss and the knobs of its terms (all JSON-serialisable)."""

    geo: float = 1.0
    geo_variant: Literal["absolute", "relational"] = "absolute"
    struct: float = 0.1
    reason: float = 0.1
    safety: float = 1.0
    reason_temperature: float = 0.1
    safety_margin: float = 0.5  # cosine above which a mapped concept is penalised for being near a flagged direction

    def __post_init__(self) -> None:
        for name in (*_WEIGHT_FIELDS, "reason_temperature", "safety_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"LossWeights.{name} must be a number, not {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"LossWeights.{name} must be finite, not {value!r}")
            setattr(self, name, value)
        for name in _WEIGHT_FIELDS:
            if getattr(self, name) < 0:
                raise ValueError(f"LossWeights.{name} must be >= 0, not {getattr(self, name)!r}")
        if self.geo_variant not in _GEO_VARIANTS:
            raise ValueError(f"LossWeights.geo_variant must be one of {_GEO_VARIANTS}, not {self.geo_variant!r}")
        if self.reason_temperature <= 0:
            raise ValueError(f"LossWeights.reason_temperature must be > 0, not {self.reason_temperature!r}")
        if not -1.0 <= self.safety_margin <= 1.0:
            raise ValueError(
                f"LossWeights.safety_margin is a cosine and must lie in [-1, 1], not {self.safety_margin!r}"
            )

    def to_json(self) -> dict[str, Any]:
        """A plain dict (every field), for ``json.dumps``."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LossWeights:
        """Inverse of :meth:`to_json`; missing keys take their defaults, unknown keys are a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"LossWeights JSON must be an object, not {type(d).__name__}")
        check_known_fields(cls, d, "loss")
        return cls(**d)


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _full_precision(*tensors: Tensor | None) -> Iterator[None]:
    """Disable autocast on the devices of ``tensors`` so float32 inputs stay float32 inside."""
    with contextlib.ExitStack() as stack:
        for device_type in sorted({t.device.type for t in tensors if t is not None}):
            try:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            except (RuntimeError, ValueError):  # a device type without autocast support: nothing to disable
                pass
        yield


def _zero_like(*tensors: Tensor) -> Tensor:
    """A float32 scalar 0 on the inputs' device, connected to their graph (so ``backward`` works)."""
    return sum((t.float().sum() * 0.0 for t in tensors), start=torch.zeros((), device=tensors[0].device))


def _check_matrix(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dim) tensor, not shape {tuple(t.shape)}")


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """(..., n, d) × (m, d) → (..., n, m) cosine similarities in float32 (zero vectors give 0)."""
    a = F.normalize(a.float(), dim=-1, eps=_EPS)
    b = F.normalize(b.float(), dim=-1, eps=_EPS)
    return a @ b.T


# --------------------------------------------------------------------------------------------- L_geo


def geo_loss(mapped: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over concepts of ||φ(c_k) − c^S_k||² (paper Eq. 12); ``weight`` (K,) is normalised to sum 1."""
    _check_matrix("mapped", mapped)
    if mapped.shape != target.shape:
        raise ValueError(f"mapped {tuple(mapped.shape)} and target {tuple(target.shape)} must have the same shape")
    with _full_precision(mapped, target, weight):
        if mapped.shape[0] == 0:
            return _zero_like(mapped, target)
        sq = (mapped.float() - target.float()).pow(2).sum(dim=-1)  # (K,)
        if weight is None:
            return sq.mean()
        if weight.shape != (mapped.shape[0],):
            raise ValueError(f"weight must have shape ({mapped.shape[0]},), not {tuple(weight.shape)}")
        w = weight.float().to(sq.device)  # (K,)
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("geo_loss weights must be finite and >= 0")
        total = w.sum()
        if float(total) <= 0:
            raise ValueError("geo_loss weights must not all be zero")
        return (w * sq).sum() / total


def relational_geo_loss(mapped: Tensor, target: Tensor) -> Tensor:
    """1 − linear CKA between the two concept sets (rows paired), in [0, 1].

    Both sets are centred over K; CKA = ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F), computed through the
    (K, K) Gram matrices. Invariant to rotation, isotropic scaling and translation of either set; the
    widths of the two sets may differ. A degenerate set (all rows equal) gives 1.
    """
    _check_matrix("mapped", mapped)
    _check_matrix("target", target)
    if mapped.shape[0] != target.shape[0]:
        raise ValueError(f"mapped has {mapped.shape[0]} concepts but target has {target.shape[0]}")
    with _full_precision(mapped, target):
        if mapped.shape[0] < 2:
            return _zero_like(mapped, target)  # one point (or none) has no structure to match
        x = mapped.float()
        y = target.float()
        x = x - x.mean(dim=0, keepdim=True)  # (K, d_S)
        y = y - y.mean(dim=0, keepdim=True)  # (K, d')
        gx = x @ x.T  # (K, K)
        gy = y @ y.T  # (K, K)
        cross = (gx * gy).sum()  # = ||Yᵀ X||²_F
        denom = torch.linalg.matrix_norm(gx) * torch.linalg.matrix_norm(gy)  # = ||Xᵀ X||_F ||Yᵀ Y||_F
        cka = cross / denom.clamp_min(_EPS)
        return (1.0 - cka).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------- L_struct


def pool_attention_to(attn: Tensor, layers: int | None = None) -> Tensor:
    """(N, L, H, T, T) → (N, T, T): the mean over heads and over the last ``layers`` layers (all when None).

    A (N, H, T, T) input is read as a single layer. Averaging distributions keeps rows distributions,
    so teacher and student maps of different depth and head count become comparable.
    """
    if attn.dim() == 4:
        attn = attn.unsqueeze(1)
    if attn.dim() != 5:
        raise ValueError(f"attention must be (N, L, H, T, T) or (N, H, T, T), not shape {tuple(attn.shape)}")
    depth = attn.shape[1]
    if layers is not None:
        if not 1 <= layers <= depth:
            raise ValueError(f"layers must be between 1 and {depth}, not {layers}")
        attn = attn[:, depth - layers :]
    with _full_precision(attn):
        return attn.float().mean(dim=(1, 2))  # (N, T, T)


def struct_loss(teacher_attention: Tensor, student_attention: Tensor, mask: Tensor | None = None) -> Tensor:
    """L1 between attention distributions (paper Eq. 13–14), in [0, 2].

    Inputs are (N, T, T) with each row a distribution over keys; ``mask`` (N, T) bool marks real query
    positions. The value is the mean over real query rows of Σ_keys |A_T − A_S|; 0 when no row is real.
    """
    if teacher_attention.dim() != 3 or teacher_attention.shape[-1] != teacher_attention.shape[-2]:
        raise ValueError(f"teacher_attention must be (N, T, T), not shape {tuple(teacher_attention.shape)}")
    if student_attention.shape != teacher_attention.shape:
        raise ValueError(
            f"student_attention {tuple(student_attention.shape)} must match teacher_attention "
            f"{tuple(teacher_attention.shape)} (pool with pool_attention_to first)"
        )
    with _full_precision(teacher_attention, student_attention, mask):
        a_t = teacher_attention.float()
        a_s = student_attention.float().to(a_t.device)
        row = (a_t - a_s).abs().sum(dim=-1)  # (N, T)
        if mask is None:
            return row.mean() if row.numel() else _zero_like(a_t, a_s)
        if mask.shape != row.shape:
            raise ValueError(f"mask must have shape {tuple(row.shape)} (N, T), not {tuple(mask.shape)}")
        m = mask.to(device=row.device, dtype=torch.bool)  # (N, T)
        count = m.sum()
        if int(count) == 0:
            return _zero_like(a_t, a_s)
        return torch.where(m, row, torch.zeros_like(row)).sum() / count


# --------------------------------------------------------------------------------------------- L_reason


def align_depth(states: Tensor, m_b: int) -> Tensor:
    """(P, m_a, d) → (P, m_b, d): resample a trace by relative depth (linear between neighbouring steps).

    Step j of the result sits at relative depth j / (m_b − 1) of the source, so the first and last steps
    are kept exactly; m_b == 1 keeps the last (deepest) step; m_a == m_b returns ``states`` unchanged.
    """
    if states.dim() != 3:
        raise ValueError(f"states must be (P, m, d), not shape {tuple(states.shape)}")
    if m_b < 1:
        raise ValueError(f"m_b must be >= 1, not {m_b}")
    m_a = states.shape[1]
    if m_a == m_b:
        return states
    if m_a == 0:
        raise ValueError("cannot resample a trace with no steps")
    if m_b == 1:
        return states[:, -1:]
    device = states.device
    pos = torch.arange(m_b, device=device, dtype=torch.float64) * (m_a - 1) / (m_b - 1)  # (m_b,)
    lo = pos.floor().long().clamp(max=m_a - 1)  # (m_b,)
    hi = (lo + 1).clamp(max=m_a - 1)  # (m_b,)
    frac = (pos - lo.double()).to(states.dtype if states.is_floating_point() else torch.float32)  # (m_b,)
    s = states if states.is_floating_point() else states.float()
    w = frac.view(1, m_b, 1)
    return s[:, lo] * (1 - w) + s[:, hi] * w  # (P, m_b, d)


def reason_loss(
    teacher_traces: Tensor,
    teacher_concepts: Tensor,
    student_traces: Tensor,
    student_concepts: Tensor,
    temperature: float = 0.1,
) -> Tensor:
    """KL(p || q) between concept-similarity distributions along the reasoning traces, mean over (probe, step).

    p = softmax(cos(teacher trace step, teacher concepts) / τ) over K; q likewise on the student side
    (typically with the CAL's mapped concepts), so d_T and d_S never need to match. Equals CE(p, q) − H(p):
    ≥ 0, and 0 exactly when the distributions agree. Traces must share (P, m) — see :func:`align_depth`.
    """
    if teacher_traces.dim() != 3 or student_traces.dim() != 3:
        raise ValueError(
            f"traces must be (P, m, d); got teacher {tuple(teacher_traces.shape)}, "
            f"student {tuple(student_traces.shape)}"
        )
    _check_matrix("teacher_concepts", teacher_concepts)
    _check_matrix("student_concepts", student_concepts)
    if teacher_traces.shape[:2] != student_traces.shape[:2]:
        raise ValueError(
            f"teacher traces (P, m) = {tuple(teacher_traces.shape[:2])} but student traces "
            f"{tuple(student_traces.shape[:2])}; resample with align_depth first"
        )
    if teacher_concepts.shape[0] != student_concepts.shape[0]:
        raise ValueError(
            f"teacher has {teacher_concepts.shape[0]} concepts but student has {student_concepts.shape[0]}"
        )
    if teacher_traces.shape[-1] != teacher_concepts.shape[-1]:
        raise ValueError(
            f"teacher traces have width {teacher_traces.shape[-1]} but teacher concepts {teacher_concepts.shape[-1]}"
        )
    if student_traces.shape[-1] != student_concepts.shape[-1]:
        raise ValueError(
            f"student traces have width {student_traces.shape[-1]} but student concepts {student_concepts.shape[-1]}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature!r}")
    with _full_precision(teacher_traces, teacher_concepts, student_traces, student_concepts):
        if teacher_traces.shape[0] * teacher_traces.shape[1] == 0 or teacher_concepts.shape[0] == 0:
            return _zero_like(student_traces, student_concepts)
        device = student_concepts.device
        log_p = torch.log_softmax(
            _cosine(teacher_traces, teacher_concepts).to(device) / temperature, dim=-1
        )  # (P, m, K)
        log_q = torch.log_softmax(
            _cosine(student_traces.to(device), student_concepts) / temperature, dim=-1
        )  # (P, m, K)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (P, m)
        return kl.mean().clamp_min(0.0)


# --------------------------------------------------------------------------------------------- L_safety


def safety_loss(mapped: Tensor, flagged: Tensor, margin: float) -> Tensor:
    """Mean over k of Σ_f relu(cos(φ(c_k), flagged_f) − margin)² (paper Eq. 17–18); 0 when F == 0."""
    _check_matrix("mapped", mapped)
    _check_matrix("flagged", flagged)
    with _full_precision(mapped, flagged):
        if flagged.shape[0] == 0 or mapped.shape[0] == 0:
            return _zero_like(mapped)
        if flagged.shape[1] != mapped.shape[1]:
            raise ValueError(f"flagged directions have width {flagged.shape[1]} but mapped concepts {mapped.shape[1]}")
        cos = _cosine(mapped, flagged.to(mapped.device))  # (K, F)
        return F.relu(cos - margin).pow(2).sum(dim=1).mean()


def flagged_hits(mapped: Tensor, flagged: Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """(concept index, flagged index, cosine) for every pair with cosine >= ``threshold``, highest cosine first."""
    _check_matrix("mapped", mapped)
    _check_matrix("flagged", flagged)
    if flagged.shape[0] == 0 or mapped.shape[0] == 0:
        return []
    if flagged.shape[1] != mapped.shape[1]:
        raise ValueError(f"flagged directions have width {flagged.shape[1]} but mapped concepts {mapped.shape[1]}")
    with torch.no_grad(), _full_precision(mapped, flagged):
        cos = _cosine(mapped.detach(), flagged.detach().to(mapped.device)).cpu()  # (K, F)
    ks, fs = torch.nonzero(cos >= threshold, as_tuple=True)
    hits = [(int(k), int(f), float(cos[k, f])) for k, f in zip(ks.tolist(), fs.tolist(), strict=True)]
    hits.sort(key=lambda h: (-h[2], h[0], h[1]))
    return hits


# --------------------------------------------------------------------------------------------- composite


@dataclass
class LossTerms:
    """One step's loss values as floats, for logging: the unweighted terms and the weighted total."""

    geo: float
    struct: float
    reason: float
    safety: float
    total: float

    def as_dict(self) -> dict[str, float]:
        """``{"geo": ..., "struct": ..., "reason": ..., "safety": ..., "total": ...}``."""
        return asdict(self)


class CompositeLoss:
    """L = α·L_geo + β·L_struct + γ·L_reason + λ·L_safety with the weights of a :class:`LossWeights`.

    A term is computed only when its weight is > 0 and all its inputs are given; otherwise it is
    left out of the total entirely and logged as 0.0. Conveniences: 5-D (N, L, H, T, T) attention is
    pooled with :func:`pool_attention_to`, and teacher traces are resampled to the student's step count
    with :func:`align_depth` when the two differ.
    """

    def __init__(self, weights: LossWeights) -> None:
        if not isinstance(weights, LossWeights):
            raise ValueError(f"weights must be a LossWeights, not {type(weights).__name__}")
        self.weights = weights

    def __call__(
        self,
        *,
        mapped: Tensor,
        target: Tensor,
        target_weight: Tensor | None = None,
        teacher_attention: Tensor | None = None,
        student_attention: Tensor | None = None,
        attention_mask: Tensor | None = None,
        teacher_traces: Tensor | None = None,
        teacher_concepts: Tensor | None = None,
        student_traces: Tensor | None = None,
        student_concepts: Tensor | None = None,
        flagged: Tensor | None = None,
        safety_mapped: Tensor | None = None,
    ) -> tuple[Tensor, LossTerms]:
        """(total: a float32 scalar on ``mapped``'s device, with grad; the unweighted terms and total as floats).

        L_safety watches ``safety_mapped`` when given (e.g. only the concepts that will be injected,
        centred like ``flagged``), else ``mapped``."""
        w = self.weights
        parts: list[Tensor] = []
        logged = {"geo": 0.0, "struct": 0.0, "reason": 0.0, "safety": 0.0}

        def add(name: str, weight: float, value: Tensor) -> None:
            logged[name] = float(value.detach())
            parts.append(weight * value.to(mapped.device))

        if w.geo > 0:
            if w.geo_variant == "relational":
                add("geo", w.geo, relational_geo_loss(mapped, target))
            else:
                add("geo", w.geo, geo_loss(mapped, target, target_weight))
        if w.struct > 0 and teacher_attention is not None and student_attention is not None:
            a_t = pool_attention_to(teacher_attention) if teacher_attention.dim() == 5 else teacher_attention
            a_s = pool_attention_to(student_attention) if student_attention.dim() == 5 else student_attention
            add("struct", w.struct, struct_loss(a_t, a_s, attention_mask))
        reason_inputs = (teacher_traces, teacher_concepts, student_traces, student_concepts)
        if w.reason > 0 and all(t is not None for t in reason_inputs):
            assert teacher_traces is not None and student_traces is not None
            assert teacher_concepts is not None and student_concepts is not None
            if teacher_traces.dim() == 3 and student_traces.dim() == 3:
                teacher_traces = align_depth(teacher_traces, student_traces.shape[1])
            add(
                "reason",
                w.reason,
                reason_loss(teacher_traces, teacher_concepts, student_traces, student_concepts, w.reason_temperature),
            )
        if w.safety > 0 and flagged is not None:
            watched = mapped if safety_mapped is None else safety_mapped
            add("safety", w.safety, safety_loss(watched, flagged, w.safety_margin))

        if parts:
            total = parts[0]
            for part in parts[1:]:
                total = total + part
        else:
            total = _zero_like(mapped)
        return total, LossTerms(total=float(total.detach()), **logged)
