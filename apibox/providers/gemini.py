"""Google Gemini through ``generateContent`` and ``streamGenerateContent?alt=sse``.

Gemini wants the thought signature of every function call it made sent back with that
call in later turns. OpenAI clients cannot carry it, so the provider remembers signatures
by the tool-call id it handed out (a bounded map; an unknown id gets Google's documented
placeholder).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

from apibox.config import ProviderSettings
from apibox.formats.gemini import GeminiToOpenAI, openai_to_gemini_request
from apibox.providers.base import ProviderRequest, StreamBroken, UpstreamFailure, translating_request
from apibox.providers.http import HttpUpstream, UpstreamStream

SIGNATURES_KEPT = 50_000


class _Signatures(OrderedDict[str, str]):
    """Tool-call id -> thought signature, forgetting the oldest beyond a bound."""

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key, value)
        if len(self) > SIGNATURES_KEPT:
            self.popitem(last=False)


class GeminiProvider:
    native_format = "gemini"
    reports_stream_usage = True

    def __init__(self, settings: ProviderSettings, session: aiohttp.ClientSession) -> None:
        self.name = settings.name
        headers = {"x-goog-api-key": settings.api_key} if settings.api_key else {}
        self._http = HttpUpstream(settings, session, headers)
        self._base = settings.base_url
        self._signatures = _Signatures()

    async def close(self) -> None:
        """The session is shared and closed by its owner."""

    async def _post(self, request: ProviderRequest, method: str) -> aiohttp.ClientResponse:
        if request.endpoint != "chat/completions":
            raise UpstreamFailure(f"/v1/{request.endpoint} is not available on Gemini models", status=400,
                                  retryable=False, type_="invalid_request_error", code="unsupported_endpoint")
        with translating_request(self.name):
            body = openai_to_gemini_request(request.body, self._signatures)  # its limit: the gateway's, as held
        model = quote(str(request.body.get("model", "")), safe="")
        return await self._http.send(f"{self._base}/models/{model}:{method}", body,
                                     {"X-Request-Id": request.request_id})

    async def complete(self, request: ProviderRequest) -> dict[str, Any]:
        reply = await self._http.read_json(await self._post(request, "generateContent"))
        return GeminiToOpenAI(request.body.get("model", ""), self._signatures).reply(reply)

    async def open_stream(self, request: ProviderRequest) -> _GeminiStream:
        response = await self._post(request, "streamGenerateContent?alt=sse")
        return _GeminiStream(response, self._http, GeminiToOpenAI(request.body.get("model", ""), self._signatures))


class _GeminiStream(UpstreamStream):
    """Gemini's streamed responses read as OpenAI chunks; ends when the body does."""

    def __init__(self, response: aiohttp.ClientResponse, http: HttpUpstream, translate: GeminiToOpenAI) -> None:
        super().__init__(response, http)
        self._translate = translate

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]:
        async for events in self._http.events(self._response):
            chunks: list[dict[str, Any]] = []
            for event in events:
                data = self._http.parse_data(event.data)
                if data.get("error"):
                    if chunks:
                        yield chunks
                    raise self._http.broken(data["error"])
                chunks.extend(self._translate.chunks(data))
            if chunks:
                yield chunks
        if not self._translate.finished:
            raise StreamBroken(f"upstream {self._http.name} closed the stream before it finished")
        usage = self._translate.usage_chunk()
        if usage is not None:
            yield [usage]
