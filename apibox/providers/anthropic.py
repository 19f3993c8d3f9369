"""Anthropic's Messages API: OpenAI-shaped requests translated both ways, or passed through natively.

The OpenAI door uses ``complete``/``open_stream`` (translation in ``apibox.formats.anthropic``).
The ``/v1/messages`` door uses ``complete_native``/``open_native_stream``, which send the
client's Anthropic body as it is and hand back Anthropic's reply or events untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from apibox import jsoncodec
from apibox.config import ProviderSettings
from apibox.formats.anthropic import anthropic_to_openai_reply, openai_to_anthropic_request
from apibox.formats.anthropic_stream import AnthropicToOpenAIStream
from apibox.openai_wire import learn_shape
from apibox.providers.base import ProviderRequest, UpstreamFailure, translating_request
from apibox.providers.http import HttpUpstream, NamedEventStream
from apibox.shapes import ChunkShape, PlainRun

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
# Client headers a native pass-through forwards (betas change the API's behaviour).
FORWARDED_HEADERS = ("anthropic-beta", "anthropic-version")


class AnthropicProvider:
    native_format = "anthropic"
    reports_stream_usage = True

    def __init__(self, settings: ProviderSettings, session: aiohttp.ClientSession) -> None:
        self.name = settings.name
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if settings.api_key:
            headers["x-api-key"] = settings.api_key
        self._http = HttpUpstream(settings, session, headers)
        self._url = f"{settings.base_url}/v1/messages"

    async def close(self) -> None:
        """The session is shared and closed by its owner."""

    def _check(self, request: ProviderRequest) -> None:
        if request.endpoint != "chat/completions":
            raise UpstreamFailure(
                f"/v1/{request.endpoint} is not available on Anthropic models",
                status=400,
                retryable=False,
                type_="invalid_request_error",
                code="unsupported_endpoint",
            )

    def _body(self, request: ProviderRequest) -> dict[str, Any]:
        with translating_request(self.name):
            return openai_to_anthropic_request(request.body, request.output_limit or DEFAULT_MAX_TOKENS)

    async def complete(self, request: ProviderRequest) -> dict[str, Any]:
        self._check(request)
        reply = await self.complete_native(self._body(request), request.request_id, {})
        return anthropic_to_openai_reply(reply, request.body.get("model", ""))

    async def open_stream(self, request: ProviderRequest) -> _TranslatedStream:
        self._check(request)
        native = await self.open_native_stream(self._body(request), request.request_id, {})
        return _TranslatedStream(native, request.body.get("model", ""))

    async def complete_native(
        self, body: dict[str, Any], request_id: str, client_headers: Mapping[str, str]
    ) -> dict[str, Any]:
        response = await self._http.send(
            self._url, {**body, "stream": False}, self._headers(request_id, client_headers)
        )
        return await self._http.read_json(response)

    async def open_native_stream(
        self, body: dict[str, Any], request_id: str, client_headers: Mapping[str, str]
    ) -> NativeStream:
        response = await self._http.send(self._url, {**body, "stream": True}, self._headers(request_id, client_headers))
        return NativeStream(response, self._http)

    async def count_tokens(self, body: dict[str, Any], request_id: str, client_headers: Mapping[str, str]) -> int:
        response = await self._http.send(f"{self._url}/count_tokens", body, self._headers(request_id, client_headers))
        reply = await self._http.read_json(response)
        tokens = reply.get("input_tokens")
        if not isinstance(tokens, int):
            raise UpstreamFailure(f"upstream {self.name} sent no token count", status=502)
        return tokens

    @staticmethod
    def _headers(request_id: str, client_headers: Mapping[str, str]) -> dict[str, str]:
        headers = {"X-Request-Id": request_id}
        for name in FORWARDED_HEADERS:
            if client_headers.get(name):
                headers[name] = client_headers[name]
        return headers


class NativeStream(NamedEventStream):
    """Anthropic stream events (``NamedEventStream``), ending at ``message_stop``; pings are left
    out. Text and thinking deltas are recognized by their shape and not parsed."""

    LAST = frozenset({"message_stop"})
    SKIPPED = frozenset({"ping"})

    def learn(self, event: dict[str, Any], payload: bytes) -> ChunkShape | None:
        return _delta_shape(event, payload) if event["type"] == "content_block_delta" else None


# The delta types that add text to a content block, and the field that holds it.
_TEXT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking"}
_DELTA_EVENT_KEYS = {"type", "index", "delta"}


def _delta_shape(event: dict[str, Any], raw: bytes) -> ChunkShape | None:
    """The shape of a ``content_block_delta`` that only adds text or thinking, else None."""
    delta = event.get("delta")
    if type(delta) is not dict or len(delta) != 2 or event.keys() != _DELTA_EVENT_KEYS:
        return None
    field = _TEXT_DELTAS.get(str(delta.get("type")))
    text = delta.get(field) if field is not None else None
    if field is None or type(text) is not str:
        return None
    return ChunkShape.around(event, ("delta", field), text, raw)


class _TranslatedStream:
    """An Anthropic stream read as OpenAI chunks.

    A run of text deltas becomes a run of OpenAI chunks without a chunk made for each: each
    text's bytes as they came are already its JSON string in the chunk the translation would
    make (a plain text has nothing to escape), so the run keeps them, under the shape of that
    chunk (the translation's id, created and model; made once per message)."""

    def __init__(self, native: NativeStream, model: str) -> None:
        self._native = native
        self._translate = AnthropicToOpenAIStream(model)

    async def aclose(self) -> None:
        await self._native.aclose()

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any] | PlainRun]]:
        translate = self._translate
        text_shape: ChunkShape | None = None  # of the chunk a text delta becomes
        async for events in self._native:
            chunks: list[dict[str, Any] | PlainRun] = []
            for event in events:
                if not isinstance(event, PlainRun):
                    chunks += translate.feed(event)
                    continue
                if event.shape.field == "text":
                    if text_shape is None or text_shape.chunk["id"] != translate.id:
                        sample = translate.text_chunk("x")
                        text_shape = learn_shape(sample, jsoncodec.dumps(sample))
                    kept = event.nonempty()  # the translation drops an empty text
                    if kept is not None and text_shape is not None:
                        chunks.append(PlainRun(text_shape, kept.texts, kept.middles))
                        continue
                for each in event.parsed():
                    chunks += translate.feed(each)
            if chunks:
                yield chunks
