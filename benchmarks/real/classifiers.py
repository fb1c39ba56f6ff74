"""The baselines' classifiers on a model's own vectors: nearest centroid and multinomial logistic regression.

Logistic regression is fitted with L-BFGS on unit-normalised vectors; its inverse regularisation C is
chosen by 5-fold cross-validation on the examples it is given (the baseline gets its best setting).
"""

from __future__ import annotations

import torch
from torch import Tensor

from m2kt.student.concepts import nearest

__all__ = ["centroids", "fit_logistic", "predict_logistic"]

C_GRID = (0.1, 1.0, 10.0, 100.0)


def centroids(vectors: Tensor, labels: Tensor, k: int) -> Tensor:
    """(k, d) mean vector of each class (zero for a class with no example)."""
    out = torch.zeros(k, vectors.shape[1])
    out.index_add_(0, labels, vectors.float())
    counts = torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1)
    return out / counts


def _train(x: Tensor, y: Tensor, k: int, c: float) -> Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    w = torch.zeros(x.shape[1] + 1, k, dtype=torch.double, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.double)], 1)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y) + (w[:-1] ** 2).sum() / (2 * c * len(x))
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict_logistic(weights: Tensor, x: Tensor) -> Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    return (torch.cat([x, torch.ones(len(x), 1, dtype=torch.double)], 1) @ weights).argmax(-1)


def fit_logistic(x: Tensor, y: Tensor, k: int, *, seed: int = 0) -> tuple[Tensor, float]:
    """(weights, the chosen C)."""
    n = len(x)
    folds = 5 if n >= 10 else 0
    best = (-1.0, C_GRID[1])
    if folds:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for c in C_GRID:
            right = 0
            for f in range(folds):
                held = order[f::folds]
                keep = torch.ones(n, dtype=torch.bool)
                keep[held] = False
                w = _train(x[keep], y[keep], k, c)
                right += int((predict_logistic(w, x[held]) == y[held]).sum())
            if right / n > best[0]:
                best = (right / n, c)
    return _train(x, y, k, best[1]), best[1]


def nearest_centroid(vectors: Tensor, classes: Tensor) -> Tensor:
    return nearest(vectors, classes)
