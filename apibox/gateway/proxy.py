"""One billed request: authenticate, hold, forward (with fallback), settle exactly once.

This is the life of a billed request from DESIGN.md. Handlers for each OpenAI surface call
``forward`` with the parsed body; everything that touches money happens here or in billing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from apibox import billing, jsoncodec, tokens
from apibox.auth import Caller
from apibox.config import ModelSettings, Route
from apibox.errors import ApiboxError, InvalidRequest, UpstreamError
from apibox.gateway.admission import answer_count, authorized_model, limit_subjects, price_for, requested_output
from apibox.gateway.appkeys import GATEWAY
from apibox.gateway.context import Gateway
from apibox.gateway.doors import Door, OpenAIDoor
from apibox.gateway.exchange import EXCHANGE
from apibox.gateway.keepalive import Heartbeat
from apibox.limits import Admission
from apibox.models import UsageRecord
from apibox.pricing import Usage
from apibox.providers.base import (
    SHAPE_ERRORS,
    ChunkStream,
    Provider,
    ProviderRequest,
    StreamBroken,
    Untranslatable,
    UpstreamFailure,
    WireBatch,
)
from apibox.shapes import PlainRun

log = logging.getLogger("apibox.gateway")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OVERRUN_SLACK_TOKENS = 16  # tolerance before a stream running past its paid-for length is cut
OPENAI_DOOR = OpenAIDoor()


class EventStream(web.StreamResponse):
    """An SSE answer whose headers go out with its first batch, in one write. aiohttp sends a
    StreamResponse's headers as soon as it is prepared, a write of their own; ``_stream`` prepares
    it with the upstream's first batch already in hand, so waiting for it delays nothing."""

    _send_headers_immediately = False  # aiohttp's switch (Response's default) for buffered headers


@dataclass(slots=True)
class Call:
    """The state of one billed request, from the hold to the settlement."""

    gateway: Gateway
    caller: Caller
    model: ModelSettings
    endpoint: str
    body: dict[str, Any]
    request_id: str
    reservation: billing.Reservation
    door: Door
    prompt: tokens.PromptSize
    started: float = field(default_factory=time.monotonic)
    route: Route | None = None
    native: bool = False  # the route's upstream speaks the door's format: passed through untranslated
    first_byte: float | None = None
    settlement: asyncio.Future[UsageRecord] | None = None
    only_provider: str | None = None  # the one upstream to ask (it keeps what the request refers to)
    answers: int = 1  # answers the upstream makes (admission.answer_count): the hold's output is shared by them

    async def settle(self, usage: Usage, status: str, http_status: int) -> UsageRecord:
        """Charge once: later calls await the first settlement. The store finishes a settlement
        even if this task is cancelled meanwhile (a shutdown's last resort), so a request cut
        short is still charged. Run in the request's own task: a task of its own and a shield
        cost a few percent of the gateway's CPU."""
        if self.settlement is not None:
            return await asyncio.shield(self.settlement)
        settlement = self.settlement = self.gateway.loop.create_future()
        now = time.monotonic()
        record = UsageRecord(
            request_id=self.request_id, user_id=self.caller.user.id, key_id=self.caller.key.id,
            model=self.model.name, provider=self.route.provider if self.route else "",
            endpoint=self.endpoint, status=status, http_status=http_status,
            latency_ms=int((now - self.started) * 1000),
            ttft_ms=int((self.first_byte - self.started) * 1000) if self.first_byte else None)
        try:
            settled = await billing.settle(self.gateway.store, self.reservation, record, usage)
        except asyncio.CancelledError:
            settlement.cancel()
            raise
        except BaseException as exc:
            settlement.set_exception(exc)
            settlement.exception()  # seen here: nobody else need retrieve it
            raise
        settlement.set_result(settled)
        return settled

    def estimate(self, delivered_tokens: int, reported: Usage | None = None) -> Usage:
        """What to charge when the upstream's final usage never came: the prompt and what was delivered.

        The prompt as the upstream already reported it (Anthropic and Gemini do so early in a
        stream), else apibox's estimate. The answer never longer than the hold was taken for:
        the upstream was asked for at most ``reservation.output_tokens``.
        """
        delivered = min(delivered_tokens, self.reservation.output_tokens)
        if reported is not None and reported.prompt_tokens:
            return Usage(prompt_tokens=reported.prompt_tokens, cached_tokens=reported.cached_tokens,
                         cache_write_tokens=reported.cache_write_tokens,
                         completion_tokens=delivered,
                         estimated=True)
        return Usage(prompt_tokens=self.prompt.estimate, completion_tokens=delivered, estimated=True)


