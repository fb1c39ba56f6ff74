"""Training a :class:`~m2kt.toy.model.TinyTransformer` on a symbolic task, and measuring it.

Full-batch AdamW from a seed: the same seed on the same CPU gives bit-identical weights. Batches are
right-padded token ids with a mask; the answer is read at each row's last real token.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m2kt.toy.model import TinyConfig, TinyTransformer, positive_int
from m2kt.toy.symbolic import Example, ModularTask, Vocabulary

__all__ = ["TrainConfig", "accuracy", "answer_logits", "encode_batch", "encode_examples", "train_tiny"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- batches & metrics


def encode_batch(
    vocab: Vocabulary, sequences: Sequence[Sequence[str]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode token sequences, right-padded with PAD: ``(ids (B, T) long, mask (B, T) bool)``."""
    if not sequences:
        raise ValueError("encode_batch needs at least one sequence")
    encoded = [vocab.encode(seq) for seq in sequences]
    if any(not ids for ids in encoded):
        raise ValueError("encode_batch: empty sequence")
    T = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), T), vocab.pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(encoded), T), dtype=torch.bool)  # (B, T)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids.to(device), mask.to(device)


def encode_examples(
    vocab: Vocabulary, examples: Sequence[Example], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids (N, T), mask (N, T), answer ids (N,))`` for a list of examples."""
    ids, mask = encode_batch(vocab, [ex.tokens for ex in examples], device)
    answers = torch.tensor([vocab.id(ex.answer) for ex in examples], dtype=torch.long, device=ids.device)  # (N,)
    return ids, mask, answers


def answer_logits(
    model: TinyTransformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits at the last real token of each row, ``(B, V)``."""
    logits = model(input_ids, attention_mask)  # (B, T, V)
    B = input_ids.shape[0]
    if attention_mask is None:
        return logits[:, -1]
    last = attention_mask.to(device=logits.device, dtype=torch.long).sum(dim=1) - 1  # (B,)
    if bool((last < 0).any()):
        raise ValueError("answer_logits: a row has no real tokens")
    return logits[torch.arange(B, device=logits.device), last]  # (B, V)


@torch.no_grad()
def _accuracy_tensors(
    model: TinyTransformer, ids: torch.Tensor, mask: torch.Tensor, answers: torch.Tensor, batch_size: int
) -> float:
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, ids.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            pred = answer_logits(model, ids[sl], mask[sl]).argmax(dim=-1)  # (b,)
            correct += int((pred == answers[sl]).sum())
        return correct / ids.shape[0]
    finally:
        model.train(was_training)


