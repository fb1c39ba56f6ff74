"""The student's composite loss (m2kt.student.losses): each term on hand-checkable inputs, then the composite."""

from __future__ import annotations

import json
import math

import pytest
import torch

from m2kt.student.losses import (
    CompositeLoss,
    LossTerms,
    LossWeights,
    align_depth,
    flagged_hits,
    geo_loss,
    pool_attention_to,
    reason_loss,
    relational_geo_loss,
    safety_loss,
    struct_loss,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # (d, d)


def _softmax_rows(n: int, t: int, g: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(n, t, t, generator=g), dim=-1)  # (N, T, T)


# ------------------------------------------------------------------------------------------------ geo


def test_geo_loss_zero_for_identical_sets() -> None:
    x = torch.randn(5, 7, generator=_gen())
    assert geo_loss(x, x.clone()).item() == 0.0


def test_geo_loss_hand_example_and_weights() -> None:
    mapped = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # squared distances: 4 and 25
    assert geo_loss(mapped, target).item() == pytest.approx(14.5)
    assert geo_loss(mapped, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(4.0)
    assert geo_loss(mapped, target, torch.tensor([3.0, 1.0])).item() == pytest.approx((3 * 4 + 25) / 4)
    # weights are normalised: scaling them changes nothing
    assert geo_loss(mapped, target, torch.tensor([30.0, 10.0])).item() == pytest.approx((3 * 4 + 25) / 4)
    with pytest.raises(ValueError, match=">= 0"):
        geo_loss(mapped, target, torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="same shape"):
        geo_loss(mapped, target[:, :1])


def test_geo_loss_gradient() -> None:
    mapped = torch.zeros(2, 3, requires_grad=True)
    geo_loss(mapped, torch.ones(2, 3)).backward()
    assert mapped.grad is not None
    assert torch.allclose(mapped.grad, torch.full((2, 3), -1.0))  # d/dx mean_k ||x_k - 1||² = 2(x - 1)/K


# ------------------------------------------------------------------------------------------------ relational geo


def test_relational_geo_invariant_to_rotation_and_scale() -> None:
    g = _gen(1)
    x = torch.randn(32, 8, generator=g)
    r = _orthogonal(8, g)
    for s in (0.01, 1.0, 37.5):
        y = s * x @ r + torch.randn(1, 8, generator=g)  # translation is removed by centring, too
        assert relational_geo_loss(x, y).item() == pytest.approx(0.0, abs=1e-5)
        assert relational_geo_loss(y, x).item() == pytest.approx(0.0, abs=1e-5)


def test_relational_geo_positive_for_unrelated_sets() -> None:
    g = _gen(2)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    value = relational_geo_loss(x, y).item()
    assert 0.2 < value <= 1.0
    # differentiable, and a step against the gradient reduces the loss
    m = x.clone().requires_grad_(True)
    loss = relational_geo_loss(m, y)
    loss.backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()
    with torch.no_grad():
        stepped = relational_geo_loss(m - 10.0 * m.grad, y).item()
    assert stepped < value


# ------------------------------------------------------------------------------------------------ struct


def test_struct_loss_identical_disjoint_and_padding() -> None:
    g = _gen(3)
    a = _softmax_rows(3, 5, g)
    assert struct_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)

    eye = torch.eye(4).expand(2, 4, 4)  # (N, T, T) one-hot rows
    shifted = torch.roll(eye, shifts=1, dims=-1)
    assert struct_loss(eye, shifted).item() == pytest.approx(2.0)

    # the last two query rows of each sequence are padding: garbage there must not count
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    student = eye.clone()
    student[:, 2:] = shifted[:, 2:]
    assert struct_loss(eye, student, mask).item() == pytest.approx(0.0)
    assert struct_loss(eye, student).item() == pytest.approx(1.0)  # without the mask: half the rows differ
    # one differing real row out of three real rows → 2/3
    mask2 = torch.tensor([[True, True, True, False], [False, False, False, False]])
    assert struct_loss(eye, student, mask2).item() == pytest.approx(2.0 / 3.0)
    assert struct_loss(eye, student, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_pool_attention_to_and_shape_errors() -> None:
    g = _gen(4)
    attn = torch.softmax(torch.randn(2, 3, 4, 5, 5, generator=g), dim=-1)  # (N, L, H, T, T)
    pooled = pool_attention_to(attn)
    assert pooled.shape == (2, 5, 5)
    assert torch.allclose(pooled, attn.mean(dim=(1, 2)))
    assert torch.allclose(pooled.sum(-1), torch.ones(2, 5))
    assert torch.allclose(pool_attention_to(attn, layers=1), attn[:, -1].mean(1))
    with pytest.raises(ValueError, match="layers"):
        pool_attention_to(attn, layers=4)
    with pytest.raises(ValueError, match="must match"):
        struct_loss(pooled, pooled[:, :4, :4])


# ------------------------------------------------------------------------------------------------ align_depth


def test_align_depth() -> None:
    g = _gen(5)
    s = torch.randn(3, 4, 6, generator=g)  # (P, m_a, d)
    assert align_depth(s, 4) is s
    for m_b in (2, 3, 7, 10):
        out = align_depth(s, m_b)
        assert out.shape == (3, m_b, 6)
        assert torch.equal(out[:, 0], s[:, 0]) and torch.equal(out[:, -1], s[:, -1])
    two = torch.tensor([[[0.0, 2.0], [4.0, 6.0]]])  # (1, 2, 2)
    mid = align_depth(two, 3)
    assert torch.allclose(mid[0, 1], torch.tensor([2.0, 4.0]))
    # 4 → 7 steps: target step 1 sits at source depth 0.5
    assert torch.allclose(align_depth(s, 7)[:, 1], (s[:, 0] + s[:, 1]) / 2)
    # downsampling 4 → 3: the middle step sits at source depth 1.5
    assert torch.allclose(align_depth(s, 3)[:, 1], (s[:, 1] + s[:, 2]) / 2)


# ------------------------------------------------------------------------------------------------ reason


def test_reason_loss_zero_when_equal_positive_when_permuted_and_gradient() -> None:
    g = _gen(6)
    traces = torch.randn(4, 3, 8, generator=g)  # (P, m, d)
    concepts = torch.randn(5, 8, generator=g)  # (K, d)
    assert reason_loss(traces, concepts, traces.clone(), concepts.clone()).item() == pytest.approx(0.0, abs=1e-6)

    student_concepts = concepts[torch.tensor([1, 2, 3, 4, 0])].clone().requires_grad_(True)
    student_traces = traces.clone().requires_grad_(True)
    loss = reason_loss(traces, concepts, student_traces, student_concepts, temperature=0.1)
    assert loss.item() > 0.01
    loss.backward()
    assert student_concepts.grad is not None and student_concepts.grad.abs().sum() > 0
    assert student_traces.grad is not None and student_traces.grad.abs().sum() > 0


def test_reason_loss_across_widths_and_depth_mismatch() -> None:
    g = _gen(7)
    t_traces, t_concepts = torch.randn(2, 4, 8, generator=g), torch.randn(3, 8, generator=g)
    r = _orthogonal(8, g)
    proj = torch.cat([r, torch.zeros(8, 4)], dim=1)  # (8, 12): isometric embedding into a wider space
    # a student whose space is an isometric embedding of the teacher's sees the same distributions
    value = reason_loss(t_traces, t_concepts, t_traces @ proj, t_concepts @ proj).item()
    assert value == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="align_depth"):
        reason_loss(t_traces, t_concepts, torch.randn(2, 5, 12), t_concepts @ proj)
    aligned = align_depth(torch.randn(2, 5, 12, generator=g), 4)
    assert reason_loss(t_traces, t_concepts, aligned, t_concepts @ proj).item() >= 0.0


# ------------------------------------------------------------------------------------------------ safety


def test_safety_loss_and_flagged_hits() -> None:
    flagged = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (F, d)
    below = torch.tensor([[0.0, 0.0, 1.0], [1.0, -1.0, 2.0]])  # cosines <= 0.41 < 0.5
    assert safety_loss(below, flagged, margin=0.5).item() == 0.0

    mapped = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    c = 1 / math.sqrt(2)
    expected = ((1.0 - 0.5) ** 2 + 2 * (c - 0.5) ** 2) / 3
    loss = safety_loss(mapped, flagged, margin=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    near = torch.tensor([[1.0, 0.3, 0.2]], requires_grad=True)  # cos 0.94 to flagged 0: penalised
    safety_loss(near, flagged, margin=0.5).backward()
    assert near.grad is not None and near.grad.abs().sum() > 0
    with torch.no_grad():
        assert safety_loss(near - near.grad, flagged, 0.5) < safety_loss(near, flagged, 0.5)

    assert safety_loss(mapped, torch.zeros(0, 3), margin=0.5).item() == 0.0

    hits = flagged_hits(mapped, flagged, threshold=0.5)
    assert [(k, f) for k, f, _ in hits] == [(0, 0), (1, 0), (1, 1)]
    assert hits[0][2] == pytest.approx(1.0) and hits[1][2] == pytest.approx(c)
    assert flagged_hits(mapped, flagged, threshold=0.9) == [(0, 0, pytest.approx(1.0))]
    assert flagged_hits(mapped, torch.zeros(0, 3), threshold=0.0) == []


# ------------------------------------------------------------------------------------------------ composite


def _all_inputs(requires_grad: bool = True) -> dict[str, torch.Tensor]:
    g = _gen(8)
    k, d_t, d_s, n, t, p, m = 4, 6, 5, 2, 4, 3, 3
    mapped = torch.randn(k, d_s, generator=g).requires_grad_(requires_grad)
    flagged = mapped.detach()[:1] + 0.1 * torch.randn(1, d_s, generator=g)  # close to concept 0
    return dict(
        mapped=mapped,
        target=torch.randn(k, d_s, generator=g),
        teacher_attention=torch.softmax(torch.randn(n, 2, 2, t, t, generator=g), dim=-1),  # (N, L, H, T, T)
        student_attention=torch.softmax(torch.randn(n, 1, 3, t, t, generator=g), dim=-1),
        attention_mask=torch.tensor([[True, True, True, False], [True, True, False, False]]),
        teacher_traces=torch.randn(p, m + 2, d_t, generator=g),  # resampled to the student's depth
        teacher_concepts=torch.randn(k, d_t, generator=g),
        student_traces=torch.randn(p, m, d_s, generator=g),
        student_concepts=mapped,
        flagged=flagged,
    )


def test_composite_each_weight_off_changes_total_and_logs_zero() -> None:
    inputs = _all_inputs()
    base = LossWeights(geo=1.0, struct=0.5, reason=0.5, safety=2.0, safety_margin=0.3)
    total, terms = CompositeLoss(base)(**inputs)
    assert isinstance(terms, LossTerms)
    for name in ("geo", "struct", "reason", "safety"):
        assert getattr(terms, name) > 0, name
    expected = 1.0 * terms.geo + 0.5 * terms.struct + 0.5 * terms.reason + 2.0 * terms.safety
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert terms.total == pytest.approx(total.item())
    assert set(terms.as_dict()) == {"geo", "struct", "reason", "safety", "total"}
    total.backward()
    assert inputs["mapped"].grad is not None and inputs["mapped"].grad.abs().sum() > 0

    for name in ("geo", "struct", "reason", "safety"):
        off = LossWeights.from_json({**base.to_json(), name: 0.0})
        t_off, terms_off = CompositeLoss(off)(**_all_inputs())
        assert getattr(terms_off, name) == 0.0
        assert t_off.item() != pytest.approx(total.item())
        removed = getattr(base, name) * getattr(terms, name)
        assert t_off.item() == pytest.approx(total.item() - removed, rel=1e-5, abs=1e-6)


def test_composite_missing_inputs_and_relational_variant() -> None:
    inputs = _all_inputs()
    total, terms = CompositeLoss(LossWeights())(mapped=inputs["mapped"], target=inputs["target"])
    assert terms.struct == terms.reason == terms.safety == 0.0
    assert total.item() == pytest.approx(terms.geo)
    rel_total, rel_terms = CompositeLoss(LossWeights(geo_variant="relational", struct=0, reason=0, safety=0))(
        mapped=inputs["mapped"], target=inputs["target"]
    )
    assert rel_terms.geo == pytest.approx(relational_geo_loss(inputs["mapped"], inputs["target"]).item())
    all_off, _ = CompositeLoss(LossWeights(geo=0, struct=0, reason=0, safety=0))(**inputs)
    assert all_off.item() == 0.0
    all_off.backward()  # still part of the graph


def test_loss_weights_json_round_trip_and_validation() -> None:
    w = LossWeights(geo=2.0, geo_variant="relational", struct=0.0, reason=0.3, safety=1.5, safety_margin=0.25)
    assert LossWeights.from_json(json.loads(json.dumps(w.to_json()))) == w
    assert LossWeights.from_json({}) == LossWeights()
    with pytest.raises(ValueError, match="bogus"):
        LossWeights.from_json({"geo": 1.0, "bogus": 1})
    with pytest.raises(ValueError, match="struct"):
        LossWeights(struct=-0.1)
    with pytest.raises(ValueError, match="struct"):
        LossWeights.from_json({"struct": -1})
    with pytest.raises(ValueError, match="geo_variant"):
        LossWeights(geo_variant="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reason_temperature"):
        LossWeights(reason_temperature=0.0)


def test_losses_are_float32_under_cpu_autocast() -> None:
    inputs = _all_inputs(requires_grad=False)
    ref_total, ref_terms = CompositeLoss(LossWeights())(**inputs)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = CompositeLoss(LossWeights())(**half)
    assert total.dtype == torch.float32
    assert terms.geo == pytest.approx(ref_terms.geo, rel=0.05)
    assert total.item() == pytest.approx(ref_total.item(), rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_follow_cuda_device_under_autocast() -> None:
    inputs = {k: v.detach().cuda() for k, v in _all_inputs(requires_grad=False).items()}
    ref_total, _ = CompositeLoss(LossWeights())(**{k: v.cpu() for k, v in inputs.items()})
    with torch.autocast("cuda", dtype=torch.float16):
        total, _ = CompositeLoss(LossWeights())(**inputs)
    assert total.device.type == "cuda" and total.dtype == torch.float32
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-4)
