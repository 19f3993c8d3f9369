"""What every provider offers the gateway: OpenAI-shaped requests in, OpenAI-shaped replies out.

A provider turns a normalized request (an OpenAI body whose ``model`` is already the
upstream's name) into an upstream call, and the reply or stream back into OpenAI shape.
Providers know nothing about billing; the gateway reads usage from what they return.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from apibox.errors import ApiboxError

ENDPOINTS = ("chat/completions", "completions", "embeddings")
REDACTED = "[redacted]"
WITHHELD = "[the upstream's message, withheld: it quoted a secret]"


@dataclass(slots=True)
class ProviderRequest:
    endpoint: str  # one of ENDPOINTS
    body: dict[str, Any]
    request_id: str
    headers: dict[str, str] = field(default_factory=dict)  # extra headers for the upstream
    output_limit: int | None = None  # the most output tokens the user's hold pays for

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


class ChunkStream(Protocol):
    """An open upstream stream: batches of OpenAI ``chat.completion.chunk`` (or text_completion)
    dicts, one batch per network read, so a batch can reach the client in one write."""

    def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]: ...
    async def aclose(self) -> None: ...


class WireBatch(list):  # type: ignore[type-arg]
    """A batch from an upstream's stream (OpenAI chunks, or Anthropic events passed through),
    kept close to the bytes that came.

    Items are parsed chunks or events, or a ``shapes.PlainRun`` for each run of them that only
    add text (not parsed at all); ``raw[i]`` is item ``i``'s ``data`` as the upstream sent it, on
    one line (None when it must not be passed on as it came, and for runs, which keep their own
    bytes). A renderer may send those bytes instead of serializing the item again; one that
    needs dicts calls ``PlainRun.parsed``. ``last``: the stream ended in the same read
    (``[DONE]``, ``message_stop``), so the batch may go out together with the answer's ending.
    """

    __slots__ = ("last", "raw")

    def __init__(self) -> None:  # list's own __init__ is not called: the list starts empty anyway
        self.raw: list[bytes | None] = []
        self.last = False


class Provider(Protocol):
    name: str
    # The wire format the upstream speaks natively ("openai", "anthropic", "gemini", "echo"):
    # a door in the same format may pass requests through untranslated.
    native_format: str
    # Whether a stream reports usage (so the gateway need not estimate it).
    reports_stream_usage: bool

    async def complete(self, request: ProviderRequest) -> dict[str, Any]:
        """A whole (non-streamed) reply in OpenAI shape, including ``usage``."""
        ...

    async def open_stream(self, request: ProviderRequest) -> ChunkStream:
        """Start a stream. Errors before the first byte raise UpstreamFailure from here."""
        ...

    async def close(self) -> None: ...


class UpstreamFailure(ApiboxError):
    """The upstream refused or failed; ``retryable`` says whether another route may succeed."""

    status, type, code = 502, "server_error", "upstream_error"

    def __init__(self, message: str, *, status: int = 502, upstream_status: int | None = None,
                 retryable: bool = True, retry_after: float | None = None, type_: str | None = None,
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.upstream_status = upstream_status
        self.retryable = retryable
        self.retry_after = retry_after
        if type_:
            self.type = type_


# What a translation raises on a field of a shape it cannot take (a number where a list belongs).
SHAPE_ERRORS = (AttributeError, TypeError, KeyError, IndexError, ValueError)


class Untranslatable(UpstreamFailure):
    """A request one route's translation cannot take: the request's fault (a 400 the client should
    not repeat, should no route take it), not the upstream's, so the route is not rested; a route
    of another format may still take it."""


@contextmanager
def translating_request(provider: str) -> Iterator[None]:
    """Around the translation of a client's request for an upstream: a field the translation cannot
    take (``"stop": 5``) raises Untranslatable, never what reads as the upstream's failure (a 502
    that would have the route rested)."""
    try:
        yield
    except SHAPE_ERRORS as exc:
        raise Untranslatable(f"the request cannot be translated for upstream {provider}: a field has a shape "
                             f"it cannot take ({type(exc).__name__}: {exc})", status=400, retryable=False,
                             type_="invalid_request_error", code="invalid_request") from None


class StreamBroken(Exception):
    """The upstream stream failed after it had started (cut, malformed, idle too long)."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Remove every secret from ``text`` (upstreams sometimes echo keys in their messages). A
    secret that is still there once whitespace is ignored (broken across lines, say) cannot be cut
    out cleanly: then none of the text is kept."""
    secrets = [secret for secret in secrets if secret and len(secret) >= 4]
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    squeezed = "".join(text.split())
    if any("".join(secret.split()) in squeezed for secret in secrets):
        return WITHHELD
    return text
