"""`apibox serve`: run the gateway, in this process or as several worker processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import replace
from typing import Annotated

import typer

from apibox.cli.common import ConfigOption, err_console, fail, handles_errors
from apibox.config import ServerSettings, Settings, load_settings, masked_url

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

log = logging.getLogger("apibox.workers")


def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default: from config).")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535,
                                             help="Port to listen on (default: from config, 8080).")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Processes sharing the port (SO_REUSEPORT, Linux); 1 serves in this process.")] = 1,
    config: ConfigOption = None,
    worker_fd: Annotated[int | None, typer.Option(
        "--worker-fd", hidden=True, help="Internal: run as one worker of `serve --workers N`.")] = None,
) -> None:
    """Run the gateway (applies pending migrations first). SIGHUP reloads the config file."""
    # A reload signal that arrives before the gateway is listening must not kill it (SIGHUP's default):
    # the gateway installs its own handler once it serves, and reads the file then anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Imported here, not with the module: the server stack (aiohttp, which builds its TLS
    # contexts as it is imported, and the gateway) took 0.3 s, which every other command paid too.
    from apibox.gateway.app import serve as serve_gateway
    from apibox.gateway.metrics import configure_access_log
    from apibox.gateway.workers import worker_ready

    if workers < 1:
        raise fail(f"--workers must be 1 or more, got {workers}")
    settings = load_settings(config)  # kept as the file says: a reload tells a changed host or port from it
    server = replace(settings.server, host=host or settings.server.host,
                     port=port if port is not None else settings.server.port)
    logging.basicConfig(level=logging.INFO, format=WORKER_LOG_FORMAT if worker_fd is not None else LOG_FORMAT)
    configure_access_log(settings.server.access_log == "json")

    if worker_fd is not None:  # one of several workers, started by `serve --workers N`
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve_gateway(settings, server.host, server.port, ready=worker_ready(worker_fd),
                                     reuse_port=True, supervisor=os.getppid()))
        return
    if workers > 1:
        raise typer.Exit(_supervise(settings, server, workers, config))

    def ready(url: str) -> None:
        err_console.print(f"apibox serving on {url}/v1 ({_describe(settings)})", soft_wrap=True)  # one line in a log

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_gateway(settings, server.host, server.port, ready=ready))


def _supervise(settings: Settings, server: ServerSettings, workers: int, config: str | None) -> int:
    """Start ``workers`` copies of this command on ``server``'s address and watch them; the exit code."""
    from apibox.gateway.workers import check_port_free, supervise

    if not hasattr(socket, "SO_REUSEPORT"):
        raise fail("--workers needs SO_REUSEPORT, which this platform lacks; run with --workers 1")
    if server.port == 0:
        raise fail("--workers needs a fixed port: with port 0 each worker would listen on a port of its own")
    check_port_free(server.host, server.port)
    if not getattr(settings, "redis", None):
        log.warning("no redis: section, so each of the %d workers keeps its own rate and concurrency limits "
                    "(a key's limits are enforced per worker, not in total)", workers)

    def command(fd: int) -> list[str]:
        return [sys.executable, "-m", "apibox", "serve", "--host", server.host, "--port", str(server.port),
                *(["--config", config] if config is not None else []), "--worker-fd", str(fd)]

    def ready() -> None:
        err_console.print(f"apibox serving on http://{server.host}:{server.port}/v1 with {workers} workers "
                          f"({_describe(settings)})", soft_wrap=True)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(supervise(command, workers, database_url=settings.database.url, ready=ready,
                                    drain_seconds=settings.server.shutdown_seconds))


def _describe(settings: Settings) -> str:
    models = ", ".join(m.name for m in settings.models) or "none"
    return f"config: {settings.source}; database: {masked_url(settings.database.url)}; models: {models}"


def _loop_factory():  # type: ignore[no-untyped-def]
    """uvloop when it is installed (it is optional), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def register(app: typer.Typer) -> None:
    app.command("serve")(handles_errors(serve))
