"""The Concept Alignment Layer: closed-form fits, every CAL kind, build errors, config JSON, save/load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m2kt.student.cal import (
    MLPCAL,
    AnchorRelativeCAL,
    CALConfig,
    ConceptAlignmentLayer,
    LinearCAL,
    LowRankCAL,
    build_cal,
    cal_state,
    load_cal_state,
    procrustes_fit,
    ridge_fit,
)

D_T, D_S, N = 12, 8, 32
KINDS = ("linear", "lowrank", "mlp", "anchor")


def _anchors(seed: int = 0, n: int = N, d_t: int = D_T, d_s: int = D_S) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, d_t, generator=g)  # (N, d_T)
    student = torch.randn(n, d_s, generator=g)  # (N, d_S)
    return teacher, student


def _build(kind: str, **overrides: object) -> ConceptAlignmentLayer:
    teacher, student = _anchors()
    config = CALConfig(kind=kind, rank=4, hidden=16, **overrides)  # type: ignore[arg-type]
    return build_cal(config, D_T, D_S, anchors_teacher=teacher, anchors_student=student)


# --------------------------------------------------------------------------- closed-form fits


def test_ridge_fit_recovers_linear_map() -> None:
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(D_S, D_T, generator=g)
    b_true = torch.randn(D_S, generator=g)
    x = torch.randn(64, D_T, generator=g)
    y = x @ w_true.T + b_true + 1e-5 * torch.randn(64, D_S, generator=g)
    w, b = ridge_fit(x, y, 1e-8)
    assert w.shape == (D_S, D_T) and b.shape == (D_S,)
    assert w.dtype == x.dtype and b.dtype == x.dtype
    assert torch.allclose(w, w_true, atol=1e-3)
    assert torch.allclose(b, b_true, atol=1e-3)
    w0, b0 = ridge_fit(x, y, 0.0)  # exact least squares
    assert torch.allclose(w0, w_true, atol=1e-3) and torch.allclose(b0, b_true, atol=1e-3)


@pytest.mark.parametrize("lam", [0.0, 1e-2])
def test_ridge_fit_underdetermined(lam: float) -> None:
    x, y = _anchors(seed=2, n=5)  # N < d_T
    w, b = ridge_fit(x, y, lam)
    assert w.shape == (D_S, D_T) and b.shape == (D_S,)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    if lam == 0.0:  # minimum-norm interpolation: the anchors are fitted exactly
        assert torch.allclose(x @ w.T + b, y, atol=1e-4)


def test_ridge_fit_rejects_bad_input() -> None:
    x, y = _anchors()
    with pytest.raises(ValueError, match="same number of rows"):
        ridge_fit(x, y[:-1], 0.1)
    with pytest.raises(ValueError, match="lam"):
        ridge_fit(x, y, -1.0)


def test_procrustes_recovers_scaled_rotation() -> None:
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    shift = torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    y = 2.5 * x @ q.T + shift
    w, b = procrustes_fit(x, y)
    assert torch.allclose(w, 2.5 * q, atol=1e-10)
    assert torch.allclose(b, shift, atol=1e-10)


@pytest.mark.parametrize(("d_t", "d_s"), [(12, 8), (8, 12)])
def test_procrustes_semi_orthogonal(d_t: int, d_s: int) -> None:
    x, y = _anchors(seed=4, d_t=d_t, d_s=d_s)
    w, b = procrustes_fit(x, y)
    assert w.shape == (d_s, d_t) and b.shape == (d_s,)
    gram = w @ w.T if d_s < d_t else w.T @ w  # (min, min)
    scale2 = gram.diagonal().mean()
    assert scale2 > 0
    assert torch.allclose(gram, scale2 * torch.eye(min(d_t, d_s)), atol=1e-5)


# --------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_maps_shapes_and_trains(kind: str) -> None:
    torch.manual_seed(0)
    cal = _build(kind)
    expected = {"linear": LinearCAL, "lowrank": LowRankCAL, "mlp": MLPCAL, "anchor": AnchorRelativeCAL}[kind]
    assert isinstance(cal, expected)
    assert (cal.d_teacher, cal.d_student) == (D_T, D_S)
    concepts = torch.randn(5, D_T)  # (K, d_T)
    out = cal(concepts)
    assert out.shape == (5, D_S) and torch.isfinite(out).all()
    batched = torch.randn(3, 4, D_T)  # (B, m, d_T)
    out_b = cal(batched)
    assert out_b.shape == (3, 4, D_S)
    assert torch.allclose(out_b[1, 2], cal(batched[1, 2:3])[0], atol=1e-6)
    with pytest.raises(ValueError, match=rf"\(\.\.\., {D_T}\)"):
        cal(torch.randn(5, D_T + 1))

    if kind == "mlp":  # the MLP's zero output layer blocks its first layer's gradient at init; move off zero
        with torch.no_grad():
            cal.mlp[2].weight.normal_(0, 0.1)
    cal.zero_grad()
    (cal(concepts) - torch.randn(5, D_S)).square().mean().backward()
    params = dict(cal.named_parameters())
    assert params
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
@pytest.mark.parametrize("init", ["ridge", "procrustes"])
def test_closed_form_init(kind: str, init: str) -> None:
    teacher, student = _anchors()
    cal = _build(kind, init=init)
    fit = ridge_fit if init == "ridge" else procrustes_fit
    w, b = fit(teacher, student, 1e-2) if init == "ridge" else fit(teacher, student)
    expected = teacher @ w.T + b  # (N, d_S)
    if kind == "lowrank" and init == "ridge":  # the best rank-4 approximation of the fitted map
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        expected = teacher @ (u[:, :4] * s[:4] @ vh[:4]).T + b
    if kind == "lowrank" and init == "procrustes":  # equal singular values: any 4 of them, W restricted to those
        assert isinstance(cal, LowRankCAL)
        w_lr = cal.up.weight @ cal.down.weight  # (d_S, d_T)
        vh = torch.linalg.svd(w_lr, full_matrices=False)[2][:4]  # (4, d_T)
        assert torch.allclose(w_lr, w @ vh.T @ vh, atol=1e-5)
        expected = teacher @ w_lr.T + b
    assert torch.allclose(cal(teacher), expected, atol=1e-4)


def test_init_none_is_seeded_and_needs_no_anchors() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        cal = build_cal(CALConfig(kind="lowrank", init="none", rank=4), D_T, D_S)
        outs.append(cal(torch.ones(2, D_T)))
    assert torch.equal(outs[0], outs[1])


def test_fresh_mlp_equals_linear_init() -> None:
    cal = _build("mlp")
    assert isinstance(cal, MLPCAL)
    x = torch.randn(6, D_T)
    assert torch.equal(cal(x), cal.linear(x))
    lin = _build("linear")
    assert torch.allclose(cal(x), lin(x), atol=1e-6)


def test_fresh_anchor_cal_renamed_concept() -> None:
    teacher, student = _anchors(seed=5, n=8, d_t=16)
    cal = build_cal(
        CALConfig(kind="anchor", temperature=0.01), 16, D_S, anchors_teacher=teacher, anchors_student=student
    )
    assert isinstance(cal, AnchorRelativeCAL)
    assert math.isclose(cal.temperature, 0.01, rel_tol=1e-5)
    g = torch.Generator().manual_seed(6)
    noisy = teacher + 0.01 * teacher.norm(dim=-1, keepdim=True) * torch.randn(teacher.shape, generator=g) / 4
    for query in (teacher, noisy):
        assert torch.allclose(cal(query), student, atol=1e-4)
    # the default temperature is softer: a blend, still closest to the right anchor
    soft = _build("anchor")
    t, s = _anchors()
    nearest = torch.cdist(soft(t), s).argmin(dim=-1)
    assert (nearest == torch.arange(N)).float().mean() > 0.9


# --------------------------------------------------------------------------- errors


def test_build_errors() -> None:
    teacher, student = _anchors()
    with pytest.raises(ValueError, match="kind='anchor' needs both anchor sets"):
        build_cal(CALConfig(kind="anchor"), D_T, D_S)
    with pytest.raises(ValueError, match="missing: anchors_student"):
        build_cal(CALConfig(kind="linear"), D_T, D_S, anchors_teacher=teacher)
    with pytest.raises(ValueError, match=rf"anchors_teacher must have shape \(N, {D_T + 1}\).*got \({N}, {D_T}\)"):
        build_cal(CALConfig(), D_T + 1, D_S, anchors_teacher=teacher, anchors_student=student)
    with pytest.raises(ValueError, match=rf"anchors_student must have shape \(N, {D_S}\).*got \({N}, {D_S + 2}\)"):
        build_cal(CALConfig(kind="mlp"), D_T, D_S, anchors_teacher=teacher, anchors_student=torch.randn(N, D_S + 2))
    with pytest.raises(ValueError, match=f"same N anchors, got N={N} and N={N - 3}"):
        build_cal(CALConfig(), D_T, D_S, anchors_teacher=teacher, anchors_student=student[:-3])
    with pytest.raises(ValueError, match="at least 2 shared anchor"):
        build_cal(CALConfig(kind="linear"), D_T, D_S, anchors_teacher=teacher[:1], anchors_student=student[:1])
    with pytest.raises(ValueError, match="at least 1 shared anchor"):
        build_cal(CALConfig(), D_T, D_S, anchors_teacher=teacher[:0], anchors_student=student[:0])
    with pytest.raises(ValueError, match="NaN"):
        build_cal(CALConfig(), D_T, D_S, anchors_teacher=teacher * math.nan, anchors_student=student)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "conv", "cal.kind"),
        ("init", "svd", "cal.init"),
        ("rank", 0, "cal.rank"),
        ("hidden", 1.5, "cal.hidden"),
        ("ridge", -1.0, "cal.ridge"),
        ("temperature", 0.0, "cal.temperature"),
        ("center", "yes", "cal.center"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CALConfig(**{field: value})  # type: ignore[arg-type]


def test_config_json_round_trip() -> None:
    config = CALConfig(kind="lowrank", rank=3, hidden=32, init="procrustes", ridge=0.5, temperature=0.2, center=False)
    data = config.to_json()
    assert CALConfig.from_json(data) == config
    assert CALConfig.from_json({}) == CALConfig()
    assert CALConfig.from_json({"ridge": 0}).ridge == 0.0
    with pytest.raises(ValueError, match="unknown field.*bogus.*temprature"):
        CALConfig.from_json({**data, "temprature": 1.0, "bogus": 1})
    with pytest.raises(ValueError, match="JSON object"):
        CALConfig.from_json([])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_bit_identical(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cal = _build(kind)
    with torch.no_grad():  # move every parameter off its init so loading really matters
        for p in cal.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "cal.safetensors"
    state = cal_state(cal)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    save_file(state, str(path))

    torch.manual_seed(1)
    fresh = _build(kind)
    x = torch.randn(7, D_T)
    assert not torch.equal(fresh(x), cal(x))
    load_cal_state(fresh, load_file(str(path)))
    assert torch.equal(fresh(x), cal(x))


def test_load_errors() -> None:
    cal = _build("linear")
    state = cal_state(cal)
    with pytest.raises(ValueError, match=r"linear\.weight: expected \(8, 12\), got \(8, 11\)"):
        load_cal_state(cal, {**state, "linear.weight": torch.zeros(D_S, D_T - 1)})
    with pytest.raises(ValueError, match=r"missing key\(s\) linear\.bias"):
        load_cal_state(cal, {"linear.weight": state["linear.weight"]})
    with pytest.raises(ValueError, match=r"unexpected key\(s\) extra"):
        load_cal_state(cal, {**state, "extra": torch.zeros(1)})
    anchor = _build("anchor")
    with pytest.raises(ValueError, match="anchors_teacher: expected"):  # N differs: a different anchor set
        load_cal_state(anchor, {**cal_state(anchor), "anchors_teacher": torch.zeros(N + 1, D_T)})
