"""A tiny decoder-only transformer for the symbolic tasks in :mod:`client.symbolic`.

Used as the teacher and, with other sizes or seeds, as the student. It trains from scratch on a
CPU in seconds: pre-LayerNorm blocks, causal self-attention, learned positional embeddings and an
untied output head. Module names are part of the interface, since extraction code attaches
forward hooks to them by name:

* ``embed``: token + position embeddings, i.e. the input to block 0, ``(B, T, d)``;
* ``blocks[i]``: the residual stream after block ``i``, ``(B, T, d)``;
* ``blocks[i].attn.probs``: an ``nn.Identity`` applied to the attention probabilities (after the
  causal/padding mask and softmax), ``(B, H, T, T)``;
* ``ln_f`` and ``head``: the final norm and the vocabulary projection.

Checkpoints are a directory holding ``model.safetensors`` and ``m2kt_tiny.json`` (the config);
nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from client.symbolic import PAD, Example, ModularTask, Vocabulary

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "TinyConfig",
    "TinyTransformer",
    "TrainConfig",
    "accuracy",
    "answer_logits",
    "encode_batch",
    "encode_examples",
    "load_tiny",
    "save_tiny",
    "train_tiny",
    "weights_sha256",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "m2kt_tiny.json"
INIT_STD = 0.02

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- config


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class TinyConfig:
    """Model shape. ``vocab`` lists the tokens (index = id), e.g. ``ModularTask.vocabulary()``."""

    vocab: list[str]
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_len: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.vocab, str) or not isinstance(self.vocab, Sequence):
            raise ValueError("vocab must be a list of tokens")
        self.vocab = list(self.vocab)
        if len(self.vocab) < 2 or any(not isinstance(t, str) or not t for t in self.vocab):
            raise ValueError("vocab must hold at least two non-empty string tokens")
        if self.vocab[0] != PAD:
            raise ValueError(f"vocab[0] must be {PAD!r}, got {self.vocab[0]!r}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab tokens must be unique")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            _positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def for_task(cls, task: ModularTask, **overrides: Any) -> TinyConfig:
        return cls(vocab=task.vocabulary(), **overrides)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TinyConfig:
        if not isinstance(d, Mapping):
            raise ValueError("a TinyConfig must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TinyConfig fields: {unknown}")
        if "vocab" not in d:
            raise ValueError("TinyConfig JSON lacks 'vocab'")
        return cls(**dict(d))


# ---------------------------------------------------------------------------------------------- model


class Embedding(nn.Module):
    """Token + learned position embeddings; its output is the input of block 0."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_len, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        return self.dropout(self.tok(input_ids) + self.pos(positions))  # (B, T, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.d_head = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.probs = nn.Identity()  # hook point: attention probabilities (B, H, T, T)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, d); ``allowed`` (B, 1, T, T) bool, True where query t may attend to key s."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # each (B, T, d)
        q, k, v = (t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, dh)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)  # (B, H, T, T)
        # A finite fill keeps rows with no allowed key (padded queries) finite; zeroing afterwards
        # gives masked keys exactly zero probability and such rows all zeros instead of NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)  # (B, H, T, T)
        probs = self.attn_dropout(self.probs(probs))
        y = (probs @ v).transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.resid_dropout(self.out(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            nn.ReLU(),
            nn.Linear(config.d_ff, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), allowed)  # (B, T, d)
        return x + self.mlp(self.ln2(x))  # (B, T, d)


class TinyTransformer(nn.Module):
    """Decoder-only transformer; ``forward`` returns next-token logits ``(B, T, V)``."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Small init: every matrix (embeddings included) ~ N(0, INIT_STD^2), biases 0, LayerNorms 1/0.

        A small initial weight norm is what lets modular arithmetic generalise together with
        memorising instead of grokking thousands of steps later (PyTorch's N(0, 1) embeddings
        delay it badly).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` (B, T) long; ``attention_mask`` (B, T), 1/True for real tokens, 0 for right padding."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.config.max_len}")
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        if attention_mask is None:
            allowed = causal.expand(B, 1, T, T)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {(B, T)}")
            keys = attention_mask.to(device=input_ids.device, dtype=torch.bool)  # (B, T)
            allowed = causal[None, None] & keys[:, None, None, :]  # (B, 1, T, T)
        x = self.embed(input_ids)  # (B, T, d)
        for block in self.blocks:
            x = block(x, allowed)  # (B, T, d)
        return self.head(self.ln_f(x))  # (B, T, V)


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
    _positive_int("batch_size", batch_size)
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
            _positive_int(name, getattr(self, name))
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


# ---------------------------------------------------------------------------------------------- checkpoints


def save_tiny(model: TinyTransformer, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``m2kt_tiny.json`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "m2kt": "tiny"})
    config_text = json.dumps(model.config.to_json(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    (directory / CONFIG_FILE).write_text(config_text, encoding="utf-8")
    return directory


def load_tiny(directory: str | Path, *, device: torch.device | str = "cpu") -> TinyTransformer:
    """Load a directory written by :func:`save_tiny`; every problem is a ValueError saying what."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"not a tiny-model checkpoint: {path} is missing")
    try:
        config = TinyConfig.from_json(json.loads(config_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"{config_path}: invalid config: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{config_path}: invalid config: {exc}") from None
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path}: cannot read weights: {exc}") from None

    model = TinyTransformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name}: file {tuple(tensors[name].shape)} vs config {tuple(t.shape)}"
        for name, t in expected.items()
        if name in tensors and tensors[name].shape != t.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong))
        raise ValueError(f"{weights_path} does not match {config_path}: " + ", ".join(parts))
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in sorted name order: UTF-8 name bytes, then the tensor's raw
    little-endian bytes (C order). Independent of device; changes with dtype or any value."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8)  # (numel * itemsize,) native byte order
        if sys.byteorder != "little" and t.element_size() > 1:
            raw = raw.view(-1, t.element_size()).flip(-1).reshape(-1)
        digest.update(name.encode("utf-8"))
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
