"""Liveness and readiness probes."""

from __future__ import annotations

import logging
import os

from aiohttp import web

from apibox.gateway.appkeys import GATEWAY

log = logging.getLogger("apibox.gateway")


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving; ``pid`` tells the workers of `serve --workers N` apart."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """The database answers, so requests can be billed."""
    try:
        await request.app[GATEWAY].store.ping()
    except Exception as exc:  # any failure means "not ready"; the reason goes to the log
        log.warning("readiness check failed: %s", exc)
        return web.json_response({"status": "unavailable", "database": "error"}, status=503)
    return web.json_response({"status": "ok", "database": "ok"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
