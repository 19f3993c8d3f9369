"""The built-in offline provider: deterministic replies with real token counts.

It answers ``Echo: <the last user message>`` (cut at the request's token limit), as many times
as the request's ``n`` asks, streams it piece by piece (the answers' chunks interleaved, as
OpenAI sends them), and returns stable pseudo-embeddings, so the whole billing path can be
tried without an upstream account or a network.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from apibox.config import ProviderSettings
from apibox.openai_wire import usage_to_openai
from apibox.pricing import Usage
from apibox.providers.base import ProviderRequest, UpstreamFailure
from apibox.tokens import PER_MESSAGE_TOKENS, TOKEN_PIECES, count_tokens, prompt_parts

DEFAULT_MAX_TOKENS = 256
EMBEDDING_DIMENSIONS = 16


class EchoProvider:
    name: str
    native_format = "echo"
    reports_stream_usage = True

    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self._ids = itertools.count(1)

    async def close(self) -> None:
        """Nothing to release."""

    async def complete(self, request: ProviderRequest) -> dict[str, Any]:
        if request.endpoint == "embeddings":
            return _embeddings(request.body)
        pieces, finish, usage, answers = self._answer(request)
        text = "".join(pieces)
        head = self._head(request, "chat.completion" if request.endpoint == "chat/completions" else "text_completion")
        if request.endpoint == "chat/completions":
            choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": finish} for i in answers]
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish} for i in answers]
        return {**head, "choices": choices, "usage": usage_to_openai(usage)}

    async def open_stream(self, request: ProviderRequest) -> _EchoStream:
        if request.endpoint == "embeddings":
            raise UpstreamFailure("embeddings cannot be streamed", status=400, retryable=False,
                                  type_="invalid_request_error")
        return _EchoStream(self, request)

    def _head(self, request: ProviderRequest, kind: str) -> dict[str, Any]:
        return {"id": f"echo-{request.request_id}-{next(self._ids)}", "object": kind, "created": int(time.time()),
                "model": request.body.get("model", "echo")}

    @staticmethod
    def _answer(request: ProviderRequest) -> tuple[list[str], str, Usage, range]:
        """An answer's pieces (one token each, with their leading spaces) and finish reason; the
        usage of all the answers asked for, and their indexes."""
        body = request.body
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        texts, messages, images = prompt_parts(body)
        prompt_tokens = sum(count_tokens(t) for t in texts) + messages * PER_MESSAGE_TOKENS + images * 85
        source = "Echo: " + _last_user_text(body)
        pieces: list[str] = []
        position = 0
        for match in TOKEN_PIECES.finditer(source):
            pieces.append(source[position:match.start()] + match.group())  # with the spaces before it
            position = match.end()
        finish = "stop"
        if len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        answers = range(body.get("n") or 1)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces) * len(answers))
        return pieces, finish, usage, answers


class _EchoStream:
    def __init__(self, provider: EchoProvider, request: ProviderRequest) -> None:
        self._provider = provider
        self._request = request

    async def aclose(self) -> None:
        """Nothing to cancel."""

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]:
        request = self._request
        chat = request.endpoint == "chat/completions"
        pieces, finish, usage, answers = self._provider._answer(request)
        head = self._provider._head(request, "chat.completion.chunk" if chat else "text_completion")
        with_usage = bool((request.body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if with_usage else {}

        def chunks(content: str | None, finish_reason: str | None, first: bool = False) -> list[dict[str, Any]]:
            """One chunk per answer, each adding ``content`` to its own choice."""
            made = []
            for index in answers:
                if chat:
                    delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                    if content is not None:
                        delta["content"] = content
                    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                else:
                    choice = {"index": index, "text": content or "", "logprobs": None, "finish_reason": finish_reason}
                made.append({**head, "choices": [choice], **extra})
            return made

        if chat:
            yield chunks(None, None, first=True)
        for piece in pieces:
            yield chunks(piece, None)
        yield chunks(None, finish)
        if with_usage:
            yield [{**head, "choices": [], "usage": usage_to_openai(usage)}]


def _last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and "text" in p)
        return ""
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else " ".join(p for p in prompt or () if isinstance(p, str))


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)) else raw
    dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
    data, tokens = [], 0
    for index, item in enumerate(inputs or ()):
        text = item if isinstance(item, str) else " ".join(map(str, item))
        tokens += count_tokens(text) if isinstance(item, str) else len(item)
        vector = _vector(text, dimensions)
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "model": body.get("model"), "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _vector(text: str, dimensions: int) -> list[float]:
    """A stable unit-free vector in [-1, 1) derived from the text's hash."""
    out: list[float] = []
    counter = 0
    while len(out) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b - 128) / 128 for b in digest)
        counter += 1
    return out[:dimensions]
