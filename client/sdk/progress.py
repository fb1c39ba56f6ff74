"""Progress bars for large transfers: shown on a terminal, silent otherwise or when quiet."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PROGRESS_THRESHOLD = 8 << 20  # bytes; smaller transfers never draw a bar


@contextmanager
def transfer_progress(description: str, total: int | None, *, quiet: bool) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n_bytes)``; draws a rich progress bar on stderr when it is worth it."""
    if quiet or not sys.stderr.isatty() or (total is not None and total < PROGRESS_THRESHOLD):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
