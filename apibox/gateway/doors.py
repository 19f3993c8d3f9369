"""The client-facing formats ("doors"): what a request looks like upstream and how replies return.

The OpenAI door speaks OpenAI both ways. The Anthropic door (``/v1/messages``) hands the
billing flow an OpenAI-shaped copy of the request for holds and translated routes, and
passes the original through untouched to routes whose upstream speaks Anthropic natively.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from apibox.errors import StoreError
from apibox.formats.anthropic import openai_to_anthropic_reply, usage_from_anthropic
from apibox.formats.responses import reply_text as responses_reply_text
from apibox.formats.responses import response_id, usage_from_responses
from apibox.formats.responses_chat import chat_request, response_of
from apibox.gateway.render import (
    AnthropicPassthrough,
    AnthropicRenderer,
    OpenAIRenderer,
    ResponsesPassthrough,
    ResponsesRenderer,
    StreamRenderer,
)
from apibox.jsoncodec import objects
from apibox.models import StoredResponse
from apibox.money import usd_number
from apibox.openai_wire import reply_text, usage_from_openai, usage_to_openai
from apibox.pricing import Usage
from apibox.providers.base import ChunkStream, Provider, ProviderRequest, UpstreamFailure
from apibox.store.base import Store
from apibox.tokens import PromptSize

log = logging.getLogger("apibox.gateway")


class Door(Protocol):
    """One client-facing wire format."""

    def is_native(self, provider: Provider) -> bool: ...
    async def complete(self, provider: Provider, request: ProviderRequest, native: bool) -> dict[str, Any]: ...
    async def open_stream(self, provider: Provider, request: ProviderRequest, native: bool) -> ChunkStream: ...
    def usage(self, reply: dict[str, Any], native: bool) -> Usage | None: ...
    def reply_text(self, reply: dict[str, Any], native: bool) -> str: ...
    def render_reply(self, reply: dict[str, Any], native: bool, model: str, usage: Usage,
                     cost: int) -> dict[str, Any]: ...
    def renderer(self, native: bool, model: str, wants_usage: bool, prompt: PromptSize) -> StreamRenderer: ...

    # The upstream may keep this door's answers (OpenAI stores Responses): ``keep`` records whose an
    # answer is (from a whole answer, or a stream's first events) and its usage, before its end goes out.
    keeps_answers: bool
    async def keep(self, provider: str, model: str, native: bool, answer: Sequence[Any], usage: Usage) -> None: ...


class KeepsNothing:
    """A door whose answers no upstream keeps for later."""

    keeps_answers = False

    async def keep(self, provider: str, model: str, native: bool, answer: Sequence[Any], usage: Usage) -> None:
        """Nothing to record."""


class OpenAIDoor(KeepsNothing):
    def is_native(self, provider: Provider) -> bool:
        return False  # every provider offers the OpenAI shape

    async def complete(self, provider: Provider, request: ProviderRequest, native: bool) -> dict[str, Any]:
        return await provider.complete(request)

    async def open_stream(self, provider: Provider, request: ProviderRequest, native: bool) -> ChunkStream:
        return await provider.open_stream(request)

    def usage(self, reply: dict[str, Any], native: bool) -> Usage | None:
        return usage_from_openai(reply.get("usage"))

    def reply_text(self, reply: dict[str, Any], native: bool) -> str:
        return reply_text(reply)

    def render_reply(self, reply: dict[str, Any], native: bool, model: str, usage: Usage,
                     cost: int) -> dict[str, Any]:
        raw = reply.get("usage") if isinstance(reply.get("usage"), dict) and not usage.estimated else None
        return {**reply, "model": model, "usage": {**(raw or usage_to_openai(usage)), "cost": usd_number(cost)}}

    def renderer(self, native: bool, model: str, wants_usage: bool, prompt: PromptSize) -> StreamRenderer:
        return OpenAIRenderer(model, wants_usage)


class AnthropicDoor(KeepsNothing):
    """``/v1/messages``: ``original`` is the client's Anthropic body."""

    def __init__(self, original: dict[str, Any], client_headers: Mapping[str, str]) -> None:
        self.original = original
        # Header names are case-insensitive; the providers look them up in lower case.
        self.client_headers = {name.lower(): value for name, value in client_headers.items()}

    def is_native(self, provider: Provider) -> bool:
        return provider.native_format == "anthropic"

    def _native_body(self, request: ProviderRequest) -> dict[str, Any]:
        body = {**self.original, "model": request.body.get("model")}
        if request.output_limit is not None and request.output_limit < (body.get("max_tokens") or 0):
            body["max_tokens"] = request.output_limit
        return body

    async def complete(self, provider: Provider, request: ProviderRequest, native: bool) -> dict[str, Any]:
        if native:
            return await provider.complete_native(  # type: ignore[attr-defined]
                self._native_body(request), request.request_id, self.client_headers)
        return await provider.complete(request)

    async def open_stream(self, provider: Provider, request: ProviderRequest, native: bool) -> ChunkStream:
        if native:
            return await provider.open_native_stream(  # type: ignore[attr-defined]
                self._native_body(request), request.request_id, self.client_headers)
        return await provider.open_stream(request)

    def usage(self, reply: dict[str, Any], native: bool) -> Usage | None:
        return usage_from_anthropic(reply.get("usage")) if native else usage_from_openai(reply.get("usage"))

    def reply_text(self, reply: dict[str, Any], native: bool) -> str:
        if not native:
            return reply_text(reply)
        return "".join(str(b.get("text") or b.get("thinking") or json.dumps(b.get("input") or ""))
                       for b in objects(reply.get("content")))

    def render_reply(self, reply: dict[str, Any], native: bool, model: str, usage: Usage,
                     cost: int) -> dict[str, Any]:
        if native:
            return {**reply, "model": model}
        return openai_to_anthropic_reply(reply, model, usage)

    def renderer(self, native: bool, model: str, wants_usage: bool, prompt: PromptSize) -> StreamRenderer:
        return AnthropicPassthrough(model) if native else AnthropicRenderer(model, prompt.estimate)


