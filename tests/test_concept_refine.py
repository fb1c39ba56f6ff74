"""Refining mapped concepts on the student's own unlabelled vectors (``m2kt.student.concepts.refined``)."""

from __future__ import annotations

import pytest
import torch

from m2kt.student.concepts import ConceptMap, nearest, refined


def _clusters(seed: int, k: int = 4, d: int = 32, per: int = 60) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k well-separated unit centres, and ``per`` noisy points around each: (centres, points, labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1)
    labels = torch.arange(k).repeat_interleave(per)
    points = centres[labels] + 0.35 * torch.randn(len(labels), d, generator=g) / d**0.5 * 4
    return centres, points, labels


def test_refining_moves_misplaced_concepts_toward_their_texts() -> None:
    centres, points, labels = _clusters(0)
    g = torch.Generator().manual_seed(1)
    # a mapped concept: the true direction, pulled 50° off by a poor alignment, at some other scale
    off = torch.nn.functional.normalize(torch.randn(centres.shape, generator=g), dim=-1)
    mapped = 3.0 * torch.nn.functional.normalize(centres + 1.2 * off, dim=-1)
    pool, test = points[::2], points[1::2]  # refine on one half, judge on the other
    before = float((nearest(test, mapped) == labels[1::2]).float().mean())
    moved, members = refined(mapped, pool)
    after = float((nearest(test, moved) == labels[1::2]).float().mean())
    cos = torch.nn.functional.cosine_similarity
    assert (cos(moved, centres) > cos(mapped, centres)).all()
    assert after > before
    assert int(members.sum()) == len(pool)
    assert torch.allclose(moved.norm(dim=-1), mapped.norm(dim=-1))  # the student's scale is kept


def test_a_concept_no_text_joins_stays_where_it_was() -> None:
    centres, points, labels = _clusters(2, k=3)
    far = -centres[:1] * 5  # no point is nearest to it
    concepts = torch.cat([centres, far])
    moved, members = refined(concepts, points)
    assert int(members[3]) == 0 and torch.equal(moved[3], concepts[3])
    assert not torch.equal(moved[:3], concepts[:3])


def test_a_concept_map_refines_into_a_new_map_with_the_same_labels() -> None:
    centres, points, _ = _clusters(3, k=2)
    concepts = ConceptMap(["a", "b"], centres.clone(), "layer.5", "mean")
    out, members = concepts.refined(points)
    assert out.labels == ["a", "b"] and (out.layer, out.pooling) == ("layer.5", "mean")
    assert sum(members) == len(points) and torch.equal(concepts.vectors, centres)  # the original is untouched


@pytest.mark.parametrize("shape", [(0, 32)])
def test_no_unlabelled_text_changes_nothing(shape: tuple[int, int]) -> None:
    centres, _, _ = _clusters(4, k=2)
    moved, members = refined(centres, torch.zeros(shape))
    assert torch.equal(moved, centres) and int(members.sum()) == 0
