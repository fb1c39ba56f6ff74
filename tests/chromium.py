"""Headless Chromium (Debian's ``chromium`` package) for tests, its networking confined to loopback.

Two ways to drive it:

* :func:`render` — one page load with ``--dump-dom`` (and ``--screenshot``): the DOM after scripts ran,
  plus every request the page made, read from Chromium's own net log;
* :class:`DevTools` — a running browser on one page, scripted over the DevTools protocol (clicks, typing).

What "confined to loopback" means here: every URL but 127.0.0.1 goes to a proxy on a closed port
(``--proxy-server``), so an off-host request fails with ``ERR_PROXY_CONNECTION_FAILED`` (-130); and, should
anything bypass the proxy, no host name resolves (``--host-resolver-rules``: ``ERR_NAME_NOT_RESOLVED``). Note that
``--proxy-bypass-list=<-loopback>`` would do the opposite of what it looks like: it *removes* loopback from
the implicit bypass list and sends 127.0.0.1 to the dead proxy too.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.services import unavailable

CHROMIUM = Path(os.environ.get("M2KT_CHROMIUM", "/usr/bin/chromium"))
ERR_PROXY_CONNECTION_FAILED = -130
LOOPBACK_ONLY = (
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",  # the discard port: nothing listens there
    "--proxy-bypass-list=127.0.0.1",
)
HEADLESS = (
    "--headless=new",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--mute-audio",
)


def chromium() -> Path:
    """The browser, or skip (fail under CI=true) when it is not installed."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    return CHROMIUM


def command(url: str, profile: Path, *extra: str) -> list[str]:
    """The full command line: headless, loopback-only, a fresh profile, then ``extra`` and the URL."""
    return [str(chromium()), *HEADLESS, *LOOPBACK_ONLY, f"--user-data-dir={profile}", *extra, url]


@dataclass(frozen=True)
class Request:
    """One request from Chromium's net log."""

    url: str
    initiator: str  # the origin that asked; "not an origin" for a navigation or the browser's own requests
    kind: str  # "main frame" for a navigation, "other" for the rest
    net_error: int  # 0: it completed

    @property
    def off_host(self) -> bool:
        parts = urlsplit(self.url)
        return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != "127.0.0.1"


@dataclass(frozen=True)
class Page:
    dom: str
    requests: list[Request]

    @property
    def page_requests(self) -> list[Request]:
        """What the page asked for: its navigation and what an origin asked for since (not the browser's own
        update checks, account and autofill look-ups, which go to Google and are refused all the same)."""
        return [r for r in self.requests if r.kind == "main frame" or r.initiator.startswith(("http:", "https:"))]


def read_net_log(path: Path) -> list[Request]:
    """The URL requests in a ``--log-net-log`` file (one a browser killed mid-write is closed off first)."""
    text = path.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    started: dict[int, tuple[str, str, str]] = {}
    errors: dict[int, int] = {}
    for event in log["events"]:
        params, source = event.get("params") or {}, event["source"]["id"]
        if event["type"] == start_job and "url" in params:
            started.setdefault(source, (params["url"], params.get("initiator", ""), params.get("request_type", "")))
        if "net_error" in params:
            errors[source] = int(params["net_error"])
    return [Request(*started[source], errors.get(source, 0)) for source in started]


def render(
    url: str,
    workdir: Path,
    *,
    screenshot: Path | None = None,
    budget_ms: int = 10_000,
    window: tuple[int, int] = (1400, 1100),
    timeout: float = 60,
) -> Page:
    """Load ``url``, let its scripts run for ``budget_ms`` of virtual time, return the DOM and the requests."""
    workdir.mkdir(parents=True, exist_ok=True)
    net_log = workdir / "net-log.json"
    extra = [
        f"--log-net-log={net_log}",
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={window[0]},{window[1]}",
        "--dump-dom",
    ]
    if screenshot is not None:
        extra.append(f"--screenshot={screenshot}")
    argv = command(url, workdir / "profile", *extra)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return Page(done.stdout, read_net_log(net_log))


class DevTools:
    """A DevTools-protocol session with one page of a running (loopback-only) Chromium."""

    def __init__(self, websocket: Any) -> None:
        self._ws = websocket
        self._next = 0
        self._events: list[dict[str, Any]] = []

    def _receive(self, timeout: float) -> dict[str, Any]:
        message = json.loads(self._ws.recv(timeout=timeout))
        if "method" in message:
            self._events.append(message)
        return message

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next += 1
        self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            reply = self._receive(60)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def wait_for_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._events):
                if event["method"] == method:
                    return self._events.pop(i).get("params", {})
            self._receive(max(0.01, deadline - time.monotonic()))

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its load event."""
        self.call("Page.enable")
        self._events.clear()
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"{url}: {result['errorText']}")
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (a promise is awaited); a thrown error is raised here."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    @classmethod
    @contextmanager
    def open(cls, url: str, workdir: Path, window: tuple[int, int] = (1400, 1100)) -> Iterator[DevTools]:
        """Start Chromium with a DevTools port; yields a session with one page, loaded with ``url``."""
        from websockets.sync.client import connect

        profile = workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a port of an earlier run
        argv = command("about:blank", profile, "--remote-debugging-port=0", f"--window-size={window[0]},{window[1]}")
        with (workdir / "chromium.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            with connect(_page_target(_devtools_port(profile, proc)), max_size=None, open_timeout=20) as ws:
                session = cls(ws)
                session.navigate(url)
                yield session
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """Chromium writes the port it picked to ``DevToolsActivePort`` in its profile."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before opening its DevTools port")
        lines = marker.read_text().splitlines() if marker.is_file() else []
        if len(lines) >= 2:  # the port, then the browser's WebSocket path: the file is complete
            return int(lines[0])
        time.sleep(0.05)
    raise TimeoutError("chromium opened no DevTools port")


def _page_target(port: int, timeout: float = 20) -> str:
    """The DevTools WebSocket address of the browser's (one) page."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5, trust_env=False).json()
        for target in targets:
            if target.get("type") == "page":
                return target["webSocketDebuggerUrl"]
        time.sleep(0.05)
    raise TimeoutError("chromium shows no page")