def accuracy(
    model: TinyTransformer,
    task_examples: Sequence[Example],
    vocab: Vocabulary,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> float:
    """Fraction of examples whose argmax at the last real token is the answer (eval mode, no grad)."""
    if not task_examples:
        raise ValueError("accuracy needs at least one example")
    positive_int("batch_size", batch_size)
    ids, mask, answers = encode_examples(vocab, task_examples, device)
    return _accuracy_tensors(model, ids, mask, answers, batch_size)


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Optimisation settings for :func:`train_tiny`.

    The defaults (full-batch AdamW, lr 5e-3 held after a short warm-up and cosine-decayed to 0 over
    the last ``decay_fraction`` of the steps, weight decay 1.0 on every matrix, dropout 0.1 while
    training, and the model's small init) take ``ModularTask(p=23)`` add+sub to >= 99% held-out
    accuracy within a few hundred steps; the final decay settles the last few examples.
    ``batch_size >= len(train)`` means full batch (it generalises much faster here than minibatches).

    ``dropout`` overrides the model's dropout during training only (the model and its config
    keep their own value; None: use the model's). ``target_test_accuracy`` (off by default)
    stops early, once train accuracy is 100% and held-out accuracy is at least the target,
    checked every ``eval_every`` steps. It looks at the held-out split, but only to decide when to
    stop, never for gradients; leave it off where the test split must stay unseen.
    """

    steps: int = 600
    lr: float = 5e-3
    weight_decay: float = 1.0
    batch_size: int = 1024
    seed: int = 0
    device: str = "cpu"
    test_fraction: float = 0.2
    log_every: int = 0  # log (logging.INFO) train/test accuracy every N steps (0: silent)
    warmup_steps: int = 10
    decay_fraction: float = 0.3  # cosine-decay the lr over this final fraction of the steps
    min_lr_ratio: float = 0.0  # ... down to lr * min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 0.0  # max gradient norm (0: no clipping)
    dropout: float | None = 0.1
    target_test_accuracy: float | None = None
    eval_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            positive_int(name, getattr(self, name))
        for name in ("log_every", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        for name in ("decay_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) or None, got {self.dropout!r}")
        if self.target_test_accuracy is not None and not 0.0 < self.target_test_accuracy <= 1.0:
            raise ValueError(f"target_test_accuracy must be in (0, 1], got {self.target_test_accuracy!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        torch.device(self.device)  # raises on a malformed device string

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based ``step``: linear warm-up, constant, then cosine decay at the end."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_start = self.steps * (1.0 - self.decay_fraction)
        if step < decay_start:
            return self.lr
        progress = min(1.0, (step + 1 - decay_start) / (self.steps - decay_start + 1))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def train_tiny(
    task: ModularTask,
    model_config: TinyConfig,
    train_config: TrainConfig | None = None,
    *,
    examples: Sequence[Example] | None = None,
) -> tuple[TinyTransformer, dict[str, Any]]:
    """Train a fresh :class:`TinyTransformer` on ``task`` (or on ``examples``) from a seed.

    The examples are split with ``task.split(test_fraction, seed)``; the loss is cross-entropy on
    the answer at the last real position, optimised with AdamW. Seeds ``torch`` (initial weights
    and dropout) and samples minibatches with its own ``torch.Generator``, so the same seed on the
    same CPU gives bit-identical weights. Returns the model in eval mode and metrics
    ``{"train_accuracy", "test_accuracy", "steps", "seconds", "device", ...}``; ``test_accuracy`` is
    None when nothing is held out.
    """
    cfg = train_config or TrainConfig()
    vocab = Vocabulary(model_config.vocab)
    device = torch.device(cfg.device)
    pool = list(task.examples() if examples is None else examples)
    train, test = task.split(pool, test_fraction=cfg.test_fraction, seed=cfg.seed)
    if not train:
        raise ValueError("no training examples")

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = TinyTransformer(model_config).to(device)
    tr_ids, tr_mask, tr_ans = encode_examples(vocab, train, device)  # (N, T), (N, T), (N,)
    te = encode_examples(vocab, test, device) if test else None
    last = tr_mask.long().sum(dim=1) - 1  # (N,) position of the last real token
    if cfg.dropout is not None:
        _set_dropout(model, cfg.dropout)
    model.train()

    # Weight decay on every matrix, embeddings included; none on biases and LayerNorm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    n = tr_ids.shape[0]
    rows = torch.arange(min(n, cfg.batch_size), device=device)  # (b,)
    stopped_early = False
    step = 0
    loss = torch.tensor(float("nan"))
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step - 1)
        if cfg.batch_size >= n:
            ids, mask, ans, pos = tr_ids, tr_mask, tr_ans, last
        else:
            idx = torch.randperm(n, generator=generator)[: cfg.batch_size].to(device)  # (b,)
            ids, mask, ans, pos = tr_ids[idx], tr_mask[idx], tr_ans[idx], last[idx]
        logits = model(ids, mask)[rows, pos]  # (b, V) at the last real token
        loss = F.cross_entropy(logits, ans)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        show = bool(cfg.log_every) and step % cfg.log_every == 0
        checking = cfg.target_test_accuracy is not None and te is not None and step % cfg.eval_every == 0
        if show or checking:
            train_acc = _accuracy_tensors(model, tr_ids, tr_mask, tr_ans, 4096)
            test_acc = _accuracy_tensors(model, *te, 4096) if te is not None else None
            if show:
                shown = "-" if test_acc is None else f"{test_acc:.4f}"
                log.info("step %d loss %.4f train %.4f test %s", step, float(loss.detach()), train_acc, shown)
            if checking and train_acc == 1.0 and test_acc is not None and test_acc >= cfg.target_test_accuracy:
                stopped_early = True
                break

    model.eval()
    if cfg.dropout is not None:
        _set_dropout(model, model_config.dropout)
    train_acc = _accuracy_tensors(model, tr_ids, tr_mask, tr_ans, 4096)
    test_acc = _accuracy_tensors(model, *te, 4096) if te is not None else None
    metrics: dict[str, Any] = {
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "steps": step,
        "seconds": time.perf_counter() - started,
        "device": str(device),
        "final_loss": float(loss.detach()),
        "stopped_early": stopped_early,
        "n_train": len(train),
        "n_test": len(test),
        "seed": cfg.seed,
    }
    return model, metrics
