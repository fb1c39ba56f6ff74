"""A tiny decoder-only transformer for the symbolic tasks in :mod:`m2kt.toy.symbolic`.

Used as the teacher and, with other sizes or seeds, as the student. It trains from scratch on a
CPU in seconds: pre-LayerNorm blocks, causal self-attention, learned positional embeddings and an
untied output head. Module names are part of the interface, since extraction code attaches
forward hooks to them by name:

* ``embed``: token + position embeddings, i.e. the input to block 0, ``(B, T, d)``;
* ``blocks[i]``: the residual stream after block ``i``, ``(B, T, d)``;
* ``blocks[i].attn.probs``: an ``nn.Identity`` applied to the attention probabilities (after the
  causal/padding mask and softmax), ``(B, H, T, T)``;
* ``ln_f`` and ``head``: the final norm and the vocabulary projection.

It brings its own adapter (:meth:`TinyTransformer.m2kt_adapter`), so the torch layer needs no
knowledge of it. Training is in :mod:`m2kt.toy.train`, checkpoints in :mod:`m2kt.toy.checkpoint`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from m2kt.nn.hook import HookAdapter
from m2kt.toy.adapter import tiny_adapter
from m2kt.toy.symbolic import PAD, ModularTask

__all__ = ["INIT_STD", "TinyConfig", "TinyTransformer", "positive_int"]

INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------- config


def positive_int(name: str, value: Any) -> None:
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
            positive_int(name, getattr(self, name))
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

    def m2kt_adapter(self) -> HookAdapter:
        """How M2KT reads this model (see :func:`m2kt.nn.adapter_for`)."""
        return tiny_adapter(self)
