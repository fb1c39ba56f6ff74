"""The admin dashboard — Swagger UI at /docs, ReDoc at /redoc — works offline: the broker serves every asset.

The browser tests run Debian's headless Chromium with its networking confined to loopback (tests/chromium.py);
they skip where it is not installed, and fail under CI=true (.ci/run installs it). Regenerate the committed
screenshot with

    M2KT_DOCS_SCREENSHOT=docs/dashboard.png pytest tests/test_docs_offline.py -k swagger_ui
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from fastapi import FastAPI

from m2kt.benchmarks.harness.brokers import uvicorn_thread
from m2kt.broker.app import create_app
from m2kt.broker.settings import Settings
from tests.chromium import ERR_PROXY_CONNECTION_FAILED, DevTools, Page, render

ROOT = Path(__file__).resolve().parents[1]
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
ADMIN_OPERATION = "operations-admin-stats_v1_admin_stats_get"  # GET /v1/admin/stats, admin scope


@dataclass(frozen=True)
class Broker:
    url: str
    admin_token: str
    openapi: dict[str, Any]

    def operations(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(METHOD, path) → operation, for every operation in the OpenAPI document."""
        return {(m.upper(), p): op for p, ops in self.openapi["paths"].items() for m, op in ops.items()}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The embedded default broker (SQLite and files), served on loopback."""
    data_dir = tmp_path_factory.mktemp("docs-broker")
    with uvicorn_thread(create_app(Settings(data_dir=data_dir))) as url:
        token = (data_dir / "admin-token").read_text().strip()
        yield Broker(url, token, httpx.get(f"{url}/openapi.json").json())


# -- over plain HTTP -----------------------------------------------------------------------------------


def references(html: str) -> list[str]:
    """Every URL a page names: src/href/spec-url attributes and Swagger UI's ``url: '…'``."""
    return re.findall(r'(?:src|href|spec-url)="([^"]*)"', html) + re.findall(r"\burl: '([^']*)'", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_name_only_same_origin_assets(broker: Broker, page: str) -> None:
    r = httpx.get(broker.url + page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert not re.search(r"https?://|//fonts\.", r.text), "the page names an absolute URL"
    urls = references(r.text)
    assert len(urls) >= 3, urls  # script, favicon, the OpenAPI document (+ the stylesheet for Swagger UI)
    for ref in urls:
        url = urljoin(broker.url + page, ref)
        assert urlsplit(url).netloc == urlsplit(broker.url).netloc, ref
        asset = httpx.get(url)
        assert asset.status_code == 200, (ref, asset.status_code)
        expected = CONTENT_TYPES[Path(urlsplit(url).path).suffix or ".json"]
        assert expected in asset.headers["content-type"], (ref, asset.headers["content-type"])
        assert len(asset.content) > 1000, ref


def test_docs_sit_outside_the_api_and_its_guard(broker: Broker) -> None:
    schemes = broker.openapi["components"]["securitySchemes"]
    assert schemes["token"] == schemes["token"] | {"type": "http", "scheme": "bearer"}
    assert not any(p.startswith(("/docs", "/redoc")) for p in broker.openapi["paths"])
    assert httpx.get(f"{broker.url}/v1/admin/stats").status_code == 401  # the guard still stands before /v1
    missing = httpx.get(f"{broker.url}/docs/static/nothing-here.js")
    assert missing.status_code == 404 and missing.json() == {"code": "not_found", "message": "Not Found"}


# -- in headless Chromium ------------------------------------------------------------------------------


class Operations(HTMLParser):
    """Swagger UI's rendered operations: (METHOD, path) → whether the operation shows a lock."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[tuple[str, str], bool] = {}
        self._method: str | None = None
        self._current: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "div" and "opblock" in classes and a.get("id", "").startswith("operations-"):
            self._method = next(c.removeprefix("opblock-") for c in classes if c.startswith("opblock-")).upper()
        elif "opblock-summary-path" in classes and self._method and a.get("data-path"):
            self._current = (self._method, a["data-path"])
            self.found[self._current] = False
        elif tag == "button" and "authorization__btn" in classes and self._current:
            self.found[self._current] = True


class Headings(HTMLParser):
    """The text of every ``<h2>`` (ReDoc's operation headings)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2":
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2" and self._text is not None:
            self.texts.append("".join(self._text).strip())
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def assert_stayed_on_host(page: Page, url: str) -> None:
    """The page asked for something, all of it from the broker, and got it."""
    asked = page.page_requests
    assert asked, "the net log holds none of the page's requests"
    assert [r.url for r in asked if r.off_host] == []
    assert all(urlsplit(r.url).netloc == urlsplit(url).netloc and r.net_error == 0 for r in asked), asked


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_swagger_ui_renders_offline(broker: Broker, tmp_path: Path) -> None:
    screenshot = tmp_path / "dashboard.png"
    page = render(f"{broker.url}/docs", tmp_path / "chromium", screenshot=screenshot)

    parsed = Operations()
    parsed.feed(page.dom)
    operations = broker.operations()
    assert set(parsed.found) == set(operations), "Swagger UI did not render every operation"
    assert parsed.found[("POST", "/v1/topics/{topic}/packets")]
    for key, locked in parsed.found.items():  # the lock on exactly the operations that need a token
        assert locked == bool(operations[key].get("security")), key
    assert re.search(r'<button class="btn authorize[^"]*"><span>Authorize</span>', page.dom)
    assert 'placeholder="Filter by tag"' in page.dom
    assert_stayed_on_host(page, broker.url)
    assert {urlsplit(r.url).path for r in page.page_requests} >= {
        "/docs",
        "/openapi.json",
        "/docs/static/swagger-ui.css",
    }

    assert png_size(screenshot) == (1400, 1100)
    if target := os.environ.get("M2KT_DOCS_SCREENSHOT"):
        shutil.copyfile(screenshot, ROOT / target)


def test_redoc_renders_offline(broker: Broker, tmp_path: Path) -> None:
    page = render(f"{broker.url}/redoc", tmp_path / "chromium")
    headings = Headings()
    headings.feed(page.dom)
    summaries = {op["summary"] for op in broker.operations().values()}
    assert summaries <= set(headings.texts), summaries - set(headings.texts)
    assert_stayed_on_host(page, broker.url)
    # ReDoc's sidebar shows Redocly's logo from cdn.redoc.ly: the page's Content-Security-Policy keeps it unasked.
    assert not any("redoc.ly" in r.url for r in page.requests)


def test_a_cdn_page_does_not_render_in_this_browser(tmp_path: Path) -> None:
    """The control: FastAPI's stock /docs (assets from cdn.jsdelivr.net) stays blank, its CDN requests refused."""
    stock = FastAPI(title="stock docs")

    @stock.get("/v1/ping")
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    with uvicorn_thread(stock) as url:
        page = render(f"{url}/docs", tmp_path / "chromium", budget_ms=3000)
    assert "opblock" not in page.dom and 'id="swagger-ui"' in page.dom  # the page loaded; Swagger UI did not
    cdn = [r for r in page.page_requests if r.off_host]
    assert {urlsplit(r.url).hostname for r in cdn} >= {"cdn.jsdelivr.net"}
    assert {r.net_error for r in cdn} == {ERR_PROXY_CONNECTION_FAILED}


FIND = """
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const find = async (selector, root = document, ms = 15000) => {
    for (const t0 = Date.now(); Date.now() - t0 < ms; await sleep(50)) {
      const found = root.querySelector(selector);
      if (found) return found;
    }
    throw new Error(`nothing matches ${selector}`);
  };
"""

AUTHORISE_AND_CALL = """
  (await find(".auth-wrapper .btn.authorize")).click();
  const input = await find(".modal-ux #auth-bearer-value");
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(input, token);
  input.dispatchEvent(new Event("input", { bubbles: true }));  // as if typed: React sees it
  (await find(".modal-ux button[type=submit].authorize")).click();
  (await find(".modal-ux button.btn-done")).click();
  await find(".auth-wrapper .btn.authorize.locked");
  const op = await find("#" + operation);
  (await find(".opblock-summary-control", op)).click();
  (await find("button.execute", op)).click();  // tryItOutEnabled: no "Try it out" click first
  const status = await find(".live-responses-table .response .response-col_status", op);
  const body = await find(".live-responses-table .response-col_description pre", op);
  const curl = op.querySelector(".curl-command").textContent;
  return { status: status.textContent.trim(), body: body.textContent, curl };
"""


def script(body: str, **values: Any) -> str:
    """An async JavaScript function around ``body``, with FIND and ``values`` as constants, called."""
    constants = "".join(f"const {name} = {json.dumps(value)};\n" for name, value in values.items())
    return f"(async () => {{{FIND}{constants}{body}}})()"


def test_an_admin_authorises_and_calls_an_admin_route_from_the_page(broker: Broker, tmp_path: Path) -> None:
    with DevTools.open(f"{broker.url}/docs", tmp_path / "chromium") as browser:
        result = browser.evaluate(script(AUTHORISE_AND_CALL, token=broker.admin_token, operation=ADMIN_OPERATION))
        assert result["status"] == "200", result
        assert json.loads(result["body"])["nodes"] == {"admin": 1}
        assert f"Authorization: Bearer {broker.admin_token}" in result["curl"]
        browser.navigate(f"{broker.url}/docs")  # persistAuthorization: still authorised after a reload
        assert browser.evaluate(script("return !!(await find('.auth-wrapper .btn.authorize.locked'));"))
