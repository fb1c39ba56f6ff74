"""Aligning the teacher's space to the student's from paired anchors — closed form, chosen on held-out anchors.

An anchor is one public input both models embedded: the teacher's vector travels in the packet, the
student computes its own. From N such pairs (often N < d) a map φ: teacher → student is fitted and the
teacher's concepts are carried across. The methods, each with its one free parameter chosen by leave-one-
out on the anchors themselves (never a fixed λ):

* ``anchored`` — a prior from general anchors (a public word list: no shared corpus), refined by ridge
  on the domain anchors and shrunk toward the prior (see :func:`_anchored`);
* ``ridge`` — standardised least squares with a ridge penalty (dual form: cheap when N < d);
* ``procrustes`` — a rotation and one scale, restricted to the subspace the anchors span (the null-space
  directions, which N < d anchors cannot determine, are not guessed);
* ``translation`` — latent space translation (Maiorca et al., NeurIPS 2023): standardise each space,
  rotate by Procrustes, restore the student's statistics;
* ``relative`` — relative representations (Moschella et al., ICLR 2023): a vector is its similarities
  to the anchors; it maps to the similarity-weighted mix of the student's own anchors;
* ``auto`` — ``anchored`` when general anchors are present (measured best), else the best leave-one-out
  score of the others.

The score is the mean cosine between a held-out anchor's student vector and its prediction from the rest,
both less the student anchors' mean: an embedding space's common component would otherwise make
predicting the mean look good.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["METHODS", "Alignment", "fit_alignment"]

METHODS = ("anchored", "ridge", "procrustes", "translation", "relative")
_EPS = 1e-8


@dataclass
class Alignment:
    """A fitted map from teacher vectors to student vectors."""

    method: str
    param: float | None  # λ (ridge, anchored; None: the prior alone), τ (relative), rank (procrustes, translation)
    score: float  # leave-one-out mean cosine on the anchors
    anchors: int
    _apply: Callable[[Tensor], Tensor] = field(repr=False)
    scores: dict[str, float] = field(default_factory=dict)  # every method's score, when chosen by "auto"
    general: int = 0  # of the anchors, those of general sets (the anchored method's prior)

    def map(self, teacher: Tensor) -> Tensor:
        """(n, d_T) → (n, d_S)."""
        return self._apply(teacher.float())

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "param": self.param,
            "loo_cosine": self.score,
            "anchors": self.anchors,
            "general_anchors": self.general,
            "scores": self.scores,
        }


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=_EPS)


# ----------------------------------------------------------------------------------------------- ridge


def _standardise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mean = x.mean(0, keepdim=True)
    scale = (x - mean).pow(2).sum(1).mean().sqrt().clamp_min(_EPS)  # one scale: the anchors' rms norm
    return (x - mean) / scale, mean, scale


def _ridge_toward(xs: Tensor, ys: Tensor, prior: Tensor | None, lams: list[float]) -> tuple[float, float, Tensor]:
    """(score, λ, W): W = prior + ridge fit of what the prior leaves, on standardised anchors; λ by exact
    leave-one-out (dual form: cheap when N < d). ``prior`` None is plain ridge (shrunk toward zero)."""
    base = xs @ prior if prior is not None else torch.zeros_like(ys)
    r = ys - base  # (N, d_S): what the prior does not explain
    k = xs @ xs.T  # (N, N)
    n = k.shape[0]
    eye = torch.eye(n, dtype=k.dtype)
    centre = -ys / (n - 1)  # each anchor's others' mean (ys is centred on all of them)
    best: tuple[float, float] = (-math.inf, lams[0])
    for lam in lams:
        hat = k @ torch.linalg.inv(k + lam * eye)
        # leave-one-out predictions; the centring is an unpenalised intercept, so its 1/N joins each leverage
        leverage = torch.diagonal(hat) + 1.0 / n
        loo = base + r - (r - hat @ r) / (1 - leverage).clamp_min(_EPS).unsqueeze(1)
        score = float(_cos(loo - centre, ys - centre).mean())  # centred: the common component explains nothing
        if score > best[0]:
            best = (score, lam)
    score, lam = best
    weights = xs.T @ torch.linalg.solve(k + lam * eye, r)  # (d_T, d_S)
    return score, lam, weights if prior is None else prior + weights


def _lams(xs: Tensor, low: int, high: int) -> list[float]:
    base = float(xs.pow(2).sum()) / xs.shape[0]  # the kernel's mean diagonal
    return [base * 10.0**e for e in range(low, high)]


def _ridge(x: Tensor, y: Tensor) -> tuple[float, float, Callable[[Tensor], Tensor]]:
    xs, mx, sx = _standardise(x)
    ys, my, sy = _standardise(y)
    score, lam, weights = _ridge_toward(xs, ys, None, _lams(xs, -4, 4))

    def apply(t: Tensor) -> Tensor:
        return ((t - mx) / sx) @ weights * sy + my

    return score, lam, apply


# ------------------------------------------------------------------------------------- procrustes, translation


def _rotation(xs: Tensor, ys: Tensor, rank: int) -> Tensor:
    """The (d_T, d_S) semi-orthogonal map of rank ``rank`` that best rotates ``xs`` onto ``ys``."""
    u, s, vh = torch.linalg.svd(xs.T @ ys, full_matrices=False)
    return u[:, :rank] @ vh[:rank]


def _procrustes_fit(x: Tensor, y: Tensor, per_dim: bool) -> Callable[[Tensor], Tensor]:
    mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    if per_dim:  # translation: every dimension standardised
        sx = (x - mx).std(0, keepdim=True).clamp_min(_EPS)
        sy = (y - my).std(0, keepdim=True).clamp_min(_EPS)
    else:
        sx = (x - mx).pow(2).sum(1).mean().sqrt().clamp_min(_EPS)
        sy = (y - my).pow(2).sum(1).mean().sqrt().clamp_min(_EPS)
    xs, ys = (x - mx) / sx, (y - my) / sy
    rank = max(1, min(xs.shape[0] - 1, xs.shape[1], ys.shape[1]))  # the subspace the anchors determine
    r = _rotation(xs, ys, rank)
    fitted = xs @ r
    scale = float((fitted * ys).sum() / fitted.pow(2).sum().clamp_min(_EPS))

    def apply(t: Tensor) -> Tensor:
        return ((t - mx) / sx) @ r * scale * sy + my

    return apply


def _loo_score(fit: Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]], x: Tensor, y: Tensor, folds: int) -> float:
    """Mean held-out cosine over ``folds`` folds (leave-one-out when folds >= N)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    groups = [order[i::folds] for i in range(min(folds, n))]
    scores = []
    for held in groups:
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        if int(keep.sum()) < 2:
            continue
        apply = fit(x[keep], y[keep])
        centre = y[keep].mean(0, keepdim=True)
        scores.append(_cos(apply(x[held]) - centre, y[held] - centre))
    return float(torch.cat(scores).mean()) if scores else -math.inf


