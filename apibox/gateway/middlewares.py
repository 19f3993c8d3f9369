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
HTTP_ERROR_TYPES = {404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def error_response(status: int, body: dict, *, retryable: bool = True,
                   retry_after: float | None = None) -> web.Response:
    headers = {}
    if not retryable:
        headers["x-should-retry"] = "false"
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def render_error(exc: ApiboxError) -> web.Response:
    retry_after = exc.retry_after if isinstance(exc, RateLimited | UpstreamFailure) else None
    return error_response(exc.status, exc.to_openai(), retryable=exc.retryable, retry_after=retry_after)


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
    body = error_body(message, HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error"), code)
    return error_response(exc.status, body, retryable=exc.status >= 500)


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every response an ``x-request-id`` and every error OpenAI's error shape."""
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except ApiboxError as exc:
        response = render_error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = render_http_exception(request, exc)
    except Exception:
        log.exception("unexpected error in %s %s (request %s)", request.method, request.path, request_id)
        response = error_response(500, error_body(
            f"apibox hit an internal error; the operator can find it in the log under {request_id}.",
            "server_error", "internal_error"))
    return response


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones included, carries its request id."""
    response.headers["x-request-id"] = request.get(REQUEST_ID) or new_request_id()
