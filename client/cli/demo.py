"""``m2kt demo``: the whole loop — broker, teacher, packet, student — on this machine (client/demo.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from m2kt.cli.app import EXIT_REFUSED, EXIT_USAGE, app, fail


@app.command()
def demo(
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="Use this broker (needs an admin token) instead of starting the embedded one."),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Admin token for --broker (default: $M2KT_TOKEN).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where keys, packets, weights and reports go.")] = Path(
        "m2kt-demo"
    ),
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    steps: Annotated[int, typer.Option("--steps", min=0, help="Ingestion steps (Algorithm 2).")] = 50,
) -> None:
    """Train a teacher, publish its signed knowledge packet, and let a student fetch, verify and ingest it."""
    try:
        from m2kt.demo import DemoError, run_demo
    except ImportError as exc:
        fail(EXIT_USAGE, f"the demo needs the node and broker extras (pip install 'm2kt[all]'): {exc}")
    if broker is None:
        try:
            import m2kt.broker as _  # noqa: F401
        except ImportError:
            fail(EXIT_USAGE, "no broker installed here: pip install 'm2kt[broker]', or pass --broker URL")
    try:
        report = run_demo(
            out,
            broker_url=broker,
            admin_token=token or os.environ.get("M2KT_TOKEN"),
            device=device,
            steps=steps,
            say=lambda line: typer.echo(line, err=True),
        )
    except DemoError as exc:
        fail(EXIT_REFUSED, f"demo failed: {exc}")
    typer.echo("\nM2KT demo: the student learned 'plus' and 'minus' from the teacher's packet\n")
    for line in report.lines():
        typer.echo(line)
    if report.decision != "accepted":
        fail(EXIT_REFUSED, f"the student's verifier did not accept the packet ({report.decision})")
