"""The aiohttp application: ``create_app`` builds it, ``serve`` runs it until a signal."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import aiohttp
from aiohttp import web

from apibox.auth import Authenticator
from apibox.config import Settings
from apibox.errors import ConfigError, StoreUnavailable
from apibox.gateway import admin, anthropic, billing_api, metrics, openai, ops, responses
from apibox.gateway.appkeys import GATEWAY, SETTINGS, SUPERVISOR
from apibox.gateway.context import Gateway
from apibox.gateway.middlewares import IN_FLIGHT, InFlight, add_response_headers
from apibox.gateway.reload import reload_or_log
from apibox.gateway.sharing import open_sharing
from apibox.limits import FailedAuthLimiter
from apibox.providers import build_providers
from apibox.router import Router
from apibox.store import open_store
from apibox.store.base import Store

log = logging.getLogger("apibox.gateway")
HEARTBEAT_SECONDS = 10.0  # instances seen for longer than INSTANCE_STALE_MS (120 s) are taken for dead
REAP_EVERY_BEATS = 6  # look for dead instances' holds once a minute
GC_YOUNG_ALLOCATIONS = 50_000  # Python's default is 700 (settle_garbage_collector)


def create_app(settings: Settings, *, store: Store | None = None, session: aiohttp.ClientSession | None = None,
               clock: Callable[[], datetime] | None = None) -> web.Application:
    """The gateway app. Tests may pass their own store or upstream session instead of patching."""
    observed = metrics.Metrics()  # its own registry: two apps in one process never share counts
    app = web.Application(client_max_size=int(settings.server.max_body_mb * 1_000_000), middlewares=[
        metrics.observer(observed, access_log_json=settings.server.access_log == "json")])
    app[SETTINGS] = settings
    app[metrics.METRICS] = observed
    app[IN_FLIGHT] = InFlight()
    app.on_response_prepare.append(add_response_headers)
    app.cleanup_ctx.append(_lifecycle(settings, store, session, clock or _now))
    app.on_shutdown.append(_stopping)
    openai.add_routes(app)
    billing_api.add_routes(app)
    anthropic.add_routes(app)
    responses.add_routes(app)
    ops.add_routes(app)
    metrics.add_routes(app)
    admin.add_routes(app)
    return app


async def _stopping(app: web.Application) -> None:
    """The server has stopped taking requests, and drains those in flight (``server.shutdown_seconds``)."""
    gateway = app.get(GATEWAY)
    if gateway is not None:
        gateway.stopping = True


def _now() -> datetime:
    return datetime.now(UTC)


def _lifecycle(settings: Settings, store: Store | None, session: aiohttp.ClientSession | None,
               clock: Callable[[], datetime]) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        own_store = store is None
        db = store if store is not None else await open_store(settings.database.url,
                                                                 pool_size=settings.database.pool_size)
        await db.register_instance(f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}",
                                   socket.gethostname(), os.getpid())
        await _release_orphaned_holds(db)
        upstream = session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=True)
        failures = FailedAuthLimiter(settings.server.failed_auth_per_minute)
        auth = Authenticator(db, failures=failures)
        sharing = await open_sharing(settings, auth, app[metrics.METRICS],  # limits: in Redis or in this process
                                     on_config=lambda: reload_or_log(app[GATEWAY]))
        app[GATEWAY] = Gateway(
            settings=settings, store=db, session=upstream, providers=build_providers(settings, upstream),
            router=Router(settings), auth=auth, limiter=sharing.limiter, clock=clock,
            metrics=app[metrics.METRICS], notifier=sharing.notifier)
        beating = asyncio.create_task(_heartbeat(db))  # started last: nothing above can leave it running
        try:
            yield
        finally:
            await sharing.close()
            beating.cancel()
            try:
                await db.retire_instance()
            except StoreUnavailable as exc:  # its holds, if any, are reaped once it has been silent 2 minutes
                log.warning("could not retire this instance: %s", exc.message)
            if session is None:
                await upstream.close()
            if own_store:
                await db.close()
    return lifecycle


async def _release_orphaned_holds(db: Store) -> None:
    """Release the holds of gateways that stopped without settling (crashed, killed)."""
    recovered = await db.recover_holds()
    if recovered:
        log.warning("released %d holds left by a gateway that stopped without settling them; their requests "
                    "are logged as interrupted", len(recovered))


async def _heartbeat(db: Store) -> None:
    """Keep this instance's holds its own; now and then reap those of instances that died."""
    beats = 0
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        beats += 1
        try:
            await db.heartbeat()
            if beats % REAP_EVERY_BEATS == 0:
                await _release_orphaned_holds(db)
        except StoreUnavailable as exc:  # an outage: one line a beat, not a traceback
            log.warning("heartbeat failed (%s); retrying in %s s", exc.message, HEARTBEAT_SECONDS)
        except Exception:  # a database blip must not end the heartbeat for good
            log.exception("heartbeat failed; retrying in %s s", HEARTBEAT_SECONDS)


def settle_garbage_collector() -> None:
    """Once started: keep the collector off what lives as long as the process, and run it less often.

    Python's cyclic collector runs every 700 allocations and, in its older generations, walks
    every object there is: the modules, the config, the app. A request allocates hundreds of
    short-lived objects, so that was a collection every few requests, a few percent of the
    CPU. Everything alive once the gateway has started is frozen out of collections (it is
    still freed by reference counting), and the youngest generation is collected every 50,000
    allocations: a few dozen requests' worth, and only their reference cycles wait for it
    (7,000 cost 1.5% more latency at one connection, in alternating runs).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_ALLOCATIONS, *gc.get_threshold()[1:])


async def serve(settings: Settings, host: str, port: int, *, ready: Callable[[str], None] | None = None,
                reuse_port: bool = False, supervisor: int | None = None) -> None:
    """Run the gateway until SIGINT or SIGTERM, then finish in-flight requests and stop. SIGHUP
    reloads the config file (``gateway/reload.py``).

    ``reuse_port`` binds with SO_REUSEPORT, so several worker processes can share the port;
    ``supervisor``: their supervisor's process id (an admin reload asks it to reload them all).
    """
    app = create_app(settings)
    if supervisor is not None:
        app[SUPERVISOR] = supervisor
    # aiohttp waits for the requests in flight twice over: up to shutdown_timeout for them to end,
    # then as long again after telling them their request is gone (which a handler busy with its
    # upstream does not hear) before it cancels them. Half each: cut at server.shutdown_seconds.
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=settings.server.shutdown_seconds / 2)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=True if reuse_port else None)
    try:
        await site.start()
    except OSError as exc:  # the port taken, an address that is not this host's or not an address
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    settle_garbage_collector()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload_or_log(app[GATEWAY]))
    if ready is not None:
        ready(f"http://{host}:{port}")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
