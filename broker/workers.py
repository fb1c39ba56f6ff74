"""Several broker processes behind one port: the parent binds the socket, forks the workers, and waits.

Each worker is a whole broker (its own app, database pool, storage client and event hub) serving the
shared listening socket; the kernel hands each new connection to one of them. They share nothing in
memory, so everything that must hold across them already holds across replicas: blob locks are
Postgres advisory locks, pub/sub wake-ups go through LISTEN/NOTIFY, topic sequence numbers come from
the topic row. That is why workers need Postgres (the embedded SQLite broker keeps its locks and
wake-ups in one process) — :func:`check_workers` says so before anything starts.

What stays per process, and so multiplies by the number of workers: the connection cap
(``M2KT_MAX_CONNECTIONS``), the concurrent upload and stream slots, and the per-node upload rate
(``M2KT_UPLOAD_RATE_PER_MINUTE``, a token bucket in memory).

The parent forwards SIGTERM / SIGINT to every worker and exits when all have; a worker that dies is
not restarted (a process supervisor — systemd, Kubernetes, compose's ``restart:`` — restarts the whole
broker), and the parent then stops the others so the broker never runs short-handed unnoticed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from m2kt.broker.settings import Settings

__all__ = ["bind_socket", "check_workers", "serve_workers"]

log = logging.getLogger("m2kt.broker.workers")


def check_workers(settings: Settings, workers: int) -> str | None:
    """Why ``workers`` processes cannot serve with these settings (None: they can)."""
    if workers < 1:
        return "--workers must be at least 1"
    if workers > 1 and not settings.effective_database_url.startswith("postgresql"):
        return (
            "several workers need PostgreSQL (M2KT_DATABASE_URL=postgresql+psycopg://…): the embedded SQLite "
            "broker keeps its blob locks and event wake-ups inside one process"
        )
    return None


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` that forked workers can share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def serve_workers(run_worker: Callable[[socket.socket], bool], sock: socket.socket, workers: int) -> bool:
    """Fork ``workers`` processes that each call ``run_worker(sock)`` (build the app, serve until told to
    stop); wait for them. True when every worker started and stopped cleanly."""
    children: dict[int, int] = {}
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 3
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = 0 if run_worker(sock) else 3
            except BaseException:  # noqa: BLE001 - a worker reports and exits, it never returns into the parent
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        children[pid] = index
    log.info("serving with %d worker processes on %s (pids %s)", workers, _where(sock), sorted(children))
    sock.close()  # the workers hold it

    stopping: list[int] = []  # the signal the parent was told to stop with

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    clean = True
    try:
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping and code in (0, -signal.SIGTERM, -signal.SIGINT):
                continue  # uvicorn re-raises the stop signal it handled once it has shut down
            if code != 0:
                clean = False
                log.error("worker %d (pid %d) exited with %d; stopping the others", index, pid, code)
                if not stopping:
                    forward(signal.SIGTERM, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return clean


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"
