"""Hugging Face ``transformers`` models and their tokenizers (loaded from local files only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from m2kt.errors import SpecError
from m2kt.nn.base import ModelAdapter
from m2kt.nn.batch import Batch, Capture, pad_rows

__all__ = ["TransformersAdapter"]


class TransformersAdapter(ModelAdapter):
    """A Hugging Face ``transformers`` model and its tokenizer.

    Layers are named ``embeddings`` (``hidden_states[0]``) and ``layer.0`` … ``layer.{n-1}``;
    attention comes from ``output_attentions`` with eager attention. Models with a language-
    modelling head expose logits (attribution, decode traces); encoders such as MiniLM do not.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, model_name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        if hasattr(model, "set_attn_implementation"):
            try:
                model.set_attn_implementation("eager")
            except (ValueError, AttributeError):  # pragma: no cover - models without the choice
                pass
        else:  # pragma: no cover - older transformers
            config._attn_implementation = "eager"
        self.device = next(model.parameters()).device
        n_layers = int(config.num_hidden_layers)
        self.layer_names = ["embeddings", *(f"layer.{i}" for i in range(n_layers))]
        self.n_attention_layers = n_layers
        self.d_model = int(config.hidden_size)
        self.max_length = getattr(config, "max_position_embeddings", None)
        self.model_name = model_name or getattr(config, "name_or_path", "") or type(model).__name__
        self.architecture = f"{type(model).__name__}({config.model_type}, d={self.d_model}, L={n_layers})"
        self.has_logits = model.get_output_embeddings() is not None
        self._blocks = self._find_blocks(model, n_layers)

    @staticmethod
    def _find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList | None:
        """The ``ModuleList`` of transformer blocks (encoder.layer, h, layers, ...)."""
        for _name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n_layers:
                return module
        return None

    def tokenize(self, texts: Sequence[str]) -> Batch:
        encoded = self.tokenizer(list(texts), add_special_tokens=True)
        rows = encoded["input_ids"]
        for text, row in zip(texts, rows, strict=True):
            if self.max_length is not None and len(row) > self.max_length:
                raise SpecError(f"probe input {text!r} is {len(row)} tokens; the model takes at most {self.max_length}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return pad_rows(rows, pad)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, *, attention: bool, grad: bool = False) -> Capture:
        with torch.enable_grad() if grad else torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask.long(),
                output_hidden_states=True,
                output_attentions=attention,
                return_dict=True,
            )
        states = out.hidden_states
        hidden = {name: states[i] for i, name in enumerate(self.layer_names)}
        attentions = None
        if attention:
            if out.attentions is None or any(a is None for a in out.attentions):
                raise SpecError(f"{self.model_name} does not return attention probabilities")
            attentions = list(out.attentions)
        return Capture(hidden, attentions, getattr(out, "logits", None))

    def _layer_module(self, layer: str) -> nn.Module:
        if layer == "embeddings":
            return self.model.get_input_embeddings()
        if self._blocks is None:
            raise SpecError(f"cannot find the transformer blocks of {self.model_name} to attribute at {layer!r}")
        return self._blocks[int(layer.split(".")[1])]

    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=mask.long(), return_dict=True).logits

    def output_token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        unk = self.tokenizer.unk_token_id
        if not ids or ids[0] is None or (ids[0] == unk and token != self.tokenizer.unk_token):
            raise SpecError(f"target token {token!r} is not in the tokenizer's vocabulary")
        return int(ids[0])

    def output_token(self, index: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens([index])[0])
