"""Any OpenAI-compatible upstream (OpenAI, DeepSeek, OpenRouter, vLLM, ...): base_url + api_key."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from apibox import jsoncodec
from apibox.config import ProviderSettings
from apibox.formats.responses import TERMINAL_EVENTS
from apibox.openai_wire import learn_shape
from apibox.providers.base import ProviderRequest, StreamBroken, UpstreamFailure, WireBatch
from apibox.providers.http import HttpUpstream, NamedEventStream, UpstreamStream
from apibox.shapes import LatestShapes, PlainRun

log = logging.getLogger("apibox.gateway")


class OpenAIProvider:
    """Forwards OpenAI-shaped requests as they are; reads back JSON or SSE."""

    native_format = "openai"

    def __init__(self, settings: ProviderSettings, session: aiohttp.ClientSession) -> None:
        self.name = settings.name
        self.reports_stream_usage = settings.stream_usage
        auth = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = HttpUpstream(settings, session, auth)
        self._base = settings.base_url
        # a chat request's length limit in the other field is moved to this one
        self._limit_field = settings.max_tokens_field
        self._completion_tokens_models: set[Any] = set()  # models found to refuse max_tokens
        # OpenAI-compatible servers may lack the Responses API: False once this one has answered /responses
        # with 404 or 405 (requests for it are then translated to chat completions)
        self.responses_api = True

    async def close(self) -> None:
        """The session is shared and closed by its owner."""

    async def _post(self, request: ProviderRequest) -> aiohttp.ClientResponse:
        """Send a request; a chat request's length limit goes under the field this upstream takes
        for the model (PROTOCOLS.md 1.1: OpenAI's reasoning models refuse ``max_tokens``, many
        compatible servers ignore ``max_completion_tokens``). Refused because the model takes
        ``max_completion_tokens`` instead (a 400 blaming ``max_tokens`` whose message names the
        other field: a proxy in front of OpenAI, say), it is sent once more with that field, which
        this provider sends for that model from then on if the upstream took it. A 400 about
        ``max_tokens``'s value (too large) teaches nothing."""
        url, headers = f"{self._base}/{request.endpoint}", {"X-Request-Id": request.request_id, **request.headers}
        if request.endpoint != "chat/completions":
            return await self._http.send(url, request.body, headers)
        model = request.body.get("model")
        field = "max_completion_tokens" if model in self._completion_tokens_models else self._limit_field
        body = _limit_under(request.body, field)
        try:
            return await self._http.send(url, body, headers)
        except UpstreamFailure as exc:
            if not (exc.upstream_status == 400 and exc.param == "max_tokens" and "max_tokens" in body
                    and "max_completion_tokens" in exc.message):
                raise
        response = await self._http.send(url, _limit_under(body, "max_completion_tokens"), headers)
        log.info("upstream %s refused max_tokens for %s: it gets max_completion_tokens from now on", self.name, model)
        self._completion_tokens_models.add(model)
        return response

    async def complete(self, request: ProviderRequest) -> dict[str, Any]:
        return await self._http.read_json(await self._post(request))

    async def open_stream(self, request: ProviderRequest) -> _OpenAIStream:
        return _OpenAIStream(await self._post(request), self._http)

    async def complete_responses(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """A whole answer of the upstream's own Responses API (``POST /responses``)."""
        response = await self._http.send(f"{self._base}/responses", {**body, "stream": False},
                                         {"X-Request-Id": request_id})
        return await self._http.read_json(response)

    async def open_responses_stream(self, body: dict[str, Any], request_id: str) -> ResponsesStream:
        response = await self._http.send(f"{self._base}/responses", {**body, "stream": True},
                                         {"X-Request-Id": request_id})
        return ResponsesStream(response, self._http)


    async def stored_response(self, method: str, path: str) -> dict[str, Any]:
        """A call on a response the upstream keeps: ``path`` is ``{id}``, or what lies under it
        (``{id}/input_items``), with its query; reading one, or deleting it."""
        return await self._http.read_json(await self._http.send(f"{self._base}/responses/{path}", None, {}, method))


def _limit_under(body: dict[str, Any], field: str) -> dict[str, Any]:
    """``body`` with its length limit (given in one field) under ``field``."""
    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
    if other not in body:
        return body
    body = dict(body)
    body[field] = body.pop(other)
    return body


class _OpenAIStream(UpstreamStream):
    """Chunks of an upstream SSE stream in batches that keep each chunk's bytes as they came
    (``WireBatch``): chunks that only add text are recognized by their shape and not parsed
    (consecutive ones go together as one ``PlainRun``), the others are; ends at ``[DONE]``.
    A plain chunk that matches none of the latest shapes is learned as a new one, so a reasoning
    model's thinking and its answer both go unparsed, and so do the choices of a stream asked for
    several and a stream whose shared bytes change (Ollama's ``created`` moves on each second)."""

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]:
        finished = False
        shapes = LatestShapes()
        reads = self._http.payloads(self._response)
        try:
            async for payloads in reads:
                batch = WireBatch()
                for item in shapes.split(payloads):
                    if isinstance(item, PlainRun):
                        batch.append(item)
                        batch.raw.append(None)
                        continue
                    payload = payloads[item]
                    if payload.startswith(b"[DONE]"):
                        self.ended()  # before the last batch goes: its reader may stop at it
                        if batch:
                            batch.last = True
                            yield batch
                        return
                    try:
                        chunk, raw = self._parse(payload)
                    except StreamBroken:
                        if batch:
                            yield batch  # what came before the malformed event still reaches the client
                        raise
                    if chunk.get("error"):
                        if batch:
                            yield batch  # what came before the error still reaches the client
                        raise self._http.broken(chunk["error"])
                    if not finished:
                        finished = _finishes(chunk)
                        if raw is not None and not finished:  # a finishing chunk is not plain
                            shapes.learn(learn_shape(chunk, raw))
                    batch.append(chunk)
                    batch.raw.append(raw)
                yield batch
        finally:
            await reads.aclose()  # type: ignore[attr-defined]
        if not finished:  # some servers end without [DONE], but never without a finish_reason
            raise StreamBroken(f"upstream {self._http.name} closed the stream before it finished")

    def _parse(self, payload: bytes) -> tuple[dict[str, Any], bytes | None]:
        """The chunk, and its bytes when they may be passed on (not when they are not UTF-8)."""
        try:
            chunk = jsoncodec.loads(payload)
        except ValueError:
            return self._http.parse_data(payload.decode("utf-8", "replace")), None
        if type(chunk) is not dict:
            raise StreamBroken(f"upstream {self._http.name} sent a malformed event")
        return chunk, payload


def _finishes(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    if choices:
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                return True
    return False


class ResponsesStream(NamedEventStream):
    """A Responses API stream's events (``NamedEventStream``), ending at the response's last
    (completed, incomplete or failed, each with the whole response and its usage); an ``error``
    event is itself what went wrong."""

    LAST = TERMINAL_EVENTS

    @staticmethod
    def error_of(event: dict[str, Any]) -> Any:
        return event
