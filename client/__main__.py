"""``python -m m2kt``: the same as the ``m2kt`` command."""

from m2kt.cli.main import app

app(prog_name="m2kt")
