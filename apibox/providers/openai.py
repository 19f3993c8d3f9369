"""Any OpenAI-compatible upstream (OpenAI, DeepSeek, OpenRouter, vLLM, ...): base_url + api_key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from apibox.config import ProviderSettings
from apibox.providers.base import ProviderRequest, StreamBroken, UpstreamFailure, redact
from apibox.sse import SSEDecoder


class OpenAIProvider:
    """Forwards OpenAI-shaped requests as they are; reads back JSON or SSE."""

    def __init__(self, settings: ProviderSettings, session: aiohttp.ClientSession) -> None:
        self.name = settings.name
        self.settings = settings
        self.reports_stream_usage = settings.stream_usage
        self._session = session
        self._headers = {"Content-Type": "application/json", **settings.headers}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"
        self._secrets = (settings.api_key, *settings.headers.values())
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeouts.connect)

    async def close(self) -> None:
        """The session is shared and closed by its owner."""

    async def _post(self, request: ProviderRequest) -> aiohttp.ClientResponse:
        url = f"{self.settings.base_url}/{request.endpoint}"
        headers = {**self._headers, "X-Request-Id": request.request_id, **request.headers}
        try:
            async with asyncio.timeout(self.settings.timeouts.first_byte):
                response = await self._session.post(url, data=json.dumps(request.body), headers=headers,
                                                    timeout=self._timeout)
        except TimeoutError:
            wait = self.settings.timeouts.first_byte
            raise UpstreamFailure(f"upstream {self.name} did not answer within {wait:g}s", status=504,
                                  code="upstream_timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(f"cannot reach upstream {self.name}: {self._clean(type(exc).__name__)}",
                                  status=503, code="upstream_unavailable") from None
        if response.status >= 400:
            try:
                raise await self._failure(response)
            finally:
                response.release()
        return response

    async def complete(self, request: ProviderRequest) -> dict[str, Any]:
        response = await self._post(request)
        try:
            async with asyncio.timeout(self.settings.timeouts.idle):
                raw = await response.read()
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamFailure(f"upstream {self.name} broke off its reply", status=502) from None
        finally:
            response.release()
        try:
            body = json.loads(raw)
        except ValueError:
            raise UpstreamFailure(f"upstream {self.name} sent a reply that is not JSON", status=502) from None
        if not isinstance(body, dict):
            raise UpstreamFailure(f"upstream {self.name} sent a reply that is not a JSON object", status=502)
        return body

    async def open_stream(self, request: ProviderRequest) -> _OpenAIStream:
        response = await self._post(request)
        return _OpenAIStream(response, self.settings.timeouts.idle, self)

    def _clean(self, text: str) -> str:
        return redact(text, self._secrets)

    async def _failure(self, response: aiohttp.ClientResponse) -> UpstreamFailure:
        """An upstream error status -> the failure the client sees (never the upstream's secrets)."""
        status = response.status
        try:
            async with asyncio.timeout(5):
                payload = json.loads(await response.read())
            detail = payload.get("error", payload) if isinstance(payload, dict) else {}
            message = str(detail.get("message") or detail) if isinstance(detail, dict) else str(detail)
            code = detail.get("code") if isinstance(detail, dict) else None
        except (ValueError, TimeoutError, aiohttp.ClientError):
            message, code = response.reason or "", None
        message = self._clean(message)[:500]
        retry_after = _retry_after(response.headers)
        if status == 429 and code != "insufficient_quota":
            return UpstreamFailure(f"upstream {self.name} is rate limited: {message}", status=429,
                                   upstream_status=status, retry_after=retry_after or 1.0,
                                   type_="rate_limit_exceeded", code="upstream_rate_limited")
        if status in (401, 402, 403, 429):
            # The operator's upstream account is at fault, not the client's request.
            return UpstreamFailure(f"upstream {self.name} refused apibox's account (HTTP {status}); "
                                   "the operator has been told", status=503, upstream_status=status)
        if status < 500 and status != 408:
            return UpstreamFailure(f"upstream {self.name} rejected the request: {message}", status=400,
                                   upstream_status=status, retryable=False, type_="invalid_request_error",
                                   code=code if isinstance(code, str) else "upstream_rejected")
        return UpstreamFailure(f"upstream {self.name} failed (HTTP {status}): {message}",
                               status=503 if status in (503, 529) else 502, upstream_status=status,
                               retry_after=retry_after)


class _OpenAIStream:
    """Chunks of an upstream SSE stream, parsed; ends at ``[DONE]``."""

    def __init__(self, response: aiohttp.ClientResponse, idle: float, provider: OpenAIProvider) -> None:
        self._response = response
        self._idle = idle
        self._provider = provider

    async def aclose(self) -> None:
        self._response.close()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        decoder = SSEDecoder()
        finished = False
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    data = await self._response.content.readany()
            except TimeoutError:
                raise StreamBroken(f"upstream {self._provider.name} was silent for {self._idle:g}s") from None
            except aiohttp.ClientError:
                raise StreamBroken(f"upstream {self._provider.name} broke off the stream") from None
            events = decoder.feed(data) if data else decoder.flush()
            for event in events:
                if event.data.startswith("[DONE]"):
                    return
                try:
                    chunk = json.loads(event.data)
                except ValueError:
                    raise StreamBroken(f"upstream {self._provider.name} sent a malformed event") from None
                if not isinstance(chunk, dict):
                    raise StreamBroken(f"upstream {self._provider.name} sent a malformed event")
                if chunk.get("error"):
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    raise StreamBroken(self._provider._clean(f"upstream {self._provider.name}: {message}"))
                finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                           for c in chunk.get("choices") or ())
                yield chunk
            if not data:
                if finished:
                    return  # some servers end without [DONE]
                raise StreamBroken(f"upstream {self._provider.name} closed the stream before it finished")


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None
