"""The admin dashboard: Swagger UI at ``/docs`` and ReDoc at ``/redoc``, served offline.

FastAPI's own pages load their JavaScript, CSS, favicon (and ReDoc its fonts) from CDNs, so on a
disconnected network they stay blank. Here every asset comes from the broker itself, under
``/docs/static/``: the Swagger UI and ReDoc bundles shipped by the ``fastapi-offline`` package (MIT;
Swagger UI is Apache-2.0, ReDoc MIT). The pages also carry a Content-Security-Policy that lets the
browser fetch nothing from any other origin.

Swagger UI shows the broker's bearer scheme (``token``, see :mod:`m2kt.broker.deps`): *Authorize* takes an
API token, which the page then sends with *Try it out*, so an admin can call admin routes from it.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
STATIC_URL = "/docs/static"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")

SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    "persistAuthorization": True,  # a pasted token survives a reload (kept in the browser's localStorage)
    "tryItOutEnabled": True,  # every operation opens ready to send
    "displayRequestDuration": True,
    "filter": True,  # a box that filters operations by tag
    "docExpansion": "list",
    "defaultModelsExpandDepth": 0,  # the schema list starts folded
    "validatorUrl": None,  # never ask validator.swagger.io about the spec
}

# Same-origin only. This also keeps ReDoc from fetching the Redocly logo in its sidebar from cdn.redoc.ly (it
# hides the image when blocked). Inline script/style: FastAPI's page starts Swagger UI from an inline script,
# and both UIs style elements inline; `blob:` workers: ReDoc's search index. No eval: neither UI needs it.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'self'",
        "base-uri 'self'",
    )
)


def assets_dir() -> Path:
    """The folder of Swagger UI and ReDoc files installed with ``fastapi-offline``; refuses a partial one."""
    spec = find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("the docs assets are missing: install the broker extra (pip install 'm2kt[broker]')")
    folder = Path(spec.origin).parent / "static"
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"the docs assets in {folder} lack {', '.join(missing)}")
    return folder


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    page.headers["Cache-Control"] = "no-cache"
    return page


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` and ReDoc at ``/redoc`` with their assets from ``/docs/static``.

    Build ``app`` with ``docs_url=None, redoc_url=None`` so that FastAPI's CDN pages are not there too."""
    if app.openapi_url is None:
        raise ValueError("the docs pages need the OpenAPI document (openapi_url)")
    folder = assets_dir()
    app.mount(STATIC_URL, StaticFiles(directory=folder), name="docs-static")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")  # behind a proxy that strips a prefix
        return f"{root}{app.openapi_url}", f"{root}{STATIC_URL}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, static = urls(request)
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} — admin dashboard",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
            oauth2_redirect_url=None,  # the bearer scheme needs no OAuth2 round trip
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        return _offline(page)

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi_url, static = urls(request)
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} — API reference",
            redoc_js_url=f"{static}/redoc.standalone.js",
            redoc_favicon_url=f"{static}/favicon.png",
            with_google_fonts=False,
        )
        return _offline(page)
