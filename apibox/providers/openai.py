"""Any OpenAI-compatible upstream (OpenAI, DeepSeek, OpenRouter, vLLM, ...): base_url + api_key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from apibox.config import ProviderSettings
from apibox.providers.base import ProviderRequest, StreamBroken
from apibox.providers.http import HttpUpstream, UpstreamStream


class OpenAIProvider:
    """Forwards OpenAI-shaped requests as they are; reads back JSON or SSE."""

    native_format = "openai"

    def __init__(self, settings: ProviderSettings, session: aiohttp.ClientSession) -> None:
        self.name = settings.name
        self.reports_stream_usage = settings.stream_usage
        auth = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = HttpUpstream(settings, session, auth)
        self._base = settings.base_url

    async def close(self) -> None:
        """The session is shared and closed by its owner."""

    async def _post(self, request: ProviderRequest) -> aiohttp.ClientResponse:
        return await self._http.post(f"{self._base}/{request.endpoint}", request.body,
                                     {"X-Request-Id": request.request_id, **request.headers})

    async def complete(self, request: ProviderRequest) -> dict[str, Any]:
        return await self._http.read_json(await self._post(request))

    async def open_stream(self, request: ProviderRequest) -> _OpenAIStream:
        return _OpenAIStream(await self._post(request), self._http)


class _OpenAIStream(UpstreamStream):
    """Chunks of an upstream SSE stream, parsed, in batches; ends at ``[DONE]``."""

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]:
        finished = False
        async for events in self._http.events(self._response):
            chunks = []
            for event in events:
                if event.data.startswith("[DONE]"):
                    if chunks:
                        yield chunks
                    return
                chunk = self._http.parse_event(event)
                if chunk.get("error"):
                    if chunks:
                        yield chunks  # what came before the error still reaches the client
                    raise self._http.broken(chunk["error"])
                finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                           for c in chunk.get("choices") or ())
                chunks.append(chunk)
            yield chunks
        if not finished:  # some servers end without [DONE], but never without a finish_reason
            raise StreamBroken(f"upstream {self._http.name} closed the stream before it finished")
