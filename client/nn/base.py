"""The model as M2KT sees it: a :class:`ModelAdapter` reads hidden states, attention and logits.

Teacher extraction and student ingestion both work through one; :mod:`m2kt.nn.adapters` picks it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from m2kt.errors import SpecError
from m2kt.nn.batch import Batch, Capture
from m2kt.nn.digest import state_dict_sha256

__all__ = ["ModelAdapter", "first_output"]


def first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class ModelAdapter(ABC):
    """The teacher as extraction sees it. Subclasses fill in the abstract parts."""

    model: nn.Module
    device: torch.device
    model_name: str
    architecture: str
    d_model: int
    layer_names: list[str]  # readable layers, input embeddings first
    n_attention_layers: int
    has_logits: bool
    max_length: int | None

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Batch:
        """Tokenise probe inputs; a token the model does not know is a :class:`SpecError`."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, *, attention: bool, grad: bool = False) -> Capture:
        """One batched forward pass; without gradients unless ``grad`` (the student trains through it)."""

    @abstractmethod
    def _layer_module(self, layer: str) -> nn.Module:
        """The module whose output is ``layer``'s hidden state (for gradient hooks)."""

    @abstractmethod
    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output logits (B, T, V) with gradients enabled."""

    @abstractmethod
    def output_token_id(self, token: str) -> int:
        """The output class for a target token."""

    @abstractmethod
    def output_token(self, index: int) -> str:
        """The token for an output class."""

    def forward_interpolated(
        self, input_ids: torch.Tensor, mask: torch.Tensor, layer: str, alpha: float, baseline: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits with ``layer``'s output h replaced by ``baseline + alpha * (h - baseline)``.

        Returns (logits, point, h): ``point`` keeps its gradient, so ``d logit / d point`` is one
        backward pass away — a step on the integrated-gradients path. ``baseline`` broadcasts
        against (B, T, d) and is cut to the batch's T.
        """
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            h = first_output(output).detach()  # the teacher's own weights stay out of the gradient
            start = baseline[..., : h.shape[-2], :].to(h.dtype)
            point = (start + alpha * (h - start)).requires_grad_(True)
            kept.append((point, h))
            if isinstance(output, tuple):
                return (point, *output[1:])
            if isinstance(output, list):
                return [point, *output[1:]]
            return point

        handle = self._layer_module(layer).register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = self._logits(input_ids, mask)
        finally:
            handle.remove()
        if len(kept) != 1:
            raise RuntimeError(f"layer {layer!r} ran {len(kept)} times in one forward pass")
        return logits, kept[0][0], kept[0][1]

    @property
    def readable_layers(self) -> list[str]:
        """Layers a spec may name: the stack (``layer_names``, traced in order) plus any extra read points."""
        return list(self.layer_names)

    def layer_module(self, layer: str) -> nn.Module:
        """The module whose output is ``layer``'s hidden state (hooks attach here)."""
        if layer not in self.readable_layers:
            raise SpecError(f"layer {layer!r} does not exist; readable layers: {', '.join(self.readable_layers)}")
        return self._layer_module(layer)

    def weights_sha256(self) -> str:
        return state_dict_sha256(self.model)

    def predict(self, texts: Sequence[str], batch_size: int = 512) -> list[str]:
        """The model's own answer to each input: its argmax output token at the last token."""
        if not self.has_logits:
            raise SpecError(f"{self.model_name} has no output head to answer with")
        batch = self.tokenize(texts)
        out: list[str] = []
        for start in range(0, len(batch), batch_size):
            stop = min(start + batch_size, len(batch))
            ids, mask = batch.slice(start, stop, self.device)
            logits = self.forward(ids, mask, attention=False).logits
            assert logits is not None
            last = torch.tensor(batch.lengths[start:stop], device=logits.device) - 1
            rows = torch.arange(stop - start, device=logits.device)
            out += [self.output_token(int(i)) for i in logits[rows, last].argmax(-1)]
        return out

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Extraction never trains the teacher: parameters stop requiring grad for the duration."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        was_training = self.model.training
        for p, _ in flags:
            p.requires_grad_(False)
        self.model.eval()
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            self.model.train(was_training)
