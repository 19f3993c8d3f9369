"""CORS for the API: a web page (a chat app calling with its user's key) may call ``/v1`` from a
browser, as it may call OpenAI's API, which answers any origin.

A key travels as a bearer token, never as a cookie, so a page allowed to send one gains nothing
it did not already hold; ``server.cors_origins`` narrows the pages allowed (or, empty, allows
none). The admin API, the probes and ``/metrics`` stay out of reach of pages.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from aiohttp import web

from apibox.gateway.appkeys import SETTINGS

API_PREFIX = "/v1/"
ALLOWED_METHODS = "GET, POST, OPTIONS"
DEFAULT_ALLOWED_HEADERS = "authorization, content-type"
PREFLIGHT_MAX_AGE = "86400"  # seconds a browser may keep a preflight's answer (Chromium caps it at 2 h)
# The answer headers a page's script may read: what the OpenAI and Anthropic SDKs look at.
EXPOSED_HEADERS = ", ".join(["x-request-id", "x-should-retry", "retry-after", "x-apibox-max-tokens",
                             *(f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens")
                               for what in ("limit", "remaining", "reset"))])


def allowed_origin(request: web.Request) -> str | None:
    """What ``Access-Control-Allow-Origin`` says to this request: None for a request from no page
    (no ``Origin``), outside the API, or from a page not allowed."""
    origin = request.headers.get("Origin")
    origins = request.app[SETTINGS].server.cors_origins
    if origin is None or not origins or not request.path.startswith(API_PREFIX):
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def preflight(request: web.Request) -> web.Response | None:
    """The answer to a browser's preflight (``OPTIONS`` asking ``Access-Control-Request-Method``)
    from an allowed page; None for any other request (a refused one gets the router's 405)."""
    if "Access-Control-Request-Method" not in request.headers:
        return None
    allowed = allowed_origin(request)
    if allowed is None:
        return None
    headers = {"Access-Control-Allow-Origin": allowed, "Access-Control-Allow-Methods": ALLOWED_METHODS,
               # the SDKs send headers of their own (x-stainless-*, anthropic-version): whatever was asked
               "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                   DEFAULT_ALLOWED_HEADERS),
               "Access-Control-Max-Age": PREFLIGHT_MAX_AGE}
    if allowed != "*":
        headers["Vary"] = "Origin"
    return web.Response(status=204, headers=headers)


def add_cors_headers(request: web.Request, headers: MutableMapping[str, str]) -> None:
    """An answer to an allowed page: which page may read it, and which of its headers."""
    allowed = allowed_origin(request)
    if allowed is None:
        return
    headers["Access-Control-Allow-Origin"] = allowed
    headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    if allowed != "*":
        headers["Vary"] = "Origin"
