"""Where models run: CUDA when present, the CPU otherwise, the same code either way."""

from __future__ import annotations

import torch

from m2kt.errors import SpecError

__all__ = ["pick_device"]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {name!r} was asked for but CUDA is not available here")
    return device
