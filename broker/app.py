"""Broker application factory. The routes arrive with the broker issue; this is the skeleton."""

from __future__ import annotations

from fastapi import FastAPI

from client import __version__


def create_app() -> FastAPI:
    """Build the broker's ASGI app."""
    app = FastAPI(title="M2KT broker", version=__version__)

    @app.get("/healthz", summary="Liveness probe", tags=["operations"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
