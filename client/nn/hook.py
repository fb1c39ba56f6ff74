"""Any ``nn.Module``, read through forward hooks on named sub-modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from m2kt.errors import SpecError
from m2kt.nn.base import ModelAdapter, first_output
from m2kt.nn.batch import Batch, Capture, pad_rows

__all__ = ["HookAdapter"]


class HookAdapter(ModelAdapter):
    """Any ``nn.Module``, read through forward hooks on named sub-modules.

    ``layers`` are module names whose outputs are hidden states (B, T, d), input embeddings
    first; ``attention_modules`` are module names whose outputs are attention probabilities
    (B, H, T, T); ``extra_layers`` are further readable modules outside the traced stack (e.g. the
    token embedding alone). ``tokenizer`` maps one probe input to token ids; ``vocabulary`` (index = output
    class) names the logits' classes. ``call(model, input_ids, mask)`` runs the model (default
    ``model(input_ids, attention_mask=mask)``); a tensor result (B, T, V) is taken as logits.

    Example::

        adapter = HookAdapter(model, layers=["embed", "blocks.0", "blocks.1"],
                              attention_modules=["blocks.0.attn.probs", "blocks.1.attn.probs"],
                              tokenizer=lambda text: vocab.encode(text.split()), vocabulary=vocab.tokens)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str],
        tokenizer: Callable[[str], Sequence[int]],
        attention_modules: Sequence[str] = (),
        extra_layers: Sequence[str] = (),
        vocabulary: Sequence[str] | None = None,
        pad_id: int = 0,
        max_length: int | None = None,
        call: Callable[[nn.Module, torch.Tensor, torch.Tensor], Any] | None = None,
        model_name: str | None = None,
        architecture: str | None = None,
        d_model: int | None = None,
    ) -> None:
        self.model = model
        modules = dict(model.named_modules())
        missing = [name for name in (*layers, *attention_modules, *extra_layers) if name not in modules]
        if missing:
            raise SpecError(f"the model has no module(s) named {', '.join(missing)}")
        if not layers:
            raise SpecError("a HookAdapter needs at least one layer")
        self._modules = modules
        self.layer_names = list(layers)
        self._extra_layers = [name for name in extra_layers if name not in self.layer_names]
        self._attention_modules = list(attention_modules)
        self.n_attention_layers = len(self._attention_modules)
        self._tokenizer = tokenizer
        self._vocabulary = list(vocabulary) if vocabulary is not None else None
        self._vocab_index = {t: i for i, t in enumerate(self._vocabulary or ())}
        self._pad_id = pad_id
        self.max_length = max_length
        self._call = call or (lambda m, ids, mask: m(ids, attention_mask=mask))
        self.model_name = model_name or type(model).__name__
        self.architecture = architecture or type(model).__name__
        self.device = next(model.parameters()).device
        self.has_logits = self._vocabulary is not None
        self.d_model = d_model or self._probe_width()

    def _probe_width(self) -> int:
        batch = self.tokenize([self._sample_text()]) if self._sample_text() else None
        if batch is None:
            raise SpecError("give d_model= for a HookAdapter without a sample vocabulary")
        ids, mask = batch.slice(0, 1, self.device)
        capture = self.forward(ids, mask, attention=False)
        return int(capture.hidden[self.layer_names[-1]].shape[-1])

    def _sample_text(self) -> str | None:
        if not self._vocabulary:
            return None
        return " ".join(t for t in self._vocabulary[1:3])

    @property
    def readable_layers(self) -> list[str]:
        return [*self.layer_names, *self._extra_layers]

    def tokenize(self, texts: Sequence[str]) -> Batch:
        rows = []
        for text in texts:
            try:
                ids = list(self._tokenizer(text))
            except (KeyError, ValueError) as exc:
                raise SpecError(f"probe input {text!r}: {exc.args[0] if exc.args else exc}") from None
            if not ids:
                raise SpecError(f"probe input {text!r} has no tokens")
            if self.max_length is not None and len(ids) > self.max_length:
                raise SpecError(f"probe input {text!r} is {len(ids)} tokens; the model takes at most {self.max_length}")
            rows.append(ids)
        return pad_rows(rows, self._pad_id)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, *, attention: bool, grad: bool = False) -> Capture:
        hidden: dict[str, torch.Tensor] = {}
        attentions: list[torch.Tensor] = []
        handles = []

        def keep_hidden(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _i: Any, output: Any) -> None:
                hidden[name] = first_output(output) if grad else first_output(output).detach()

            return hook

        def keep_attention(_m: nn.Module, _i: Any, output: Any) -> None:
            attentions.append(first_output(output) if grad else first_output(output).detach())

        try:
            for name in self.readable_layers:
                handles.append(self._modules[name].register_forward_hook(keep_hidden(name)))
            if attention:
                for name in self._attention_modules:
                    handles.append(self._modules[name].register_forward_hook(keep_attention))
            with torch.enable_grad() if grad else torch.inference_mode():
                out = self._call(self.model, input_ids, mask)
        finally:
            for h in handles:
                h.remove()
        logits = out if isinstance(out, torch.Tensor) and out.dim() == 3 and self.has_logits else None
        return Capture(hidden, attentions if attention else None, logits)

    def _layer_module(self, layer: str) -> nn.Module:
        return self._modules[layer]

    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self._call(self.model, input_ids, mask)
        return first_output(out) if not isinstance(out, torch.Tensor) else out

    def output_token_id(self, token: str) -> int:
        if token not in self._vocab_index:
            raise SpecError(f"target token {token!r} is not in the model's vocabulary")
        return self._vocab_index[token]

    def output_token(self, index: int) -> str:
        assert self._vocabulary is not None
        return self._vocabulary[index]
