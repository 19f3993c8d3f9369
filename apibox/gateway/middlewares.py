"""Request ids and error rendering: the outermost layer, and the only one that catches everything."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from apibox.errors import ApiboxError, RateLimited
from apibox.gateway.appkeys import SETTINGS
from apibox.openai_wire import error_body
from apibox.providers.base import UpstreamFailure

log = logging.getLogger("apibox.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID = web.RequestKey("request_id", str)
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RATE_LIMIT_HEADERS = web.RequestKey("rate_limit_headers", dict)
ERROR_CODE = web.RequestKey("error_code", str)  # the code of the error answered, for metrics and the access log
HTTP_ERROR_TYPES = {404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def speaks_anthropic(request: web.Request) -> bool:
    """Errors on the Anthropic surface use Anthropic's shape, which its SDK parses."""
    return request.path.startswith("/v1/messages")


def error_response(request: web.Request, status: int, message: str, type_: str, code: str | None = None,
                   param: str | None = None, *, retryable: bool = True,
                   retry_after: float | None = None) -> web.Response:
    request[ERROR_CODE] = code or type_
    if speaks_anthropic(request):
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body: dict = {"type": "error", "error": {"type": kind, "message": message},
                      "request_id": request.get(REQUEST_ID)}
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


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every response an ``x-request-id``, every error OpenAI's (or Anthropic's) error shape,
    and refuse work beyond the in-flight cap with 503 rather than queue it."""
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    in_flight = request.app[IN_FLIGHT]
    probe = request.path in PROBE_PATHS  # health checks and metrics must answer even when the gateway is saturated
    if not probe and in_flight.count >= request.app[SETTINGS].server.max_in_flight:
        return error_response(request, 503, "apibox is at its limit of requests in flight; retry shortly.",
                              "server_error", "overloaded", retry_after=1)
    in_flight.count += 1
    try:
        response = await handler(request)
    except ApiboxError as exc:
        response = render_error(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = render_http_exception(request, exc)
    except Exception:
        log.exception("unexpected error in %s %s (request %s)", request.method, request.path, request_id)
        response = error_response(
            request, 500, f"apibox hit an internal error; the operator can find it in the log under {request_id}.",
            "server_error", "internal_error")
    finally:
        in_flight.count -= 1
    return response


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones included, carries its request id."""
    response.headers["x-request-id"] = request.get(REQUEST_ID) or new_request_id()


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: OpenAI's x-ratelimit-* headers on every response to a limited key."""
    for name, value in (request.get(RATE_LIMIT_HEADERS) or {}).items():
        response.headers[name] = value
