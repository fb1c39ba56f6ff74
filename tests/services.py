"""What the tests do when a real service they need is missing: skip locally, fail under ``CI=true``."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI=true, where every service must be up."""
    if IN_CI:
        pytest.fail(f"{reason} — CI=true, so this is a failure (.ci/run must start the service)", pytrace=False)
    pytest.skip(reason)
