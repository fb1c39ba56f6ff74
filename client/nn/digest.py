"""One digest of a model's weights, the same for every model (teacher manifests, student cores)."""

from __future__ import annotations

import hashlib
import sys

import torch
from torch import nn

__all__ = ["state_dict_sha256"]


def state_dict_sha256(model: nn.Module) -> str:
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