# ----------------------------------------------------------------------------------------------- relative


def _relative(x: Tensor, y: Tensor, taus: list[float]) -> tuple[float, float, Callable[[Tensor], Tensor]]:
    mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    xn = torch.nn.functional.normalize(x - mx, dim=-1)
    sims = xn @ xn.T  # (N, N)
    sims.fill_diagonal_(-math.inf)  # leave-one-out: an anchor never explains itself
    best = (-math.inf, taus[0])
    for tau in taus:
        pred = torch.softmax(sims / tau, dim=-1) @ y
        centre = (my * len(y) - y) / (len(y) - 1)  # each anchor's others' mean
        score = float(_cos(pred - centre, y - centre).mean())
        if score > best[0]:
            best = (score, tau)
    score, tau = best

    def apply(t: Tensor) -> Tensor:
        tn = torch.nn.functional.normalize(t - mx, dim=-1)
        return torch.softmax(tn @ xn.T / tau, dim=-1) @ y

    return score, tau, apply


# ----------------------------------------------------------------------------------------------- anchored


def _anchored(
    x: Tensor, y: Tensor, general: Tensor, folds: int
) -> tuple[float, float | None, Callable[[Tensor], Tensor]]:
    """A prior from the general anchors, refined on the domain anchors.

    The prior is the Procrustes map between the general anchors (each space standardised by their own
    statistics); the domain anchors, standardised by theirs, fit a ridge map shrunk toward it, λ by leave-
    one-out. Each group's own centring cancels the offset between, say, single words and sentences. With
    fewer than 3 domain anchors the prior is used alone, with the general anchors' statistics."""
    xg, mxg, sxg = _standardise(x[general])
    yg, myg, syg = _standardise(y[general])
    rank = max(1, min(xg.shape[0] - 1, xg.shape[1], yg.shape[1]))
    r = _rotation(xg, yg, rank)
    fitted = xg @ r
    prior = r * float((fitted * yg).sum() / fitted.pow(2).sum().clamp_min(_EPS))  # (d_T, d_S)
    domain = ~general
    if int(domain.sum()) < 3:
        score = _loo_score(lambda a, b: _procrustes_fit(a, b, False), x[general], y[general], folds)

        def alone(t: Tensor) -> Tensor:
            return ((t - mxg) / sxg) @ prior * syg + myg

        return score, None, alone
    xs, mx, sx = _standardise(x[domain])
    ys, my, sy = _standardise(y[domain])
    score, lam, weights = _ridge_toward(xs, ys, prior, _lams(xs, -3, 6))

    def apply(t: Tensor) -> Tensor:
        return ((t - mx) / sx) @ weights * sy + my

    return score, lam, apply