class Delivered:
    """The text a stream has sent, counted in tokens only when it matters.

    A token is at least one character, so the tokens counted so far plus the characters sent
    since are a bound on the answer's length: while the bound is within the paid-for tokens the
    stream cannot have overrun, and nothing is counted. Counting (a regex per piece) waits until
    the bound passes the limit or an estimate is needed, covers only the pieces sent since, and
    brings the bound down to the exact count, so it waits again while the next pieces fit."""

    __slots__ = ("counted", "counted_pieces", "pieces", "uncounted")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.counted = 0  # the tokens of pieces[:counted_pieces]
        self.counted_pieces = 0
        self.uncounted = 0  # the characters of the pieces after those

    def add_all(self, texts: Sequence[str], limit: int) -> int | None:
        """Add ``texts`` in turn until one takes the answer past ``limit`` tokens: its index (the
        texts after it are not added), or None when all fit."""
        size = sum(map(len, texts))
        if self.counted + self.uncounted + size <= limit:  # cannot be past: the usual case, without counting
            self.pieces.extend(texts)
            self.uncounted += size
            return None
        counted = self.tokens()
        for index, count in enumerate(map(tokens.count_tokens, texts)):
            counted += count
            if counted > limit:
                self._add_counted(texts[:index + 1], counted)
                return index
        self._add_counted(texts, counted)
        return None

    def _add_counted(self, texts: Sequence[str], counted: int) -> None:
        """Add ``texts``, which take the count of all pieces to ``counted`` tokens."""
        self.pieces.extend(texts)
        self.counted = counted
        self.counted_pieces = len(self.pieces)

    def tokens(self) -> int:
        for piece in self.pieces[self.counted_pieces:]:
            self.counted += tokens.count_tokens(piece)
        self.counted_pieces = len(self.pieces)
        self.uncounted = 0
        return self.counted


def _used_tokens(call: Call | None, admission: Admission) -> int:
    """The tokens a finished request really used, to correct the limiter's estimate."""
    if call is None:
        return 0  # refused before the hold (402): nothing was used
    settled = call.settlement
    if settled is None or not settled.done() or settled.cancelled() or settled.exception() is not None:
        return admission.tokens  # not known (yet): keep the estimate
    record = settled.result()
    return record.prompt_tokens + record.completion_tokens


async def forward(request: web.Request, caller: Caller, endpoint: str, body: dict[str, Any],
                  door: Door = OPENAI_DOOR, only_provider: str | None = None,
                  unseen_tokens: int = 0) -> web.StreamResponse:
    """Bill and forward one request; ``body`` is OpenAI-shaped, ``door`` renders the answer.
    ``only_provider``: the routes to that upstream alone are tried. ``unseen_tokens``: prompt the
    upstream reads that ``body`` does not show (a continued response's conversation, which the
    upstream keeps; the documents of an Anthropic client), held for too."""
    gateway = request.app[GATEWAY]
    exchange = request[EXCHANGE]
    model = authorized_model(gateway, caller, body.get("model"))
    exchange.model = model.name
    kind_ok = (model.kind == "embedding") == (endpoint == "embeddings")
    if not kind_ok:
        raise InvalidRequest(f"The model `{model.name}` does not support {request.path}.", param="model")
    answers = answer_count(endpoint, body)
    output = requested_output(endpoint, body, model) * answers
    prompt = tokens.measure_prompt(body)  # once: the limits, the hold and any estimate share it
    if unseen_tokens:
        prompt.add(unseen_tokens)
    subjects = limit_subjects(gateway, caller)
    admission = None  # no limits apply: the limiter would count nothing, so it is not asked
    if subjects:
        admission = await gateway.limiter.admit(subjects, prompt.estimate + output)
        exchange.rate_limit_headers = admission.headers
    call: Call | None = None
    try:
        reservation = await billing.reserve(
            gateway.store, caller.key, model=model.name, price=price_for(gateway, caller, model),
            request_id=exchange.request_id,
            prompt_tokens=prompt.bound, output_tokens=output, min_output=billing.MIN_ANSWER_TOKENS * answers)
        call = Call(gateway, caller, model, endpoint, body, exchange.request_id, reservation, door, prompt,
                    only_provider=only_provider, answers=answers)
        exchange.holding(call)  # counted as an open hold until its settlement is written
        failed_with = 500
        try:
            if body.get("stream") is True:
                return await _stream(request, call)
            return await _complete(request, call)
        except ApiboxError as exc:
            failed_with = exc.status
            raise
        finally:
            if call.settlement is None:  # failed before any output: nothing is charged
                await call.settle(Usage(), "error", failed_with)
    finally:  # the concurrency slot is free again; the token estimate becomes the real count
        if admission is not None:
            await gateway.limiter.finish(admission, _used_tokens(call, admission))


