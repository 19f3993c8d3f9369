"""Observability on the request path: the ``observer`` middleware, the ``/metrics`` page, and where
the JSON access log goes.

The ``observer`` wraps every request (it is the only middleware) and gives it an ``Exchange``
(``gateway.exchange``), which handlers tell what they learn: who called (``authenticate``),
which model (``forward``), the billed call with its hold and settlement. When the answer is
done, and the settlement written, the request is counted once and, with ``server.access_log:
json``, logged as one JSON line on the ``apibox.access`` logger.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from apibox.errors import ApiboxError
from apibox.gateway.appkeys import SETTINGS
from apibox.gateway.cors import preflight
from apibox.gateway.exchange import EXCHANGE, Exchange, access_log
from apibox.gateway.middlewares import (
    IN_FLIGHT,
    PROBE_PATHS,
    Handler,
    internal_error,
    overloaded,
    render_error,
    render_http_exception,
)
from apibox.metrics import Metrics

METRICS = web.AppKey("metrics", Metrics)
# Paths that are not API requests: not counted, not in flight (they are still access-logged).
UNCOUNTED_PATHS = PROBE_PATHS
CLIENT_GONE = 499  # nginx's status for a client that closed the connection; usage rows use it too


def observer(metrics: Metrics, *, access_log_json: bool) -> Any:
    """The gateway's one middleware. Each request gets its id and its Exchange; work beyond
    ``server.max_in_flight`` is refused with 503 rather than queued; every error gets OpenAI's (or
    Anthropic's) shape; the request is counted and logged when its answer is done. One middleware
    rather than two: each layer costs a coroutine and a call on every request."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        exchange = request[EXCHANGE] = Exchange(metrics)
        counted = request.path not in UNCOUNTED_PATHS  # probes and /metrics answer even when saturated
        if counted:
            metrics.in_flight_count += 1
        status = 500
        try:
            in_flight = request.app[IN_FLIGHT]
            if counted and in_flight.count >= request.app[SETTINGS].server.max_in_flight:
                response = overloaded(request)
            elif request.method == "OPTIONS" and (answer := preflight(request)):
                response = answer  # a browser asking whether its page may call the API
            else:
                in_flight.count += 1
                try:
                    response = await handler(request)
                except ApiboxError as exc:
                    response = render_error(request, exc)
                except web.HTTPException as exc:
                    if exc.status < 400:
                        raise
                    response = render_http_exception(request, exc)
                    # aiohttp's router keeps the 404 or 405 it raises in the request's match info,
                    # and the traceback holds the frame that holds the match info: a reference
                    # cycle a request, for the cyclic collector, unless the answered error drops it
                    exc.__traceback__ = None
                except ConnectionResetError:  # the client left before its request was read: nobody to answer
                    response = web.Response(status=CLIENT_GONE)
                except Exception:
                    response = internal_error(request)
                finally:
                    in_flight.count -= 1
            status = response.status
            return response
        except web.HTTPException as exc:  # redirects
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            if counted:
                metrics.in_flight_count -= 1
            exchange.finish(request, status, counted, access_log_json)

    return observe


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus's scrape target; open like the health probes (no key), and not itself counted."""
    response = web.Response(body=request.app[METRICS].exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_page)


def configure_access_log(enabled: bool) -> None:
    """For `apibox serve`: the access log's lines go to stdout as they are, one JSON object each
    (the gateway's other messages go to stderr)."""
    if not enabled or any(getattr(h, "apibox_access", False) for h in access_log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.apibox_access = True  # type: ignore[attr-defined]
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
