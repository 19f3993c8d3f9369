"""`apibox serve`: run the gateway."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Annotated

import typer

from apibox.cli.common import ConfigOption, err_console, handles_errors
from apibox.config import load_settings, masked_url
from apibox.gateway.app import serve as serve_gateway
from apibox.gateway.metrics import configure_access_log


def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default: from config).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default: from config, 8080).")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the gateway (applies pending migrations first)."""
    settings = load_settings(config)
    server = replace(settings.server, host=host or settings.server.host,
                     port=port if port is not None else settings.server.port)
    settings = replace(settings, server=server)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_access_log(settings.server.access_log == "json")

    def ready(url: str) -> None:
        models = ", ".join(m.name for m in settings.models) or "none"
        err_console.print(f"apibox serving on {url}/v1 (config: {settings.source}; database: "
                          f"{masked_url(settings.database.url)}; models: {models})")

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_gateway(settings, server.host, server.port, ready=ready))


def _loop_factory():  # type: ignore[no-untyped-def]
    """uvloop when it is installed (it is optional), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def register(app: typer.Typer) -> None:
    app.command("serve")(handles_errors(serve))
