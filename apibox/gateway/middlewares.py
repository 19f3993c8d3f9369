"""Request ids and error rendering, for the one middleware (``gateway.metrics.observer``), which catches everything."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from apibox.errors import ApiboxError, RateLimited
from apibox.formats.anthropic import anthropic_error_type
from apibox.gateway.appkeys import SETTINGS
from apibox.gateway.cors import add_cors_headers
from apibox.gateway.exchange import EXCHANGE, new_request_id
from apibox.openai_wire import error_body
from apibox.providers.base import UpstreamFailure

log = logging.getLogger("apibox.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
HTTP_ERROR_TYPES = {404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def speaks_anthropic(request: web.Request) -> bool:
    """Errors on the Anthropic surface use Anthropic's shape, which its SDK parses."""
    return request.path.startswith("/v1/messages")


def error_response(request: web.Request, status: int, message: str, type_: str, code: str | None = None,
                   param: str | None = None, *, retryable: bool = True,
                   retry_after: float | None = None) -> web.Response:
    exchange = request[EXCHANGE]  # the observer gave it one before anything can fail
    exchange.error_code = code or type_
    if speaks_anthropic(request):
        body: dict = {"type": "error", "error": {"type": anthropic_error_type(status), "message": message},
                      "request_id": exchange.request_id}
    else:
        body = error_body(message, type_, code, param)
    headers = {}
    if not retryable:
        headers["x-should-retry"] = "false"
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def render_error(request: web.Request, exc: ApiboxError) -> web.Response:
    retry_after = exc.retry_after if isinstance(exc, RateLimited | UpstreamFailure) else None
    if retry_after is None and exc.status in (429, 503):  # so that the SDKs' backoff has a wait to keep
        retry_after = 1.0
    response = error_response(request, exc.status, exc.message, exc.type, exc.code, exc.param,
                              retryable=exc.retryable, retry_after=retry_after)
    if isinstance(exc, RateLimited):
        response.headers.update(exc.headers)
    return response


def render_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message = f"Unknown request URL: {request.method} {request.path}. See GET /v1/models and the apibox README."
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed on {request.path}."
    elif exc.status == 413:
        limit = request.app[SETTINGS].server.max_body_mb
        message = f"The request body is too large (the limit is {limit:g} MB)."
    else:
        message = exc.reason
    code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
    return error_response(request, exc.status, message, HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error"),
                          code, retryable=exc.status >= 500)


class InFlight:
    """Counts requests being served, to refuse new ones beyond ``server.max_in_flight``."""

    def __init__(self) -> None:
        self.count = 0


IN_FLIGHT = web.AppKey("in_flight", InFlight)


def overloaded(request: web.Request) -> web.Response:
    """The 503 for a request beyond ``server.max_in_flight``: refused rather than queued."""
    return error_response(request, 503, "apibox is at its limit of requests in flight; retry shortly.",
                          "server_error", "overloaded", retry_after=1)


def internal_error(request: web.Request) -> web.Response:
    request_id = request[EXCHANGE].request_id
    log.exception("unexpected error in %s %s (request %s)", request.method, request.path, request_id)
    return error_response(
        request, 500, f"apibox hit an internal error; the operator can find it in the log under {request_id}.",
        "server_error", "internal_error")


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones included, carries its request id, every
    response to a limited key OpenAI's x-ratelimit-* headers, and every API response to an allowed
    web page CORS's (one callback: each costs a coroutine)."""
    headers = response.headers
    if "Origin" in request.headers:  # from a web page
        add_cors_headers(request, headers)
    exchange = request.get(EXCHANGE)  # None for an answer aiohttp makes before the observer runs
    if exchange is None:
        headers["x-request-id"] = new_request_id()
        return
    headers["x-request-id"] = exchange.request_id
    if exchange.rate_limit_headers:
        for name, value in exchange.rate_limit_headers.items():
            headers[name] = value
