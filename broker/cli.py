"""``m2kt broker …``: run the service and manage its schema."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.db import SchemaOutOfDate, current_revision, head_revision, make_engine, upgrade
from broker.settings import Settings

app = typer.Typer(help="Run the broker service and manage its database.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    migrate: Annotated[bool, typer.Option("--migrate", help="Upgrade the schema before starting.")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the broker (embedded SQLite + ./m2kt-data unless M2KT_DATABASE_URL / M2KT_STORAGE_URL are set)."""
    import uvicorn

    from broker.app import create_app, prepare_database

    settings = Settings()
    if migrate:
        upgrade(settings.effective_database_url)
    try:
        prepare_database(settings)
    except SchemaOutOfDate as exc:
        typer.echo(f"refusing to start: {exc}", err=True)
        raise typer.Exit(3) from None
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@app.command("migrate")
def migrate_cmd(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (Alembic) to the given revision."""
    settings = Settings()
    url = settings.effective_database_url
    upgrade(url, revision)
    engine = make_engine(url)
    typer.echo(f"schema at {current_revision(engine)} (head is {head_revision()})")
    engine.dispose()
