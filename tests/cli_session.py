"""The CLI against a live broker, as the CLI tests use it: a private user config and one token per call."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from m2kt.cli.main import app  # the app with every command registered
from tests.conftest import LiveBroker

runner = CliRunner()


@pytest.fixture
def env(live_broker: LiveBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The broker's URL and a config file of this test's own; no M2KT_URL / M2KT_TOKEN from outside."""
    monkeypatch.setenv("M2KT_CONFIG", str(tmp_path / "config.json"))
    for var in ("M2KT_URL", "M2KT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return {"M2KT_URL": live_broker.url, "M2KT_CONFIG": str(tmp_path / "config.json")}


def m2kt(*args: str, token: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    """``m2kt ARGS`` in-process, as the node that holds ``token``."""
    return runner.invoke(app, list(args), env={**env, "M2KT_TOKEN": token})
