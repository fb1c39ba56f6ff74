"""Where `m2kt login` keeps the broker URL and token: the user's config dir, mode 0600.
``M2KT_URL`` and ``M2KT_TOKEN`` override it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_config_dir


def config_path() -> Path:
    return Path(os.environ.get("M2KT_CONFIG") or Path(user_config_dir("m2kt")) / "config.json")


@dataclass(frozen=True)
class ClientConfig:
    url: str | None = None
    token: str | None = None


def load_config() -> ClientConfig:
    path = config_path()
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
    return ClientConfig(
        url=os.environ.get("M2KT_URL") or stored.get("url"),
        token=os.environ.get("M2KT_TOKEN") or stored.get("token"),
    )


def save_config(url: str, token: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    os.chmod(path, 0o600)
    return path