def _upstream_body(call: Call, route: Route, provider: Provider) -> dict[str, Any]:
    """The body for ``route``: its model's name, and the answer's length as the hold took it, in
    one field (the client's, or the model's ``max_output_tokens`` when it set none), so that no
    upstream is asked for more than is held for, whichever field it reads (the provider moves it
    to the field it takes)."""
    body = dict(call.body)
    body["model"] = route.model
    if call.reservation.output_tokens:
        own = "max_completion_tokens" if body.pop("max_completion_tokens", None) is not None else "max_tokens"
        body.pop("max_tokens", None)
        body["max_tokens" if call.endpoint == "completions" else own] = (
            call.reservation.output_tokens // call.answers)
    if body.get("stream") is True and provider.reports_stream_usage:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


async def _attempt(call: Call, stream: bool) -> Any:
    """Try each route in turn until one answers; only failures before any output are retried."""
    last: UpstreamFailure | None = None
    plan = call.gateway.router.plan(call.model)
    if call.only_provider is not None:
        plan = [route for route in plan if route.provider == call.only_provider]
    for route in plan:
        provider = call.gateway.providers[route.provider]
        call.route, call.native = route, call.door.is_native(provider)
        upstream = ProviderRequest(call.endpoint, _upstream_body(call, route, provider), call.request_id,
                                   output_limit=call.reservation.output_tokens)
        asked = time.monotonic()  # until the upstream's response head: apibox_upstream_response_seconds
        try:
            try:
                if stream:
                    opened = await call.door.open_stream(provider, upstream, call.native)
                    call.gateway.metrics.upstream_answered(route.provider, time.monotonic() - asked)
                    answer = await _started(opened, route.provider)
                else:
                    answer = await call.door.complete(provider, upstream, call.native)
                    call.gateway.metrics.upstream_answered(route.provider, time.monotonic() - asked)
            except UNREADABLE as exc:
                raise UpstreamFailure(_unreadable(route.provider, exc), status=502) from None
        except UpstreamFailure as exc:
            call.gateway.metrics.upstream_failed(route.provider, exc.code,
                                                 time.monotonic() - asked if exc.upstream_status else None)
            log.warning("route %s for %s failed: %s (request %s)", route.provider, call.model.name, exc.message,
                        call.request_id)
            last = exc
            if isinstance(exc, Untranslatable):
                continue  # the request's fault, in this route's format only: the route is not rested
            if not exc.retryable:
                break  # the request itself is at fault: another route would refuse it too
            call.gateway.router.failed(route, exc.retry_after)
            continue
        if not stream:  # a stream has succeeded only once it has ended well (_stream says so)
            call.gateway.router.succeeded(route)
        return answer
    assert last is not None
    try:
        raise last
    finally:  # the failure's traceback holds this frame: kept in ``last`` too, a reference cycle a request
        del last


@dataclass(slots=True)
class Started:
    """An upstream stream that has produced its first batch (``first``), which nothing has sent
    on yet; ``items`` yields the rest. ``_stream`` takes each next batch from ``items`` itself:
    no wrapper coroutine on every read, and it may leave the stream at its last batch (``items``
    is an async generator, and one left suspended is closed when collected by the event loop,
    in a task of its own: ``close`` closes it at once)."""

    stream: ChunkStream
    items: AsyncIterator[list[dict[str, Any]]]
    first: list[dict[str, Any]]

    async def close(self) -> None:
        await self.items.aclose()  # type: ignore[attr-defined]
        await self.stream.aclose()


# What reading an upstream's answer of a shape it should not have raises (a list where an object
# belongs, a number where a list does): the translations read what the upstream sent as it should
# be, and this is the net under them, so such an answer is the upstream's failure, never a 500.
# (The translation of the client's request has a net of its own: translating_request.)
UNREADABLE = SHAPE_ERRORS


def _unreadable(provider: str, exc: BaseException) -> str:
    """What to tell of an answer apibox could not read. The log has where reading it failed, but
    not the exception's text, which may quote what the upstream sent (and so an echoed secret)."""
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    place = f" ({type(exc).__name__} in {where[0].name}, {where[0].filename}:{where[0].lineno})" if where else ""
    log.warning("upstream %s sent an answer apibox cannot read%s", provider, place)
    return f"upstream {provider} sent an answer in a shape apibox cannot read"


async def _started(stream: ChunkStream, provider: str) -> Started:
    """Read a stream's first item before anything goes to the client, so that a stream failing
    at once (an upstream's first event an error) is a failure another route may still answer."""
    items = aiter(stream)
    try:
        first = await anext(items)
    except (StreamBroken, StopAsyncIteration, *UNREADABLE) as exc:
        await items.aclose()  # type: ignore[attr-defined]
        await stream.aclose()
        message = _unreadable(provider, exc) if isinstance(exc, UNREADABLE) else str(exc)
        raise UpstreamFailure(message or "the upstream's stream ended before any output", status=502) from None
    return Started(stream, items, first)


def _headers(call: Call) -> dict[str, str]:
    if call.reservation.lowered:
        return {"x-apibox-max-tokens": str(call.reservation.output_tokens // call.answers)}
    return {}


async def _complete(request: web.Request, call: Call) -> web.Response:
    """A whole answer. A client that left while it was being made is charged for it all the same
    (the upstream made it, and bills it whole), and its usage row says it left."""
    reply: dict[str, Any] = await _attempt(call, stream=False)
    call.first_byte = time.monotonic()
    usage = call.door.usage(reply, call.native)
    if usage is None:
        usage = call.estimate(tokens.count_tokens(call.door.reply_text(reply, call.native)))
    if call.door.keeps_answers:
        await call.door.keep(call.route.provider, call.model.name, call.native,  # type: ignore[union-attr]
                             (reply,), usage)
    transport = request.transport
    if transport is None or transport.is_closing():
        record = await call.settle(usage, "client_gone", 499)
    else:
        record = await call.settle(usage, "ok", 200)
    body = call.door.render_reply(reply, call.native, call.model.name, usage, record.charged)
    return web.Response(body=jsoncodec.dumps(body), content_type="application/json", headers=_headers(call))


async def _stream(request: web.Request, call: Call) -> web.StreamResponse:
    response = EventStream(headers={**SSE_HEADERS, **_headers(call)})
    gateway = call.gateway
    heart = Heartbeat(gateway.deadlines, gateway.settings.server.stream_keepalive_seconds, request, response,
                      gateway.metrics.keepalives)
    try:
        started: Started = await _attempt(call, stream=True)
    except BaseException as exc:
        heart.stop()
        if not isinstance(exc, ApiboxError) or not response.prepared:
            raise  # nothing has gone out: the failure is the answer's status
        return await _failed_after_keepalive(request, response, call, exc)
    wants_usage = (call.body.get("stream_options") or {}).get("include_usage") is True
    renderer = call.door.renderer(call.native, call.model.name, wants_usage, call.prompt)
    usage: Usage | None = None
    delivered = Delivered()
    limit = call.reservation.output_tokens + OVERRUN_SLACK_TOKENS
    status, http_status = "ok", 200

    def owed() -> Usage:
        """The upstream's usage when the stream ended well with one, else an estimate of it."""
        return usage if status == "ok" and usage is not None else call.estimate(delivered.tokens(), usage)

    try:
        if heart.beat is not None:
            await heart.beat  # a keep-alive being written (with the head, when the wait was long)
        await response.prepare(request)
        last = b""  # the last batch's frames: they go out with the ending, in one write
        batch, next_batch = started.first, started.items.__anext__
        call.first_byte = time.monotonic()
        try:  # reading the upstream's stream and rendering it for the client
            while True:
                out: list[bytes] = []
                wire = type(batch) is WireBatch
                raws = batch.raw if wire else None
                for index, item in enumerate(batch):
                    if type(item) is PlainRun:
                        passed = delivered.add_all(item.texts, limit)
                        if passed is None:
                            out.append(renderer.plain(item))
                            continue
                        # the run's chunks up to the one that went past the paid-for length: counted, so sent
                        out.append(renderer.plain(item.head(passed + 1)))
                    else:
                        piece = renderer.feed(item, raws[index] if raws is not None else None)
                        usage = piece.usage or usage
                        out.append(piece.data)  # (past the paid-for length or not: counted, so sent)
                        if not piece.text or delivered.add_all((piece.text,), limit) is None:
                            continue
                    status = "cut"
                    out.append(renderer.cut())
                    break
                if status == "cut" or (wire and batch.last):
                    last = b"".join(out)
                    break
                data = b"".join(out)
                if data:  # (events that carry nothing for the client, such as Anthropic's pings, are not sent)
                    await response.write(data)  # one write per upstream read
                    heart.sent += 1
                try:
                    batch = await next_batch()
                except StopAsyncIteration:
                    break
                if heart.beat is not None:
                    await heart.beat
        except UNREADABLE as exc:  # an event of a shape it should not have: the stream is broken
            raise StreamBroken(_unreadable(call.route.provider, exc)) from None  # type: ignore[union-attr]
        if call.route is not None:
            call.gateway.router.succeeded(call.route)
        final = owed()
        # settled before the stream's end goes out, as an answer is: a client that has read the
        # end reads the books with this request in them
        if call.door.keeps_answers:  # (the stream's first events name the response; its last goes out after)
            await call.door.keep(call.route.provider, call.model.name, call.native,  # type: ignore[union-attr]
                                 started.first, final)
        record = await call.settle(final, status, http_status)
        heart.stop()
        await response.write_eof(last + renderer.end(final, record.charged))  # usage.cost: what was charged
    except StreamBroken as exc:
        status, http_status = "cut", 502
        if call.route is not None:
            call.gateway.router.failed(call.route)
        log.warning("stream for %s broke: %s (request %s)", call.model.name, exc, call.request_id)
        heart.stop()
        broken = UpstreamError(f"{str(exc).rstrip('.')}. The answer is incomplete.", code="upstream_stream_broken")
        await _write_quietly(response, renderer.error(broken))
    except ConnectionResetError:
        status, http_status = "client_gone", 499
    except asyncio.CancelledError:  # the keep-alive found the client gone, or a shutdown's drain ran out
        status, http_status = ("cut", 503) if gateway.stopping and not heart.client_gone else ("client_gone", 499)
        raise
    finally:
        heart.stop()
        await started.close()
        if call.settlement is None:  # the stream broke, or the client left, before its end
            await call.settle(owed(), status, http_status)
    return response


async def _failed_after_keepalive(request: web.Request, response: web.StreamResponse, call: Call,
                                  failure: ApiboxError) -> web.StreamResponse:
    """Every route failed, but keep-alives have sent the stream's head: the failure is its one event."""
    request[EXCHANGE].error_code = failure.code or failure.type
    await call.settle(Usage(), "error", failure.status)
    renderer = call.door.renderer(call.native, call.model.name, False, call.prompt)
    await _write_quietly(response, renderer.error(failure))
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionResetError):
        await response.write(data)
