"""What every HTTP upstream shares: posting with timeouts, mapping error statuses, reading SSE.

Provider modules only say where to post, which headers to send and how to translate bodies.
Every message built here is cleaned of the provider's secrets first, because upstreams do
echo keys back in their errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from apibox import jsoncodec
from apibox.config import ProviderSettings
from apibox.deadlines import Deadlines
from apibox.providers.base import StreamBroken, UpstreamFailure, WireBatch, redact
from apibox.shapes import ChunkShape, LatestShapes, PlainRun
from apibox.sse import Event, EventTooLarge, SSEDecoder

T = TypeVar("T")
# How a connection the upstream had already closed fails a request sent on it (reset or not answered).
CLOSED_UNDER_US = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
BODY_END_GRACE_SECONDS = 1.0  # how long after a stream's last event its body's end may take to come


# Keys of an answer (OpenAI's chat, completions, embeddings and Responses objects, Anthropic's
# message, Gemini's reply): a body with none of them and an ``error`` is an error, whatever its status.
# (Not ``id``: some proxies give their errors one.)
ANSWER_KEYS = frozenset({"choices", "data", "candidates", "content", "output"})
# The longest wait passed on to clients: the official SDKs honour a retry-after up to 60 s, and
# give up at once beyond it.
RETRY_AFTER_MOST = 60.0


class HttpUpstream:
    """One upstream account reached over HTTP through the shared session."""

    def __init__(self, settings: ProviderSettings, session: aiohttp.ClientSession, headers: Mapping[str, str]) -> None:
        self.name = settings.name
        self.settings = settings
        self._session = session
        self._headers = {"Content-Type": "application/json", **headers, **settings.headers}
        self._proxy = settings.proxy
        proxy_password = urlsplit(settings.proxy).password if settings.proxy else None
        self._secrets = (settings.api_key, *settings.headers.values(), *headers.values(), proxy_password)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeouts.connect)
        # the first-byte and idle timeouts of every request, and the waits for a stream's body's end, on one timer
        self._deadlines = Deadlines()

    def clean(self, text: str) -> str:
        return redact(text, self._secrets)

    async def send(self, url: str, body: dict[str, Any] | None, headers: Mapping[str, str],
                   method: str = "POST") -> aiohttp.ClientResponse:
        """Send (a POST of ``body``, unless told otherwise) and wait for the response head; an
        error status raises UpstreamFailure.

        A connection from the pool that the upstream closed as the request went out (its keep-alive
        ran out: five seconds on uvicorn and Node, so on vLLM) fails before any answer; the request
        is then sent once more, on another connection. Sent every 0.1 s to a server that keeps a
        connection 0.1 s, 63 requests in 300 failed so, each a 503 for its client, before this."""
        wait = self.settings.timeouts.first_byte
        data, all_headers = jsoncodec.dumps(body) if body is not None else None, {**self._headers, **headers}
        try:
            with self._deadlines.timeout(wait):
                try:
                    response = await self._send(method, url, data, all_headers)
                except CLOSED_UNDER_US as exc:
                    if isinstance(exc, aiohttp.ClientConnectorError):
                        raise  # no connection was made: the upstream is not there
                    response = await self._send(method, url, data, all_headers)
        except TimeoutError:
            raise UpstreamFailure(f"upstream {self.name} did not answer within {wait:g}s", status=504,
                                  code="upstream_timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(f"cannot reach upstream {self.name}: {self.clean(type(exc).__name__)}",
                                  status=503, code="upstream_unavailable") from None
        if response.status >= 400:
            try:
                raise await self._failure(response)
            finally:
                response.release()
        return response

    def _send(self, method: str, url: str, data: bytes | None, headers: dict[str, str]) -> Any:
        """The request itself (through the provider's proxy, if it has one), to be awaited."""
        return self._session.request(method, url, data=data, headers=headers, timeout=self._timeout,
                                     proxy=self._proxy)

    async def read_json(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        """A whole JSON object reply."""
        try:
            if response.content.is_eof():  # it came with the head (small replies do): nothing to wait for
                raw = await response.read()
            else:
                with self._deadlines.timeout(self.settings.timeouts.idle):
                    raw = await response.read()
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamFailure(f"upstream {self.name} broke off its reply", status=502) from None
        finally:
            response.release()
        try:
            body = jsoncodec.loads(raw)
        except ValueError:
            raise UpstreamFailure(f"upstream {self.name} sent a reply that is not JSON", status=502) from None
        if not isinstance(body, dict):
            raise UpstreamFailure(f"upstream {self.name} sent a reply that is not a JSON object", status=502)
        if body.get("error") and not ANSWER_KEYS.intersection(body):
            # an error in a 200 (some OpenAI-compatible servers and proxies do this): a failure, not an answer
            message, _, _ = self._error_detail(body)
            raise UpstreamFailure(f"upstream {self.name} answered with an error: {message}", status=502)
        return body

    def events(self, response: aiohttp.ClientResponse) -> AsyncIterator[list[Event]]:
        """Server-sent events as they arrive, in batches: all the whole events one network read
        completed (so they can go on to the client in one write); the stream's end is the body's end."""
        decoder = SSEDecoder()
        return self._reads(response, decoder.feed, decoder.flush)

    def payloads(self, response: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
        """The same batches, but only each event's data, as it came (``SSEDecoder.feed_data``)."""
        decoder = SSEDecoder()
        return self._reads(response, decoder.feed_data, decoder.flush_data)

    def named_payloads(self, response: aiohttp.ClientResponse) -> AsyncIterator[list[tuple[str, bytes]]]:
        """The same batches, each event's name with its data as it came (``SSEDecoder.feed_named``)."""
        decoder = SSEDecoder()
        return self._reads(response, decoder.feed_named, decoder.flush_named)

    async def _reads(self, response: aiohttp.ClientResponse, feed: Callable[[bytes], list[T]],
                     flush: Callable[[], list[T]]) -> AsyncIterator[list[T]]:
        idle = self.settings.timeouts.idle
        content = response.content
        watchdog = IdleWatchdog(content, idle, self._deadlines)
        clock = watchdog.clock
        try:
            while True:
                watchdog.waiting_since = clock()
                try:
                    data = await content.readany()
                except TimeoutError:
                    raise StreamBroken(f"upstream {self.name} was silent for {idle:g}s") from None
                except aiohttp.ClientError:
                    raise StreamBroken(f"upstream {self.name} broke off the stream") from None
                watchdog.waiting_since = None
                try:
                    events = feed(data) if data else flush()
                except EventTooLarge as exc:
                    raise StreamBroken(f"upstream {self.name} sent {exc}") from None
                if events:
                    yield events
                if not data:
                    return
        finally:
            watchdog.stop()

    def release_at_end(self, response: aiohttp.ClientResponse) -> None:
        """Let ``response``, read to its stream's last event, give its connection back to the pool
        (``BodyEnd``)."""
        if response.content.is_eof():
            return  # the end came with the last event: the connection is back in the pool already
        waiting = BodyEnd(response, self._deadlines)
        self._deadlines.add(waiting, self._deadlines.loop().time() + BODY_END_GRACE_SECONDS)
        response.content.on_eof(waiting.came)

    def parse_data(self, data: str | bytes) -> dict[str, Any]:
        """An event's data, which must be a JSON object."""
        try:
            value = jsoncodec.loads(data)
        except ValueError:
            raise StreamBroken(f"upstream {self.name} sent a malformed event") from None
        if not isinstance(value, dict):
            raise StreamBroken(f"upstream {self.name} sent a malformed event")
        return value

    def broken(self, error: Any) -> StreamBroken:
        """A mid-stream error event from the upstream, cleaned of secrets."""
        message = error.get("message") if isinstance(error, dict) else error
        return StreamBroken(self.clean(f"upstream {self.name}: {message}"))

    def _error_detail(self, payload: Any) -> tuple[str, Any, str | None]:
        """An upstream error body's message (one line, cleaned of secrets: it is logged, and may
        quote the client), its code and the request field it blames."""
        detail = payload.get("error", payload) if isinstance(payload, dict) else {}
        if isinstance(payload, list) and payload and isinstance(payload[0], dict):
            detail = payload[0].get("error", {})  # Gemini sometimes wraps errors in a list
        message = str(detail.get("message") or detail) if isinstance(detail, dict) else str(detail)
        code = detail.get("code") or detail.get("type") if isinstance(detail, dict) else None
        param = detail.get("param") if isinstance(detail, dict) else None
        return " ".join(self.clean(message).split())[:500], code, param if isinstance(param, str) else None

    async def _failure(self, response: aiohttp.ClientResponse) -> UpstreamFailure:
        """An upstream error status -> the failure the client sees (never the upstream's secrets)."""
        status = response.status
        try:
            with self._deadlines.timeout(5):
                message, code, param = self._error_detail(jsoncodec.loads(await response.read()))
        except (ValueError, TimeoutError, aiohttp.ClientError):
            message, code, param = " ".join(self.clean(response.reason or "").split()), None, None
        retry_after = _retry_after(response.headers)
        if status == 429 and code != "insufficient_quota":
            return UpstreamFailure(f"upstream {self.name} is rate limited: {message}", status=429,
                                   upstream_status=status, retry_after=retry_after or 1.0,
                                   type_="rate_limit_exceeded", code="upstream_rate_limited")
        if status in (401, 402, 403, 407, 429):
            # The operator's upstream account (or proxy, 407) is at fault, not the client's request.
            return UpstreamFailure(f"upstream {self.name} refused apibox's account (HTTP {status}); "
                                   "the operator has been told", status=503, upstream_status=status)
        if status < 500 and status not in (408, 409):
            return UpstreamFailure(f"upstream {self.name} rejected the request: {message}", status=400,
                                   upstream_status=status, retryable=False, type_="invalid_request_error",
                                   code="upstream_rejected", param=param)
        return UpstreamFailure(f"upstream {self.name} failed (HTTP {status}): {message}",
                               status=503 if status in (503, 529) else 502, upstream_status=status,
                               retry_after=retry_after)


class IdleWatchdog:
    """Fails a stream's pending read once the upstream has been silent for ``idle`` seconds.

    Looked at by the upstream's ``Deadlines``: no timer of its own, nor an ``asyncio.timeout``
    around every read. A reader sets ``waiting_since`` to ``clock()`` before each read and back
    to None after (plain attribute writes: they happen on every read of every stream), so the
    silence counts from the moment of each read and time spent elsewhere (writing to a slow
    client) never counts. When due it asks to be looked at again once the silence left has
    passed, or fails the read with TimeoutError (as aiohttp's own ``sock_read`` timeout fails it).
    """

    __slots__ = ("_content", "_deadlines", "_idle", "clock", "waiting_since")

    def __init__(self, content: aiohttp.StreamReader, idle: float, deadlines: Deadlines) -> None:
        self._content = content
        self._idle = idle
        self._deadlines = deadlines
        self.clock = deadlines.loop().time
        self.waiting_since: float | None = None
        deadlines.add(self, self.clock() + idle)

    def check(self, now: float) -> float | None:
        since = self.waiting_since
        if since is None:
            return now + self._idle
        due = since + self._idle
        if now >= due:
            self._content.set_exception(TimeoutError())
            return None
        return due

    def stop(self) -> None:
        self._deadlines.discard(self)


class UpstreamStream:
    """An open upstream response read as a stream; subclasses turn its events into items and call
    ``ended`` once the stream's last event ([DONE], ``message_stop``) has come."""

    def __init__(self, response: aiohttp.ClientResponse, http: HttpUpstream) -> None:
        self._response = response
        self._http = http
        self._ended = False

    def ended(self) -> None:
        """The stream's last event has come: all that is left is the body's end."""
        self._ended = True

    async def aclose(self) -> None:
        """Close the connection, so the upstream stops generating (and billing) at once; but when
        the stream has ended, let its body's end come first: the connection then goes back to the
        pool for the next request."""
        if self._ended:
            self._http.release_at_end(self._response)
        else:
            self._response.close()


class NamedEventStream(UpstreamStream):
    """Named SSE events (Anthropic's, the Responses API's) as dicts whose ``type`` is the event's
    name, in batches that keep each event's data as it came (``WireBatch``); ends at an event of
    ``LAST``, fails at an ``error`` event, and leaves out those of ``SKIPPED``. Events ``learn``
    takes a shape from are recognized by it from then on and not parsed: consecutive ones go
    together as one ``PlainRun`` of the bytes that came."""

    LAST: frozenset[str] = frozenset()
    SKIPPED: frozenset[str] = frozenset()

    def learn(self, event: dict[str, Any], payload: bytes) -> ChunkShape | None:
        """The shape of ``event`` if events like it only add text; None (the default) when not."""
        return None

    @staticmethod
    def error_of(event: dict[str, Any]) -> Any:
        """What an ``error`` event says went wrong."""
        return event.get("error")

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any] | PlainRun]]:
        shapes = LatestShapes()
        async for frames in self._http.named_payloads(self._response):
            batch = WireBatch()
            for item in shapes.split([payload for _, payload in frames]):
                if isinstance(item, PlainRun):
                    batch.append(item)
                    batch.raw.append(None)
                    continue
                name, payload = frames[item]
                try:
                    event = self._http.parse_data(payload)
                except StreamBroken:
                    if batch:
                        yield batch  # what came before the malformed event still reaches the client
                    raise
                kind = event.setdefault("type", name)
                if kind == "error":
                    if batch:
                        yield batch  # what came before the error still reaches the client
                    raise self._http.broken(self.error_of(event))
                shapes.learn(self.learn(event, payload))
                if kind not in self.SKIPPED:
                    batch.append(event)
                    batch.raw.append(payload)
                if kind in self.LAST:
                    self.ended()  # before the last batch goes: its reader may stop at it
                    batch.last = True
                    yield batch
                    return
            if batch:
                yield batch
        raise StreamBroken(f"upstream {self._http.name} closed the stream before it finished")


