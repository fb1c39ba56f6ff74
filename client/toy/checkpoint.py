"""TinyTransformer checkpoints: a directory with ``model.safetensors`` and ``m2kt_tiny.json`` (the config).

Nothing is ever pickled; loading is strict and every problem is a ValueError saying what.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from m2kt.toy.model import TinyConfig, TinyTransformer

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_tiny", "save_tiny"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "m2kt_tiny.json"


def save_tiny(model: TinyTransformer, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``m2kt_tiny.json`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "m2kt": "tiny"})
    config_text = json.dumps(model.config.to_json(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    (directory / CONFIG_FILE).write_text(config_text, encoding="utf-8")
    return directory


def load_tiny(directory: str | Path, *, device: torch.device | str = "cpu") -> TinyTransformer:
    """Load a directory written by :func:`save_tiny`; every problem is a ValueError saying what."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"not a tiny-model checkpoint: {path} is missing")
    try:
        config = TinyConfig.from_json(json.loads(config_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"{config_path}: invalid config: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{config_path}: invalid config: {exc}") from None
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path}: cannot read weights: {exc}") from None

    model = TinyTransformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name}: file {tuple(tensors[name].shape)} vs config {tuple(t.shape)}"
        for name, t in expected.items()
        if name in tensors and tensors[name].shape != t.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong))
        raise ValueError(f"{weights_path} does not match {config_path}: " + ", ".join(parts))
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()