# What the billing flow sets on the request it sends (the route's model, a lowered limit, streaming)
FLOW_FIELDS = ("model", "max_tokens", "stream", "stream_options")


class ResponsesDoor:
    """``/v1/responses``, OpenAI's Responses API: ``original`` is the client's body. Routes whose
    upstream speaks the API itself (OpenAI's, and servers that copy it) get it as it came and
    their answers go back as they came; the others get it as a chat request
    (``formats.responses_chat``), their answers translated back, and so does an OpenAI-compatible
    upstream found to lack the API. The billing flow gets an OpenAI chat-shaped copy
    (``formats.responses.billing_copy``)."""

    keeps_answers = True

    def __init__(self, original: dict[str, Any], store: Store | None = None, user_id: int = 0) -> None:
        self.original = original
        self.translated = False  # a route meant to pass it through turned out to lack the API
        self._chat_body: dict[str, Any] | None = None
        self._store, self._user_id = store, user_id  # where a response the upstream keeps is recorded as whose

    async def keep(self, provider: str, model: str, native: bool, answer: Sequence[Any], usage: Usage) -> None:
        """Record a response passed through (and not asked not to be stored) as the caller's: only
        they may then continue, read or delete it, and a continuation's hold counts its tokens.
        Should the record fail, the answer still goes out and is billed; only referring to it later
        is refused."""
        if self._store is None or not self._passed_through(native) or self.original.get("store") is False:
            return
        kept = response_id(answer)
        if kept is None:
            return
        context = usage.prompt_tokens + usage.completion_tokens
        try:
            await self._store.remember_response(StoredResponse(kept, self._user_id, provider, model, context))
        except StoreError as exc:
            log.warning("could not record response %s as user %s's: %s", kept, self._user_id, exc)

    def chat_body(self) -> dict[str, Any]:
        """The request as chat completions take it (made once; InvalidRequest when chat cannot carry it)."""
        if self._chat_body is None:
            self._chat_body = chat_request(self.original)
        return self._chat_body

    def is_native(self, provider: Provider) -> bool:
        return provider.native_format == "openai" and getattr(provider, "responses_api", False)

    def _passed_through(self, native: bool) -> bool:
        """Whether the answer came as the Responses API's (``native`` is the route's, before it answered)."""
        return native and not self.translated

    async def _native_or_chat(self, provider: Provider, request: ProviderRequest, stream: bool) -> Any:
        """The upstream's own Responses API; should it not have one (404, 405: many OpenAI-compatible
        servers do not), chat completions, translated, for this request and this provider's next."""
        self.translated = False  # (a route tried before may have been)
        try:
            if stream:
                return await provider.open_responses_stream(  # type: ignore[attr-defined]
                    self._native_body(request), request.request_id)
            return await provider.complete_responses(  # type: ignore[attr-defined]
                self._native_body(request), request.request_id)
        except UpstreamFailure as exc:
            if exc.upstream_status not in (404, 405):
                raise
        provider.responses_api = False  # type: ignore[attr-defined]
        self.translated = True
        chat = self._chat(request)
        return await (provider.open_stream(chat) if stream else provider.complete(chat))

    def _native_body(self, request: ProviderRequest) -> dict[str, Any]:
        body = {**self.original, "model": request.body.get("model")}
        if request.body.get("max_tokens") is not None:  # the client's, or lower: what the balance pays for
            body["max_output_tokens"] = request.body["max_tokens"]
        return body

    def _chat(self, request: ProviderRequest) -> ProviderRequest:
        """The request for a route that speaks only chat: translated, with the flow's model, limit and
        streaming (``request.body``, made from the billing copy)."""
        flow = {field: request.body[field] for field in FLOW_FIELDS if field in request.body}
        chat = {**self.chat_body(), **flow}
        return ProviderRequest("chat/completions", chat, request.request_id, output_limit=request.output_limit)

    async def complete(self, provider: Provider, request: ProviderRequest, native: bool) -> dict[str, Any]:
        if not native:
            return await provider.complete(self._chat(request))
        return await self._native_or_chat(provider, request, stream=False)  # type: ignore[no-any-return]

    async def open_stream(self, provider: Provider, request: ProviderRequest, native: bool) -> ChunkStream:
        if not native:
            return await provider.open_stream(self._chat(request))
        return await self._native_or_chat(provider, request, stream=True)  # type: ignore[no-any-return]

    def usage(self, reply: dict[str, Any], native: bool) -> Usage | None:
        if self._passed_through(native):
            return usage_from_responses(reply.get("usage"))
        return usage_from_openai(reply.get("usage"))

    def reply_text(self, reply: dict[str, Any], native: bool) -> str:
        return responses_reply_text(reply) if self._passed_through(native) else reply_text(reply)

    def render_reply(self, reply: dict[str, Any], native: bool, model: str, usage: Usage,
                     cost: int) -> dict[str, Any]:
        passed = self._passed_through(native)
        answer = {**reply, "model": model} if passed else response_of(reply, model, usage)
        if isinstance(answer.get("usage"), dict):
            answer["usage"] = {**answer["usage"], "cost": usd_number(cost)}
        return answer

    def renderer(self, native: bool, model: str, wants_usage: bool, prompt: PromptSize) -> StreamRenderer:
        return ResponsesPassthrough(model) if self._passed_through(native) else ResponsesRenderer(model)
