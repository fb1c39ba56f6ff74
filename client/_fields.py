"""One check for config dicts read from JSON/YAML: every key must be a field of the dataclass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def check_known_fields(cls: type, data: Mapping[str, Any], where: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming every key of ``data`` that is not a field of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
