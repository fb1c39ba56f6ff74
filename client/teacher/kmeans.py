"""k-means with k-means++ initialisation, on whatever device the points are on, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KMeansResult", "kmeans"]


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d)
    assignment: torch.Tensor  # (N,) long, index of each point's centroid
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int


def _plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device).item())
    centres = [points[first]]
    closest = torch.cdist(points, points[first : first + 1]).squeeze(1).pow(2)  # (N,)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point already sits on a centre: pick any unused point
            probs = torch.ones_like(closest)
        else:
            probs = closest / total
        index = int(torch.multinomial(probs, 1, generator=generator).item())
        centres.append(points[index])
        closest = torch.minimum(closest, torch.cdist(points, points[index : index + 1]).squeeze(1).pow(2))
    return torch.stack(centres)


def kmeans(
    points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100, restarts: int = 4, tolerance: float = 1e-6
) -> KMeansResult:
    """Lloyd's algorithm from ``restarts`` k-means++ seedings; the lowest inertia wins.

    Deterministic for a seed on a device. Empty clusters are re-seeded with the point
    farthest from its centroid.
    """
    if points.dim() != 2 or points.shape[0] < k or k < 1:
        raise ValueError(f"k-means needs k in [1, N]; got k={k} for points of shape {tuple(points.shape)}")
    points = points.float()
    generator = torch.Generator(device=points.device)
    generator.manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(restarts):
        centroids = _plus_plus(points, k, generator)
        assignment = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        previous = float("inf")
        used = 0
        for step in range(1, iterations + 1):
            used = step
            distances = torch.cdist(points, centroids).pow(2)  # (N, k)
            nearest, assignment = distances.min(dim=1)
            inertia = float(nearest.sum())
            sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
            counts = torch.bincount(assignment, minlength=k).to(points.dtype)
            for empty in torch.nonzero(counts == 0).flatten().tolist():
                far = int(nearest.argmax())
                sums[empty], counts[empty] = points[far], 1.0
                nearest[far] = 0.0
            centroids = sums / counts.unsqueeze(1)
            if previous - inertia <= tolerance * max(previous, 1e-12):
                break
            previous = inertia
        distances = torch.cdist(points, centroids).pow(2)
        nearest, assignment = distances.min(dim=1)
        result = KMeansResult(centroids, assignment, float(nearest.sum()), used)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return best
