"""``m2kt broker …``: run the service and manage its schema and bucket.

The database layer (SQLAlchemy, Alembic) and the settings are imported inside each command: every ``m2kt``
command loads this module to list its subcommands, and those imports cost about a second.
"""

from __future__ import annotations

import socket
from typing import Annotated

import typer

app = typer.Typer(help="Run the broker service and manage its database.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    migrate: Annotated[bool, typer.Option("--migrate", help="Upgrade the schema before starting.")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    workers: Annotated[
        int | None,
        typer.Option(
            help="Broker processes sharing the port (default M2KT_WORKERS, 1). More than 1 needs PostgreSQL; "
            "one per CPU core is a good start.",
        ),
    ] = None,
) -> None:
    """Run the broker (embedded SQLite + ./m2kt-data unless M2KT_DATABASE_URL / M2KT_STORAGE_URL are set)."""
    # Served by m2kt.broker.server: connections capped and timed (M2KT_MAX_CONNECTIONS,
    # M2KT_HEADER_TIMEOUT_SECONDS, M2KT_KEEPALIVE_TIMEOUT_SECONDS), token secrets redacted from every log line.
    from m2kt.broker.app import create_app, prepare_database
    from m2kt.broker.db import SchemaOutOfDate, upgrade
    from m2kt.broker.server import serve as serve_broker
    from m2kt.broker.settings import Settings
    from m2kt.broker.workers import bind_socket, check_workers, serve_workers

    settings = Settings()
    if migrate:
        upgrade(settings.effective_database_url)
    try:
        prepare_database(settings)
    except SchemaOutOfDate as exc:
        typer.echo(f"refusing to start: {exc}", err=True)
        raise typer.Exit(3) from None
    count = workers if workers is not None else settings.workers
    problem = check_workers(settings, count)
    if problem:
        typer.echo(f"refusing to start: {problem}", err=True)
        raise typer.Exit(2)
    if count == 1:
        if not serve_broker(create_app(settings), settings, host=host, port=port, log_level=log_level):
            raise typer.Exit(3)  # as uvicorn.run: the server did not start
        return
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        typer.echo(f"cannot listen on {host}:{port}: {exc}", err=True)
        raise typer.Exit(3) from None

    def worker(shared: socket.socket) -> bool:
        return serve_broker(create_app(settings), settings, host=host, port=port, log_level=log_level, sock=shared)

    typer.echo(f"serving on http://{host}:{sock.getsockname()[1]} with {count} worker processes", err=True)
    if not serve_workers(worker, sock, count):
        raise typer.Exit(3)


@app.command("migrate")
def migrate_cmd(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (Alembic) to the given revision."""
    from m2kt.broker.db import current_revision, ensure_sqlite_dir, head_revision, make_engine, upgrade
    from m2kt.broker.settings import Settings

    url = Settings().effective_database_url
    ensure_sqlite_dir(url)
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        upgrade(url, revision)
        after = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    if before == after:
        typer.echo(f"schema already at {after} (head is {head}); nothing to do")
    else:
        typer.echo(f"schema upgraded from {before or 'an empty database'} to {after} (head is {head})")


@app.command("create-bucket")
def create_bucket_cmd() -> None:
    """Create the S3 bucket M2KT_STORAGE_URL names, if it does not exist (docker-compose does this for you)."""
    from m2kt.broker.app import make_storage
    from m2kt.broker.settings import Settings
    from m2kt.broker.storage import StorageError

    storage = make_storage(Settings())
    try:
        created = storage.create()
        storage.check()
    except StorageError as exc:
        typer.echo(f"cannot create the storage: {exc}", err=True)
        raise typer.Exit(5) from None
    typer.echo(f"{'created' if created else 'already exists:'} {storage.description}")


@app.command("gc")
def gc_cmd(
    grace_seconds: Annotated[
        float | None, typer.Option(help="Only remove blobs older than this (default: M2KT_GC_GRACE_SECONDS).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be removed; remove nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Remove packet blobs no committed row points to, and abandoned staged uploads, after a grace period."""
    import json

    from m2kt.broker.app import make_storage
    from m2kt.broker.db import SchemaOutOfDate, check_schema, make_engine, make_sessionmaker
    from m2kt.broker.gc import collect_garbage
    from m2kt.broker.settings import Settings
    from m2kt.broker.storage import with_inline_blobs_found

    settings = Settings()
    engine = make_engine(settings.effective_database_url)
    try:
        check_schema(engine)
        storage = with_inline_blobs_found(make_storage(settings), engine, settings.inline_blob_max_bytes)
        grace = settings.gc_grace_seconds if grace_seconds is None else grace_seconds
        report = collect_garbage(make_sessionmaker(engine), storage, grace, dry_run=dry_run)
    except SchemaOutOfDate as exc:
        typer.echo(f"refusing to run: {exc}", err=True)
        raise typer.Exit(3) from None
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        verb = "would remove" if dry_run else "removed"
        typer.echo(
            f"scanned {report.scanned} blobs: {report.referenced} referenced, {report.young} younger than "
            f"{grace:g} s; {verb} {len(report.deleted)} orphans ({report.deleted_bytes} bytes) and "
            f"{report.unfinished_discarded} of {report.unfinished_seen} unfinished uploads in {report.seconds:.2f} s"
        )
        for err in report.errors:
            typer.echo(f"error: {err}", err=True)
    if report.errors:
        raise typer.Exit(1)
