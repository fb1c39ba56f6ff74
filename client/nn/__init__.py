"""The torch layer shared by teacher and student: model adapters, batches, captures, device, digests.

    from m2kt.nn import adapter_for, pick_device
    adapter = adapter_for(model, tokenizer)          # a ModelAdapter: tokenize, forward, layers
    capture = adapter.forward(ids, mask, attention=True)

Modules: ``base`` (the :class:`ModelAdapter` interface), ``hook`` (any ``nn.Module`` via forward hooks),
``hf`` (``transformers`` models), ``adapters`` (:func:`adapter_for`), ``batch`` (:class:`Batch`,
:class:`Capture`), ``select`` (states at token positions), ``device`` (:func:`pick_device`), ``digest``
(:func:`state_dict_sha256`). It imports torch; it knows no particular model and neither side of a transfer.
"""

from __future__ import annotations

from m2kt.nn.adapters import adapter_for
from m2kt.nn.base import ModelAdapter
from m2kt.nn.batch import Batch, Capture
from m2kt.nn.device import pick_device
from m2kt.nn.digest import state_dict_sha256
from m2kt.nn.hf import TransformersAdapter
from m2kt.nn.hook import HookAdapter
from m2kt.nn.select import select

__all__ = [
    "Batch",
    "Capture",
    "HookAdapter",
    "ModelAdapter",
    "TransformersAdapter",
    "adapter_for",
    "pick_device",
    "select",
    "state_dict_sha256",
]