# ----------------------------------------------------------------------------------------------- the choice


def fit_alignment(
    teacher_anchors: Tensor,
    student_anchors: Tensor,
    method: str = "auto",
    *,
    general: Tensor | None = None,
    folds: int = 10,
) -> Alignment:
    """Fit ``method`` on paired anchors (N, d_T) / (N, d_S); its parameter chosen by held-out anchors.

    ``general``: (N,) bool, the anchors of general sets (a word list) — the ``anchored`` method's prior.
    ``auto`` is ``anchored`` when there are general anchors (it measured best: ``m2kt bench real``), else
    the method of the four others with the best leave-one-out score."""
    x, y = teacher_anchors.double().cpu(), student_anchors.double().cpu()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} teacher anchors but {y.shape[0]} student anchors")
    if x.shape[0] < 3:
        raise ValueError(f"an alignment needs at least 3 anchors, not {x.shape[0]}")
    if method not in (*METHODS, "auto"):
        raise ValueError(f"unknown alignment method {method!r}; known: auto, {', '.join(METHODS)}")
    g = torch.zeros(x.shape[0], dtype=torch.bool) if general is None else general.bool().cpu()
    if len(g) != x.shape[0]:
        raise ValueError(f"general marks {len(g)} anchors, not {x.shape[0]}")
    if method == "anchored" and int(g.sum()) < 3:
        raise ValueError("the anchored method needs at least 3 general anchors (a word list) for its prior")
    n = x.shape[0]
    candidates: dict[str, tuple[float, float | None, Callable[[Tensor], Tensor]]] = {}
    if method == "auto":
        wanted: tuple[str, ...] = ("anchored",) if int(g.sum()) >= 3 else METHODS[1:]
    else:
        wanted = (method,)
    if "anchored" in wanted:
        candidates["anchored"] = _anchored(x, y, g, folds)
    if "ridge" in wanted:
        candidates["ridge"] = _ridge(x, y)
    for name, per_dim in (("procrustes", False), ("translation", True)):
        if name in wanted:
            score = _loo_score(lambda a, b, p=per_dim: _procrustes_fit(a, b, p), x, y, folds)
            rank = max(1, min(n - 1, x.shape[1], y.shape[1]))
            candidates[name] = (score, float(rank), _procrustes_fit(x, y, per_dim))
    if "relative" in wanted:
        candidates["relative"] = _relative(x, y, [0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    chosen = max(candidates, key=lambda k: candidates[k][0])
    score, param, apply = candidates[chosen]
    return Alignment(
        method=chosen,
        param=param,
        score=score,
        anchors=n,
        _apply=lambda t: apply(t.double()).float(),
        scores={k: v[0] for k, v in candidates.items()} if len(candidates) > 1 else {},
        general=int(g.sum()),
    )
