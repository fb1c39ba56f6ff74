"""Writing a benchmark's outputs: its Markdown table and its JSON document, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_results"]


def write_results(out: Path, stem: str, table: str, document: dict[str, Any]) -> None:
    """``out/<stem>.md`` (the table) and ``out/<stem>.json`` (the document), creating ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
