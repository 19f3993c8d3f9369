"""Observability on the request path: the ``/metrics`` page, request metrics and the JSON access log.

The ``observer`` middleware wraps every request (it is the only one). Handlers tell the
request's ``Exchange`` what they learn: who called (``authenticate``), which model
(``forward``), the billed call with its hold and settlement. When the answer is done, and
the settlement written, the request is counted once and, with ``server.access_log: json``,
logged as one JSON line on the ``apibox.access`` logger. The log holds metadata only: never a
key, a prompt, a body or a query string.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from apibox import jsoncodec
from apibox.auth import Caller
from apibox.errors import ApiboxError
from apibox.gateway.appkeys import SETTINGS
from apibox.gateway.middlewares import (
    ERROR_CODE,
    IN_FLIGHT,
    PROBE_PATHS,
    REQUEST_ID,
    Handler,
    internal_error,
    new_request_id,
    overloaded,
    render_error,
    render_http_exception,
)
from apibox.keys import KEY_PREFIX
from apibox.metrics import Metrics
from apibox.models import UsageRecord

if TYPE_CHECKING:
    from apibox.gateway.proxy import Call

METRICS = web.AppKey("metrics", Metrics)
access_log = logging.getLogger("apibox.access")
# Paths that are not API requests: not counted, not in flight (they are still access-logged).
UNCOUNTED_PATHS = PROBE_PATHS
MAX_LOGGED_PATH = 200
CLIENT_GONE = 499  # nginx's status for a client that closed the connection; usage rows use it too
_KEY_IN_PATH = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]*")


@dataclass(slots=True)
class Exchange:
    """What is known about one request as it is served, for its metrics and its access-log line."""

    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    arrived: float = field(default_factory=time.time)
    model: str | None = None  # the configured model it resolved to
    user_id: int | None = None
    key_id: int | None = None
    call: Call | None = None  # the billed call, once its hold is taken

    def identified(self, caller: Caller) -> None:
        self.user_id, self.key_id = caller.user.id, caller.key.id

    def holding(self, call: Call) -> None:
        """A hold was taken: the request holds money until its settlement is written."""
        self.call = call
        self.metrics.holding(call.reservation.hold.amount)

    def finish(self, request: web.Request, status: int, counted: bool, log: bool) -> None:
        """Count and log the request once its answer is done and its settlement written."""
        seconds = time.monotonic() - self.started
        facts = (request.method, request.path, request.get(REQUEST_ID), request.get(ERROR_CODE))
        settlement = self.call.settlement if self.call is not None else None
        if settlement is not None and not settlement.done():  # a client gone mid-stream: settled later
            settlement.add_done_callback(lambda _: self._finished(facts, status, seconds, counted, log))
        else:
            self._finished(facts, status, seconds, counted, log)

    def _finished(self, facts: tuple[str, str, str | None, str | None], status: int, seconds: float,
                  counted: bool, log: bool) -> None:
        method, path, request_id, code = facts
        record = self._record()
        provider = ""
        if self.call is not None:
            self.metrics.released(self.call.reservation.hold.amount)
            provider = self.call.route.provider if self.call.route is not None else ""
        if record is not None:
            status = record.http_status  # what the usage row says: 499 client gone, 502 stream broken
            self.metrics.settled(record)
        if counted:
            self.metrics.answered(self.model or "", provider, status, seconds, code)
        if log and access_log.isEnabledFor(logging.INFO):
            access_log.info("%s", jsoncodec.dumps(self._line(method, path, request_id, code, status, seconds,
                                                             provider, record)).decode())

    def _record(self) -> UsageRecord | None:
        settlement = self.call.settlement if self.call is not None else None
        if settlement is None or settlement.cancelled() or settlement.exception() is not None:
            return None
        return settlement.result()

    def _line(self, method: str, path: str, request_id: str | None, code: str | None, status: int,
              seconds: float, provider: str, record: UsageRecord | None) -> dict[str, Any]:
        return {
            "time": datetime.fromtimestamp(self.arrived, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "request_id": request_id,
            "method": method,
            "path": logged_path(path),
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "model": self.model,
            "provider": provider or None,
            "user_id": self.user_id,
            "key_id": self.key_id,
            "error": code,
            "outcome": record.status if record else None,
            "prompt_tokens": record.prompt_tokens if record else None,
            "completion_tokens": record.completion_tokens if record else None,
            "cached_tokens": record.cached_tokens if record else None,
            "cost_micro_usd": record.cost if record else None,
            "charged_micro_usd": record.charged if record else None,
        }


EXCHANGE = web.RequestKey("exchange", Exchange)


def logged_path(path: str) -> str:
    """The path as logged: without anything shaped like an apibox key, and not too long."""
    return _KEY_IN_PATH.sub(KEY_PREFIX + "[redacted]", path[:MAX_LOGGED_PATH])


def observer(metrics: Metrics, *, access_log_json: bool) -> Any:
    """The gateway's one middleware. Each request gets its id and its Exchange; work beyond
    ``server.max_in_flight`` is refused with 503 rather than queued; every error gets OpenAI's (or
    Anthropic's) shape; the request is counted and logged when its answer is done. One middleware
    rather than two: each layer costs a coroutine and a call on every request."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        exchange = request[EXCHANGE] = Exchange(metrics)
        request_id = request[REQUEST_ID] = new_request_id()
        counted = request.path not in UNCOUNTED_PATHS  # probes and /metrics answer even when saturated
        if counted:
            metrics.in_flight_count += 1
        status = 500
        try:
            in_flight = request.app[IN_FLIGHT]
            if counted and in_flight.count >= request.app[SETTINGS].server.max_in_flight:
                response = overloaded(request)
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
                except ConnectionResetError:  # the client left before its request was read: nobody to answer
                    response = web.Response(status=CLIENT_GONE)
                except Exception:
                    response = internal_error(request, request_id)
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
