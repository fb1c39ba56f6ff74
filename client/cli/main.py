"""The ``m2kt`` console script: the app with every subcommand registered (``m2kt = "m2kt.cli.main:app"``).

Each subcommand module imports :mod:`m2kt.cli.app` and registers its commands on import; this module is
the only one that imports them all, so the CLI has no import cycle.
"""

from __future__ import annotations

# The order of these imports is the order of the commands in `m2kt --help` (and docs/cli.md).
# isort: off
from m2kt.cli.app import app
from m2kt.cli import local  # noqa: F401 - keygen, packet inspect | verify | schema
from m2kt.cli import bench  # noqa: F401 - bench transfer
from m2kt.cli import demo  # noqa: F401 - demo
from m2kt.cli import node  # noqa: F401 - the model commands: pack, train-tiny, ingest
from m2kt.cli import remote  # noqa: F401 - the broker-facing commands
# isort: on

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
