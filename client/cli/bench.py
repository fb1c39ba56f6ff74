"""``m2kt bench``: the experiments of ``benchmarks/``, run from the command line.

m2kt bench transfer [--quick] [--seeds N] [--out DIR] [--p P] [--device auto|cpu|cuda] [--scenario NAME=KNOWN:EXPR …]
                    [--budgets 0,8,32,2%,…] [--no-loss-ablations]
m2kt bench real [--quick] [--seeds N] [--out DIR] [--cache DIR] [--device auto|cpu|cuda] [--directions T:S,…]
m2kt bench speed [--sizes 1,16,128] [--small 200] [--threads 8] [--runs 3] [--workers N] [--out DIR] [--baseline DIR]
                 [--broker-env M2KT_NAME=VALUE]
m2kt bench scale [--rows 1000000] [--topics 100] [--samples 100] [--out DIR]
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
            help="A new-operation scenario, e.g. a-2b=add,sub:a-2*b, or a default one by name (skill, "
            "composition); repeat; replaces the default scenarios.",
        ),
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option("--budgets", help="Budgets, e.g. 0,8,32,2%,100%: query counts or shares of the pool."),
    ] = None,
    no_loss_ablations: Annotated[
        bool,
        typer.Option("--no-loss-ablations", help="Skip the composite-loss ablations (the re-binding ones still run)."),
    ] = False,
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
    if budgets is not None:
        argv += ["--budgets", budgets]
    if no_loss_ablations:
        argv.append("--no-loss-ablations")
    raise typer.Exit(main(argv))


@bench_app.command("real")
def bench_real(
    quick: Annotated[bool, typer.Option("--quick", help="One seed instead of three.")] = False,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds (default 3, quick 1).")] = None,
    first_seed: Annotated[
        int, typer.Option("--first-seed", help="The first seed (later ones: a check on seeds not seen before).")
    ] = 0,
    out: Annotated[Path, typer.Option("--out", help="Where real.md, real.json and real.png go.")] = Path(
        "benchmarks/results"
    ),
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Where mpnet is assembled (default ~/.cache/m2kt/models).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    directions: Annotated[
        str, typer.Option("--directions", help="teacher:student pairs of minilm and mpnet.")
    ] = "mpnet:minilm,minilm:mpnet",
    general: Annotated[
        int,
        typer.Option(
            "--general",
            help="General anchors: public descriptions of sections in no concept set, for the route whose "
            "alignment later concept sets reuse (0: skip it).",
        ),
    ] = 1000,
    unlabelled: Annotated[
        int,
        typer.Option(
            "--unlabelled",
            help="The student's own unlabelled texts per concept set that the general route's concepts are "
            "refined on (m2kt-general-refined; 0: skip it).",
        ),
    ] = 900,
    no_cli: Annotated[
        bool, typer.Option("--no-cli", help="Skip the check that the CLI path gives the same numbers.")
    ] = False,
) -> None:
    """Real pretrained encoders on both sides (all-mpnet-base-v2, all-MiniLM-L6-v2) on Debian package
    descriptions by section: private M2KT (each alignment), word-list and general anchors, alignment reuse
    (also with concepts refined on the student's own unlabelled texts), against KD, the student's own labels
    and its oracle.

    Setup: apt-get update; apt-get install wamerican; then install this package with its 'real' extra."""
    try:
        from m2kt.benchmarks.real.run import main
    except ImportError as exc:
        fail(EXIT_USAGE, f"the real-model benchmark needs the real extra (pip install 'm2kt[real]'): {exc}")
    argv = ["--out", str(out), "--device", device, "--directions", directions, "--general", str(general)]
    argv += ["--unlabelled", str(unlabelled), "--first-seed", str(first_seed)]
    if cache is not None:
        argv += ["--cache", str(cache)]
    if quick:
        argv.append("--quick")
    if seeds is not None:
        argv += ["--seeds", str(seeds)]
    if no_cli:
        argv.append("--no-cli")
    try:
        code = main(argv)
    except RuntimeError as exc:  # a setup step missing: package lists, a model package
        fail(EXIT_USAGE, str(exc))
    raise typer.Exit(code)


@bench_app.command("speed")
def bench_speed(
    sizes: Annotated[str, typer.Option("--sizes", help="Large packet sizes in MiB, comma-separated ('' for none).")] = (
        "1,16,128"
    ),
    small: Annotated[int, typer.Option("--small", help="~2 KB packets per run and mode (0: skip).")] = 200,
    threads: Annotated[int, typer.Option("--threads", help="Concurrent publishers for the small packets.")] = 8,
    runs: Annotated[int, typer.Option("--runs", help="Runs per figure (median and min–max are reported).")] = 3,
    workers: Annotated[int, typer.Option("--workers", help="m2kt broker serve --workers for the broker.")] = 1,
    out: Annotated[Path | None, typer.Option("--out", help="Write broker_speed.md and broker_speed.json here.")] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="A directory holding an older m2kt package (e.g. from a git worktree) whose broker runs side by "
            "side: a before/after table from the same run.",
        ),
    ] = None,
    broker_env: Annotated[
        list[str] | None,
        typer.Option(
            "--broker-env",
            help="A broker setting for the current broker only (repeatable), e.g. M2KT_INLINE_BLOB_MAX_BYTES=65536; "
            "with --baseline of the same code, the setting's before/after.",
        ),
    ] = None,
) -> None:
    """Broker speed next to raw S3 in one run: small-packet publish rates, large publish/fetch throughput.

    Starts nanio, a fresh PostgreSQL database (M2KT_TEST_DATABASE_URL or the local one) and the broker as
    processes on loopback."""
    try:
        from m2kt.benchmarks.broker_speed import main
    except ImportError as exc:  # the broker or bench extras missing
        fail(EXIT_USAGE, f"the speed benchmark needs the broker and bench extras: {exc}")
    argv = ["--sizes", sizes, "--small", str(small), "--threads", str(threads), "--runs", str(runs)]
    argv += ["--workers", str(workers)]
    if out is not None:
        argv += ["--out", str(out)]
    if baseline is not None:
        argv += ["--baseline", str(baseline)]
    for setting in broker_env or []:
        argv += ["--broker-env", setting]
    raise typer.Exit(main(argv))


@bench_app.command("scale")
def bench_scale(
    rows: Annotated[
        int, typer.Option("--rows", help="Packets (and their events) seeded into the database.")
    ] = 1_000_000,
    topics: Annotated[int, typer.Option("--topics", help="Topics the seeded packets are spread over.")] = 100,
    samples: Annotated[int, typer.Option("--samples", help="Requests timed per kind and database.")] = 100,
    out: Annotated[Path | None, typer.Option("--out", help="Write broker_scale.md and broker_scale.json here.")] = None,
) -> None:
    """The broker on a fresh database and on one seeded with a million packets: publish, event page, lineage.

    Seeds PostgreSQL directly (M2KT_TEST_DATABASE_URL or the local one) and starts nanio and the broker."""
    try:
        from m2kt.benchmarks.broker_scale import main
    except ImportError as exc:
        fail(EXIT_USAGE, f"the scale benchmark needs the broker and bench extras: {exc}")
    argv = ["--rows", str(rows), "--topics", str(topics), "--samples", str(samples)]
    if out is not None:
        argv += ["--out", str(out)]
    raise typer.Exit(main(argv))
