"""How M2KT reads a TinyTransformer: a HookAdapter on its named modules, whitespace tokens.

Module names are the interface: ``embed`` (token + position, the input to block 0), ``embed.tok`` (the
token embedding alone: a position-free token concept), ``blocks.{i}`` (the residual stream after block i)
and ``blocks.{i}.attn.probs`` (the attention probabilities).
"""

from __future__ import annotations

from typing import Any

from m2kt.nn.hook import HookAdapter
from m2kt.toy.symbolic import Vocabulary, parse_expression

__all__ = ["tiny_adapter"]


def tiny_adapter(model: Any) -> HookAdapter:
    """The adapter for :class:`~m2kt.toy.model.TinyTransformer` (whitespace tokens)."""
    config = model.config
    vocab = Vocabulary(config.vocab)
    n = config.n_layers
    return HookAdapter(
        model,
        layers=["embed", *(f"blocks.{i}" for i in range(n))],
        attention_modules=[f"blocks.{i}.attn.probs" for i in range(n)],
        extra_layers=["embed.tok"],  # the token embedding without position: a position-free token concept
        tokenizer=lambda text: vocab.encode(parse_expression(text)),
        vocabulary=vocab.tokens,
        pad_id=vocab.pad_id,
        max_length=config.max_len,
        model_name="tiny-transformer",
        architecture=(
            f"TinyTransformer(d={config.d_model},L={n},H={config.n_heads},ff={config.d_ff},V={len(config.vocab)})"
        ),
        d_model=config.d_model,
    )
