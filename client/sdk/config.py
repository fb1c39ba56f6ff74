"""Where `m2kt login` keeps broker URLs and tokens: the user's config dir, mode 0600.

One file holds a default identity and any number of named **profiles** (``m2kt login URL --token T
--profile teacher``; then ``m2kt --profile teacher …`` or ``M2KT_PROFILE=teacher``), so a teacher and a
student on one machine need no ``--token`` on every command. ``M2KT_URL`` and ``M2KT_TOKEN`` override
what is stored."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platformdirs import user_config_dir

from m2kt.errors import M2KTError

__all__ = ["ClientConfig", "config_path", "load_config", "profiles", "save_config"]


def config_path() -> Path:
    return Path(os.environ.get("M2KT_CONFIG") or Path(user_config_dir("m2kt")) / "config.json")


@dataclass(frozen=True)
class ClientConfig:
    url: str | None = None
    token: str | None = None
    profile: str | None = None


def _stored() -> dict[str, Any]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def profiles() -> dict[str, str | None]:
    """Stored profile names and their broker URLs (tokens are not returned)."""
    stored = _stored().get("profiles") or {}
    return {name: (entry or {}).get("url") for name, entry in sorted(stored.items())}


def load_config(profile: str | None = None) -> ClientConfig:
    """The stored identity: ``profile`` (or ``M2KT_PROFILE``) when named, else the default one."""
    profile = profile or os.environ.get("M2KT_PROFILE") or None
    stored = _stored()
    if profile is not None:
        entry = (stored.get("profiles") or {}).get(profile)
        if entry is None:
            known = ", ".join(profiles()) or "none yet"
            raise M2KTError(
                f"no profile {profile!r} in {config_path()} (stored: {known}); create it with "
                f"`m2kt login URL --token … --profile {profile}`"
            )
        stored = entry
    return ClientConfig(
        url=os.environ.get("M2KT_URL") or stored.get("url"),
        token=os.environ.get("M2KT_TOKEN") or stored.get("token"),
        profile=profile,
    )


def save_config(url: str, token: str, profile: str | None = None) -> Path:
    """Store ``url`` and ``token`` as the default identity, or as ``profile``; other entries are kept."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _stored()
    if profile is None:
        data.update({"url": url, "token": token})
    else:
        data.setdefault("profiles", {})[profile] = {"url": url, "token": token}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.chmod(path, 0o600)
    return path
