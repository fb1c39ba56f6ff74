"""The closed-form alignments between two spaces, on synthetic anchors whose true map is known."""

from __future__ import annotations

import math

import pytest
import torch

from m2kt.student.alignment import _ridge, _standardise, fit_alignment

D_T, D_S = 48, 32


def _spaces(
    n: int, *, noise: float = 0.0, seed: int = 0, d_s: int = D_S
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher, student, the true map): student = teacher @ W * 3 + 5, W a random semi-orthogonal map."""
    w = torch.linalg.qr(torch.randn(D_T, d_s, generator=torch.Generator().manual_seed(123), dtype=torch.double))[0]
    g = torch.Generator().manual_seed(seed)  # the map above is the same for every seed; the points are not
    x = torch.randn(n, D_T, generator=g, dtype=torch.double) + 1.0
    y = x @ w * 3.0 + 5.0 + noise * torch.randn(n, d_s, generator=g, dtype=torch.double)
    return x.float(), y.float(), w


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a - b.mean(0), b - b.mean(0), dim=-1).mean())


@pytest.mark.parametrize("method", ["ridge", "procrustes", "translation"])
def test_an_exact_linear_map_is_recovered_from_enough_anchors(method: str) -> None:
    """Ridge recovers any linear map; Procrustes (a rotation and a scale) is exact when the spaces have
    one width — between widths its semi-orthogonal map is only an approximation (the next test)."""
    d_s = D_S if method == "ridge" else D_T
    x, y, _ = _spaces(200, d_s=d_s)
    fresh_x, fresh_y, _ = _spaces(50, seed=1, d_s=d_s)
    alignment = fit_alignment(x[:100], y[:100], method)
    assert alignment.method == method and alignment.anchors == 100
    assert _cos(alignment.map(fresh_x), fresh_y) > 0.99


def test_procrustes_between_widths_is_close() -> None:
    x, y, _ = _spaces(200)
    fresh_x, fresh_y, _ = _spaces(50, seed=1)
    assert _cos(fit_alignment(x, y, "procrustes").map(fresh_x), fresh_y) > 0.85


def test_ridge_leave_one_out_equals_refitting_without_each_anchor() -> None:
    x, y, _ = _spaces(14, noise=2.0)
    x, y = x.double(), y.double()
    score, lam, _ = _ridge(x, y)
    # refit by hand without each anchor, with the λ the closed form chose (relative to each fit's scale)
    base = float(_standardise(x)[0].pow(2).sum()) / len(x)
    rel = lam / base
    held = []
    for i in range(len(x)):
        keep = [j for j in range(len(x)) if j != i]
        xs, mx, sx = _standardise(x[keep])
        ys, my, sy = _standardise(y[keep])
        k = xs @ xs.T
        lam_i = rel * float(xs.pow(2).sum()) / len(keep)
        w = xs.T @ torch.linalg.solve(k + lam_i * torch.eye(len(keep), dtype=k.dtype), ys)
        pred = ((x[i : i + 1] - mx) / sx) @ w * sy + my
        centre = y[keep].mean(0, keepdim=True)
        held.append(float(torch.nn.functional.cosine_similarity(pred - centre, y[i : i + 1] - centre)))
    assert score == pytest.approx(sum(held) / len(held), abs=0.03)  # the scales differ by one anchor


def test_ridge_regularises_more_when_the_anchors_are_noisier() -> None:
    clean = fit_alignment(*_spaces(40)[:2], "ridge")
    noisy = fit_alignment(*_spaces(40, noise=8.0)[:2], "ridge")
    assert noisy.param > clean.param
    assert noisy.score < clean.score


def test_procrustes_with_fewer_anchors_than_dimensions_is_stable_under_tiny_noise() -> None:
    """N < d: the map is restricted to the subspace the anchors span, so 1e-6 noise moves nothing."""
    x, y, _ = _spaces(12)
    concepts = _spaces(5, seed=3)[0]
    base = fit_alignment(x, y, "procrustes").map(concepts)
    jitter = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)) * 1e-6
    moved = fit_alignment(x + jitter, y, "procrustes").map(concepts)
    assert float((moved - base).norm() / base.norm()) < 1e-4


def test_auto_takes_the_best_leave_one_out_score_and_records_every_score() -> None:
    x, y, _ = _spaces(30, noise=1.0)
    alignment = fit_alignment(x, y)
    assert set(alignment.scores) == {"ridge", "procrustes", "translation", "relative"}
    assert alignment.method == max(alignment.scores, key=alignment.scores.get)
    assert alignment.score == alignment.scores[alignment.method]


def test_anchored_uses_the_general_anchors_as_a_prior_and_the_domain_anchors_to_refine_it() -> None:
    """General anchors from elsewhere in the space (an offset cluster, like single words against
    sentences) fix the rotation; a handful of domain anchors — too few alone — place the domain. (One
    width on both sides, where a rotation can be exact.)"""
    x, y, w = _spaces(400, noise=0.5, d_s=D_T)
    words_x = x[:300] * 0.3 - 4.0  # another region of the teacher's space
    words_y = words_x.double() @ w * 3.0 + 5.0
    domain_x, domain_y = x[300:306], y[300:306]
    fresh_x, fresh_y = x[306:], y[306:]
    general = torch.tensor([True] * 300 + [False] * 6)
    anchors_x = torch.cat([words_x, domain_x])
    anchors_y = torch.cat([words_y.float(), domain_y])
    anchored = fit_alignment(anchors_x, anchors_y, general=general)
    assert anchored.method == "anchored" and anchored.general == 300
    alone = fit_alignment(domain_x, domain_y, "ridge")
    assert _cos(anchored.map(fresh_x), fresh_y) > 0.9 > _cos(alone.map(fresh_x), fresh_y) + 0.2
    prior_only = fit_alignment(words_x, words_y.float(), "anchored", general=torch.ones(300, dtype=torch.bool))
    assert prior_only.param is None and _cos(prior_only.map(fresh_x), fresh_y) > 0.9


def test_bad_arguments_are_clear_errors() -> None:
    x, y, _ = _spaces(10)
    with pytest.raises(ValueError, match="unknown alignment method 'magic'"):
        fit_alignment(x, y, "magic")
    with pytest.raises(ValueError, match="at least 3 anchors"):
        fit_alignment(x[:2], y[:2])
    with pytest.raises(ValueError, match="10 teacher anchors but 9 student anchors"):
        fit_alignment(x, y[:9])
    with pytest.raises(ValueError, match="needs at least 3 general anchors"):
        fit_alignment(x, y, "anchored")
    assert math.isfinite(fit_alignment(x, y, "relative").score)