class BodyEnd:
    """A response read to its last event, waiting for the end of its body, which gives its
    connection back to the pool (aiohttp does that itself once the end comes); closed should the
    end not come within ``BODY_END_GRACE_SECONDS``.

    An upstream writes a stream's last event and its body's end (the empty chunk of a chunked
    body) one after the other, and they often come in two reads: closing the response at the
    last event threw away a connection that was about to be free, and the next stream opened a
    new one (a TCP handshake, and TLS's on a real upstream; with a mock upstream paced like an
    LLM, about one stream in eight)."""

    __slots__ = ("_deadlines", "_response")

    def __init__(self, response: aiohttp.ClientResponse, deadlines: Deadlines) -> None:
        self._response: aiohttp.ClientResponse | None = response
        self._deadlines = deadlines

    def came(self) -> None:
        """The body's end (aiohttp has given the connection back)."""
        self._deadlines.discard(self)
        self._response = None

    def check(self, now: float) -> None:
        if self._response is not None:
            self._response.close()
        # the response's reader keeps ``came`` until an end that may never come: without this,
        # response, reader and this would make a reference cycle
        self._response = None


def _retry_after(headers: Any) -> float | None:
    """An upstream's wait before trying again, in seconds (``retry-after-ms``, else ``retry-after``
    in seconds or as an HTTP date), at most RETRY_AFTER_MOST."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if not value:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                continue
        if seconds == seconds:  # (not NaN)
            return min(max(0.0, seconds), RETRY_AFTER_MOST)
    return None
