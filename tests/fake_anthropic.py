"""A fake Anthropic Messages API that speaks the real wire format (JSON and named SSE events).

It records what it receives and answers by ``mode``: ``ok`` (text, or a tool call when
``tool_name`` is set and the request has tools), ``status`` (an error status in Anthropic's
shape), ``echo_key`` (an error echoing the upstream key), ``cut`` (the connection dies
mid-answer), ``error_event`` (an ``event: error`` mid-stream, saying ``error_message``) or
``overrun`` (every word, whatever ``max_tokens`` says).
``sent`` lists the (event name, data) pairs of the last stream, in the order they were written.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_upstream import Recorded

ANTHROPIC_KEY = "sk-ant-upstream-SECRET-fedcba9876543210"
WORDS = ["Bonjour", " de", " la", " part", " de", " Claude", "."]


@dataclass
class FakeAnthropic:
    mode: str = "ok"
    status: int = 500
    words: list[str] = field(default_factory=lambda: list(WORDS))
    input_tokens: int = 30
    cache_read: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0  # of cache_write, those written to be kept an hour (reported in cache_creation)
    tool_name: str | None = None
    tool_input: dict[str, Any] = field(default_factory=lambda: {"city": "Paris"})
    count: int = 42
    error_message: str = "Overloaded"
    requests: list[Recorded] = field(default_factory=list)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    end_pause: float = 0.0  # between a stream's message_stop and its body's end
    bodies_ended: int = 0  # streams whose body's end was written
    reported_usage: Any = None  # when set, the usage object sent as it is (a stream's message_start's)
    replaced: dict[str, Any] = field(default_factory=dict)  # event name -> the data sent for it instead

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    def usage(self, output: int) -> dict[str, Any]:
        if self.reported_usage is not None:
            return self.reported_usage  # type: ignore[no-any-return]
        return {"input_tokens": self.input_tokens, "cache_creation_input_tokens": self.cache_write,
                "cache_read_input_tokens": self.cache_read, "output_tokens": output,
                "cache_creation": {"ephemeral_5m_input_tokens": self.cache_write - self.cache_write_1h,
                                   "ephemeral_1h_input_tokens": self.cache_write_1h}}

    def _refusal(self, request: web.Request) -> web.Response | None:
        if request.headers.get("x-api-key") != ANTHROPIC_KEY:
            return web.json_response({"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "invalid x-api-key"}}, status=401)
        if self.mode in ("status", "echo_key"):
            message = f"invalid x-api-key {ANTHROPIC_KEY}" if self.mode == "echo_key" else "Overloaded"
            return web.json_response({"type": "error", "error": {"type": "api_error", "message": message}},
                                     status=self.status)
        return None

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(Recorded.of(request, body))
        return self._refusal(request) or web.json_response({"input_tokens": self.count})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Recorded.of(request, body))
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        use_tool = bool(self.tool_name and body.get("tools"))
        words = self.words if self.mode == "overrun" else self.words[: body["max_tokens"]]
        stop = "tool_use" if use_tool else ("max_tokens" if len(words) < len(self.words) else "end_turn")
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": "".join(words)}]
            if use_tool:
                content.append({"type": "tool_use", "id": "toolu_fake1", "name": self.tool_name,
                                "input": self.tool_input})
            return web.json_response({"id": "msg_fake1", "type": "message", "role": "assistant",
                                      "model": body["model"], "content": content, "stop_reason": stop,
                                      "stop_sequence": None, "usage": self.usage(len(words) + use_tool * 10)})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.sent = []

        async def send(name: str, data: dict[str, Any]) -> None:
            data = self.replaced.get(name, data)
            self.sent.append((name, data))
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            await asyncio.sleep(0)

        await send("message_start", {"type": "message_start", "message": {
            "id": "msg_fake1", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**self.usage(1)}}})
        await send("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        await send("ping", {"type": "ping"})
        for i, word in enumerate(words):
            if self.mode == "cut" and i == len(words) // 2:
                request.transport.close()
                return response
            if self.mode == "error_event" and i == len(words) // 2:
                await send("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                "message": self.error_message}})
                return response
            await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": word}})
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        if use_tool:
            await send("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_fake1", "name": self.tool_name, "input": {}}})
            arguments = json.dumps(self.tool_input)
            for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2:]):
                await send("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                   "delta": {"type": "input_json_delta", "partial_json": piece}})
            await send("content_block_stop", {"type": "content_block_stop", "index": 1})
        await send("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": len(words) + use_tool * 10}})
        await send("message_stop", {"type": "message_stop"})
        await asyncio.sleep(self.end_pause)
        await response.write_eof()
        self.bodies_ended += 1
        return response
