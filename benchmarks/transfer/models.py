"""Train the pair's models from scratch (TinyTransformer), and measure them on held-out examples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from m2kt.toy.model import TinyConfig, TinyTransformer
from m2kt.toy.symbolic import Example, ModularTask, Vocabulary
from m2kt.toy.train import TrainConfig, accuracy, train_tiny

__all__ = ["evaluate", "train_model"]


def train_model(
    task: ModularTask,
    shape: dict[str, int],
    examples: Sequence[Example],
    *,
    seed: int,
    steps: int,
    device: str,
    validation: float = 0.0,
    target: float | None = None,
) -> tuple[TinyTransformer, dict[str, Any]]:
    """A TinyTransformer of ``shape`` over the task's whole vocabulary, trained on ``examples`` only.

    ``validation`` > 0 holds that share of ``examples`` out (never the benchmark's test set); with ``target``,
    training stops once the held-out share is answered at least that well (``metrics["test_accuracy"]``
    is then the validation accuracy)."""
    config = TinyConfig.for_task(task, **shape)
    model, metrics = train_tiny(
        task,
        config,
        TrainConfig(
            seed=seed,
            steps=steps,
            device=device,
            test_fraction=validation,
            batch_size=4096,
            target_test_accuracy=target if validation > 0 else None,
        ),
        examples=list(examples),
    )
    return model.eval(), metrics


@torch.no_grad()
def evaluate(model: TinyTransformer, examples: Sequence[Example], device: str) -> float:
    """Held-out accuracy of a plain model (no injection)."""
    return accuracy(model, list(examples), Vocabulary(model.config.vocab), device=device)
