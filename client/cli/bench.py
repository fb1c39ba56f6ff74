"""``m2kt bench``: the experiments of ``benchmarks/``, run from the command line.

m2kt bench transfer [--quick] [--seeds N] [--out DIR] [--p P] [--device auto|cpu|cuda] [--scenario NAME=KNOWN:EXPR …]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m2kt.cli.app import EXIT_USAGE, app, fail

bench_app = typer.Typer(help="Run the benchmarks (needs the node extra: torch; the plot needs matplotlib).")
app.add_typer(bench_app, name="bench")


@bench_app.command("transfer")
def bench_transfer(
    quick: Annotated[
        bool, typer.Option("--quick", help="One run, fewer budgets: under 10 minutes on 2 CPU cores.")
    ] = False,
    seeds: Annotated[
        int | None, typer.Option("--seeds", help="Runs (pair i mod 3, seed i); default 3, quick 1.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where transfer.md, transfer.json and transfer.png go.")] = Path(
        "benchmarks/results"
    ),
    p: Annotated[int, typer.Option("--p", help="The modulus of the symbolic tasks (vocabulary and task size).")] = 23,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            "--scenario",
            metavar="NAME=KNOWN:EXPR",
            help="A new-operation scenario, e.g. a-2b=add,sub:a-2*b (repeat); replaces the default scenarios.",
        ),
    ] = None,
) -> None:
    """Teacher → student transfer: M2KT against KD, labelled fine-tuning and baselines, per data budget.

    The default scenarios are concept (renaming), skill (a sub core receives a+b) and composition (an
    add/sub core receives a+2b); --scenario runs others, from the command line, with no code change."""
    try:
        from m2kt.benchmarks.transfer.run import main
    except ImportError as exc:  # torch or matplotlib missing
        fail(EXIT_USAGE, f"the transfer benchmark needs the node extra and matplotlib: {exc}")
    argv = ["--out", str(out), "--p", str(p), "--device", device]
    if quick:
        argv.append("--quick")
    if seeds is not None:
        argv += ["--seeds", str(seeds)]
    for spec in scenario or ():
        argv += ["--scenario", spec]
    raise typer.Exit(main(argv))
