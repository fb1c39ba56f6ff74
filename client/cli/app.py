"""The ``m2kt`` command's app: the Typer object, the global options, ``fail`` and the exit codes.

Subcommands live beside this module and import it; :mod:`m2kt.cli.main` puts them together.

Exit codes (stable, for scripts):

* 0 — success (for ``verify``: the packet is valid);
* 1 — a packet was refused (malformed, failed verification here, refused by the broker's checks, or
  rolled back by ``ingest``'s verifier and safety auditor);
* 2 — usage error (bad options or arguments);
* 3 — a file could not be used (missing, unreadable, bad key file);
* 4 — the broker refused the request (authentication, permission, not found, conflict);
* 5 — the broker is unreachable or unavailable (after retries);
* 6 — a ``subscribe --exec`` handler failed (that packet is not acknowledged).

Errors are one line on stderr.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from m2kt import __version__

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_FILE, EXIT_BROKER, EXIT_UNAVAILABLE, EXIT_HANDLER = 0, 1, 2, 3, 4, 5, 6


def _hide_flag_types() -> None:
    """Typer 0.2x prints ``<bool>`` after on/off flags, which reads as "takes a value" (``--migrate true``
    then fails). Show a type only for options that take one."""
    option_class = getattr(getattr(typer, "core", None), "TyperOption", None)
    show_type = getattr(option_class, "display_type_rich", None)
    if option_class is None or show_type is None or getattr(show_type, "_m2kt", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return "" if getattr(self, "is_flag", False) else show_type(self, ctx)

    display_type_rich._m2kt = True  # type: ignore[attr-defined]
    option_class.display_type_rich = display_type_rich


_hide_flag_types()

app = typer.Typer(
    name="m2kt",
    help="M2KT: signed knowledge packets between models — keys, packets, broker and nodes.",
    no_args_is_help=True,
    add_completion=False,
)
packet_app = typer.Typer(help="Inspect, verify and describe knowledge packets.", no_args_is_help=True)
app.add_typer(packet_app, name="packet")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(code: int, message: str) -> NoReturn:
    err.print(message, markup=False)
    raise typer.Exit(code)


if importlib.util.find_spec("fastapi") is not None:  # the server parts are an extra: m2kt[broker]
    from m2kt.broker.cli import app as broker_app
else:  # pragma: no cover - exercised only without the extra
    broker_app = typer.Typer(help="Broker commands (install the extra: pip install 'm2kt[broker]').")

    @broker_app.callback(invoke_without_command=True)
    def _missing_broker() -> None:
        fail(EXIT_USAGE, "the broker is not installed here: pip install 'm2kt[broker]'")


app.add_typer(broker_app, name="broker")


def _version(value: bool) -> None:
    if value:
        out.print(f"m2kt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    broker: Annotated[
        str | None, typer.Option("--broker", envvar="M2KT_URL", help="Broker URL (default: from `m2kt login`).")
    ] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="M2KT_TOKEN", help="API token.")] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", envvar="M2KT_PROFILE", help="A stored identity (`m2kt login URL --token T --profile NAME`)."
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """M2KT command line."""
    ctx.obj = {"broker": broker, "token": token, "profile": profile}
