"""Choosing the adapter for a model.

* :class:`~m2kt.nn.hook.HookAdapter` — any ``nn.Module``: forward hooks on named modules capture hidden
  states (``(B, T, d)`` outputs) and attention probabilities (``(B, H, T, T)`` outputs).
* :class:`~m2kt.nn.hf.TransformersAdapter` — Hugging Face ``transformers`` models, through
  ``output_hidden_states`` / ``output_attentions`` (eager attention, so probabilities exist).
* A model class may bring its own: :func:`adapter_for` calls ``model.m2kt_adapter()`` when it exists
  (the toy :class:`~m2kt.toy.model.TinyTransformer` does), so this layer knows no particular model.

Adapters run batched, under ``torch.inference_mode`` unless gradients are asked for
(:meth:`ModelAdapter.forward_interpolated`, used by integrated gradients), on the model's device.
"""

from __future__ import annotations

from typing import Any

from m2kt.errors import SpecError
from m2kt.nn.base import ModelAdapter
from m2kt.nn.hf import TransformersAdapter

__all__ = ["adapter_for"]


def adapter_for(model: Any, tokenizer: Any = None) -> ModelAdapter:
    """An adapter for ``model``: an adapter as is; a model that brings its own (``model.m2kt_adapter()``,
    as :class:`~m2kt.toy.model.TinyTransformer` does); or a ``transformers`` model."""
    if isinstance(model, ModelAdapter):
        return model
    own = getattr(model, "m2kt_adapter", None)
    if callable(own):
        adapter = own()
        if not isinstance(adapter, ModelAdapter):
            raise SpecError(
                f"{type(model).__name__}.m2kt_adapter() returned {type(adapter).__name__}, not a ModelAdapter"
            )
        return adapter
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
        f"no adapter for {type(model).__name__}: wrap it in a HookAdapter naming its layers and attention modules, "
        "or give the model an m2kt_adapter() method"
    )
