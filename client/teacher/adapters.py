"""Model adapters: one way to read hidden states, attention and logits from any teacher.

* :class:`HookAdapter` — any ``nn.Module``: forward hooks on named modules capture hidden
  states (``(B, T, d)`` outputs) and attention probabilities (``(B, H, T, T)`` outputs).
* :class:`TransformersAdapter` — Hugging Face ``transformers`` models, through
  ``output_hidden_states`` / ``output_attentions`` (eager attention, so probabilities exist).
* :func:`adapter_for` picks one: our :class:`~client.teacher.tiny_model.TinyTransformer`,
  a ``transformers`` model (with its tokenizer), or an adapter passed through.

Adapters run batched, under ``torch.inference_mode`` unless gradients are asked for
(:meth:`ModelAdapter.forward_interpolated`, used by integrated gradients), on the model's device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from client.teacher.spec import SpecError
from client.teacher.tiny_model import weights_sha256 as state_dict_sha256  # one digest for every model

__all__ = [
    "Batch",
    "Capture",
    "HookAdapter",
    "ModelAdapter",
    "TransformersAdapter",
    "adapter_for",
    "pick_device",
    "state_dict_sha256",
]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {name!r} was asked for but CUDA is not available here")
    return device


@dataclass
class Batch:
    """Tokenised probe inputs, right-padded."""

    input_ids: torch.Tensor  # (P, L) long
    mask: torch.Tensor  # (P, L) bool, True on real tokens
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.lengths)

    def slice(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(self.lengths[start:stop])
        return (
            self.input_ids[start:stop, :width].to(device, non_blocking=True),
            self.mask[start:stop, :width].to(device, non_blocking=True),
        )


@dataclass
class Capture:
    """What one forward pass exposed."""

    hidden: dict[str, torch.Tensor]  # layer name -> (B, T, d)
    attentions: list[torch.Tensor] | None  # per attention layer, (B, H, T, T)
    logits: torch.Tensor | None  # (B, T, V)


def _first(output: Any) -> torch.Tensor:
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
            h = _first(output).detach()  # the teacher's own weights stay out of the gradient
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


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return Batch(ids, mask, [len(r) for r in rows])


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
        return _pad(rows, self._pad_id)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, *, attention: bool, grad: bool = False) -> Capture:
        hidden: dict[str, torch.Tensor] = {}
        attentions: list[torch.Tensor] = []
        handles = []

        def keep_hidden(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _i: Any, output: Any) -> None:
                hidden[name] = _first(output) if grad else _first(output).detach()

            return hook

        def keep_attention(_m: nn.Module, _i: Any, output: Any) -> None:
            attentions.append(_first(output) if grad else _first(output).detach())

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
        return _first(out) if not isinstance(out, torch.Tensor) else out

    def output_token_id(self, token: str) -> int:
        if token not in self._vocab_index:
            raise SpecError(f"target token {token!r} is not in the model's vocabulary")
        return self._vocab_index[token]

    def output_token(self, index: int) -> str:
        assert self._vocabulary is not None
        return self._vocabulary[index]


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
        return _pad(rows, pad)

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


def adapter_for(model: Any, tokenizer: Any = None) -> ModelAdapter:
    """An adapter for ``model``: an adapter as is, a TinyTransformer, or a ``transformers`` model."""
    if isinstance(model, ModelAdapter):
        return model
    from client.teacher.tiny_model import TinyTransformer

    if isinstance(model, TinyTransformer):
        return tiny_adapter(model)
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = getattr(model.config, "name_or_path", "")
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise SpecError(
                    f"{type(model).__name__}: pass its tokenizer (none found at {source!r}: {exc})"
                ) from None
        return TransformersAdapter(model, tokenizer)
    raise SpecError(
        f"no adapter for {type(model).__name__}: wrap it in a HookAdapter naming its layers and attention modules"
    )


def tiny_adapter(model: nn.Module) -> HookAdapter:
    """The adapter for :class:`~client.teacher.tiny_model.TinyTransformer` (whitespace tokens)."""
    from client.symbolic import Vocabulary, parse_expression

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
