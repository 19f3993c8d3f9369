"""A fake OpenAI-compatible upstream that speaks the real wire format.

It records every request it receives (headers and JSON body) and answers according to
``mode``: a normal reply, an error status, a stream cut half-way, malformed events, a stream
without usage, or a stream that ignores ``max_tokens``; with ``obfuscation``, stream chunks carry
OpenAI's random padding (``pads_sent`` records it). A request for ``n`` answers gets ``n`` choices
of the same words (a stream's chunks interleaved, one choice each, as OpenAI sends them). Streamed events are written in
several TCP writes that split them at awkward places (inside JSON, inside a multi-byte
UTF-8 character, between ``\\r`` and ``\\n``), so the gateway's SSE parsing is tested for real.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

UPSTREAM_KEY = "sk-upstream-SECRET-0123456789abcdef"
WORDS = ["Héllo", " wörld", ",", " 你好", " from", " the", " fake", " upstream", "."]
# Models the fake answers as OpenAI answers its reasoning models: a request with max_tokens is refused.
REASONING_PREFIX = "o-reasoner"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    peer: Any = None  # the address it came from: one per connection

    @classmethod
    def of(cls, request: web.Request, body: dict[str, Any], path: str | None = None) -> Recorded:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        return cls(path or request.path, dict(request.headers), body, peer)


@dataclass
class FakeUpstream:
    mode: str = "ok"  # ok | status | cut | malformed | no_usage | overrun | slow | echo_key[_split|_with_id]
    status: int = 500
    error_message: str = "The server had an error"
    words: list[str] = field(default_factory=lambda: list(WORDS))
    prompt_tokens: int = 21
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    retry_after: str | None = None
    delay: float = 0.0
    whole: bool = False  # a stream in one write (its last event and [DONE] come in one read), not split
    obfuscation: bool = False  # pad chunks as OpenAI does unless stream_options.include_obfuscation is false
    thoughts: list[str] = field(default_factory=list)  # a reasoning model's thinking before a stream's words
    end_pause: float = 0.0  # between a stream's [DONE] and its body's end
    pause: float = 0.0  # a silence in a stream, as a reasoning model thinks: before event ``pause_before``
    pause_before: int = 0
    responses_api: bool = True  # False: /v1/responses is a 404, as on servers that copy only chat completions
    hung_up: int = 0  # streams whose connection the gateway closed before their body's end
    bodies_ended: int = 0  # streams whose body's end was written
    most_output: int | None = None  # a larger max_tokens is refused as too large, as OpenAI does
    requests: list[Recorded] = field(default_factory=list)
    pads_sent: list[str] = field(default_factory=list)
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)  # stored responses (Responses API), by id
    reported_usage: Any = None  # when set, the chat usage object sent as it is (a malformed one, say)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/responses/{id}", self.stored_response)
        app.router.add_delete("/v1/responses/{id}", self.stored_response)
        app.router.add_get("/v1/responses/{id}/input_items", self.stored_response)
        return app

    def usage(self, completion_tokens: int) -> dict[str, Any]:
        if self.reported_usage is not None:
            return self.reported_usage  # type: ignore[no-any-return]
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens, "audio_tokens": 0}}

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append(Recorded.of(request, body))
        return body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response({"error": {"message": "bad upstream key", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode in ("status", "echo_key", "echo_key_split", "echo_key_with_id"):
            message = self.error_message
            if self.mode in ("echo_key", "echo_key_with_id"):
                message = f"Incorrect API key provided: {UPSTREAM_KEY}"
            elif self.mode == "echo_key_split":  # the key broken across two lines
                message = f"Incorrect API key provided: {UPSTREAM_KEY[:14]}\n{UPSTREAM_KEY[14:]}"
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
            if self.mode == "echo_key_with_id":  # as some proxies give an error: with the request's id
                error["id"] = "req-upstream-1"
            return web.json_response(error, status=self.status, headers=headers)
        if body.get("model", "").startswith(REASONING_PREFIX) and "max_tokens" in body:  # as OpenAI's o-series
            return web.json_response({"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                           "Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}, status=400)
        if self.most_output is not None and (body.get("max_tokens") or 0) > self.most_output:
            return web.json_response({"error": {
                "message": f"max_tokens is too large: {body['max_tokens']}. This model supports at most "
                           f"{self.most_output} completion tokens, whereas you provided {body['max_tokens']}.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}}, status=400)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(self.words)
        words = self.words if self.mode == "overrun" else self.words[:limit]
        finish = "length" if len(words) < len(self.words) else "stop"
        chat = request.path.endswith("chat/completions")
        answers = range(body.get("n") or 1)
        if not body.get("stream"):
            text = "".join(words)
            choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": finish} if chat else
                       {"index": i, "text": text, "logprobs": None, "finish_reason": finish} for i in answers]
            reply = {"id": "chatcmpl-fake", "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": body["model"], "choices": choices,
                     "system_fingerprint": "fp_fake"}
            if self.mode != "no_usage":
                reply["usage"] = self.usage(len(words) * len(answers))
            return web.json_response(reply)
        return await self.stream(request, body, words, finish, chat, answers)

    async def stream(self, request: web.Request, body: dict[str, Any], words: list[str], finish: str,
                     chat: bool, answers: range) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        include_usage = (body.get("stream_options") or {}).get("include_usage") and self.mode != "no_usage"
        extra = {"usage": None} if include_usage else {}
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body["model"], "system_fingerprint": "fp_fake"}
        padded = self.obfuscation and (body.get("stream_options") or {}).get("include_obfuscation") is not False

        def chunk(delta: dict[str, Any], finish_reason: str | None, index: int = 0) -> dict[str, Any]:
            if chat:
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": delta.get("content", ""), "logprobs": None,
                          "finish_reason": finish_reason}
            made = {**head, "choices": [choice], **extra}
            if padded:  # a different length each time, as OpenAI's padding has
                made["obfuscation"] = "pad" + "Xy7" * (len(self.pads_sent) % 5)
                self.pads_sent.append(made["obfuscation"])
            return made

        events = [chunk({"role": "assistant", "content": ""}, None, i) for i in answers] if chat else []
        events += [chunk({"content": None, "reasoning_content": t}, None, i)
                   for t in self.thoughts for i in answers] if chat else []
        events += [chunk({"content": w}, None, i) for w in words for i in answers]
        pending: list[bytes] = []

        async def send(data: bytes) -> None:
            if self.whole:
                pending.append(data)
            else:
                await self._write(response, data)

        async def flush() -> None:  # what ``whole`` kept back, in one write
            if pending:
                await response.write(b"".join(pending))
                pending.clear()

        try:
            await send(b": keep-alive\r\n\r\n")
            for index, event in enumerate(events):
                if self.pause and index == self.pause_before:
                    await flush()
                    if await self._hung_up_during(request, self.pause):
                        return response
                if self.mode == "cut" and index == len(events) // 2:
                    await flush()
                    request.transport.close()  # the connection dies mid-answer
                    return response
                if self.mode == "malformed" and index == len(events) // 2:
                    await send(b"data: {this is not json\n\n")
                    continue
                await send(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\r\n\r\n")
            for i in answers:
                await send(b"data: " + json.dumps(chunk({}, finish, i)).encode() + b"\n\n")
            if include_usage:
                usage_chunk = {**head, "choices": [], "usage": self.usage(len(words) * len(answers))}
                await send(b"data: " + json.dumps(usage_chunk).encode() + b"\n\n")
            await send(b"data: [DONE]\n\n")
            await flush()
            if await self._hung_up_during(request, self.end_pause):
                return response
            await response.write_eof()
        except ConnectionResetError:  # the gateway hung up on us
            self.hung_up += 1
            raise
        self.bodies_ended += 1
        return response

    async def _hung_up_during(self, request: web.Request, seconds: float) -> bool:
        """Whether the gateway closes the connection within ``seconds`` (counted in ``hung_up``)."""
        waited = 0.0
        while waited < seconds:
            if request.transport is None or request.transport.is_closing():
                self.hung_up += 1
                return True
            await asyncio.sleep(0.01)
            waited += 0.01
        return False

    @staticmethod
    async def _write(response: web.StreamResponse, data: bytes) -> None:
        """Write in three pieces with a pause between, so reads on the other side split events."""
        third = max(1, len(data) // 3)
        for piece in (data[:third], data[third:2 * third], data[2 * third:]):
            if piece:
                await response.write(piece)
                await asyncio.sleep(0)

    async def stored_response(self, request: web.Request) -> web.Response:
        """A stored response read whole, its input listed, or deleted, as OpenAI answers them."""
        self.requests.append(Recorded.of(request, dict(request.query), f"{request.method} {request.path}"))
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response({"error": {"message": "bad upstream key", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        response_id = request.match_info["id"]
        kept = self.kept.get(response_id)
        if kept is None:
            return web.json_response({"error": {"message": f"Response with id '{response_id}' not found.",
                                                "type": "invalid_request_error", "param": None, "code": None}},
                                     status=404)
        if request.method == "DELETE":
            del self.kept[response_id]
            return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})
        if request.path.endswith("/input_items"):
            given = kept["input"]
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": given}]}] \
                if isinstance(given, str) else given
            items = [{"id": f"msg_in{i}", **item} for i, item in enumerate(items)]
            return web.json_response({"object": "list", "data": items, "first_id": items[0]["id"],
                                      "last_id": items[-1]["id"], "has_more": False})
        return web.json_response(kept["response"])

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API: a whole response, or its stream of events as OpenAI sends them."""
        body = await self._record(request)
        if not self.responses_api:
            raise web.HTTPNotFound()
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response({"error": {"message": "bad upstream key", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        if self.mode == "status":
            return web.json_response({"error": {"message": self.error_message, "type": "server_error", "param": None,
                                                "code": None}}, status=self.status)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.kept:
            return web.json_response({"error": {"message": f"Previous response with id '{previous}' not found.",
                                                "type": "invalid_request_error", "param": "previous_response_id",
                                                "code": "previous_response_not_found"}}, status=400)
        limit = body.get("max_output_tokens") or len(self.words)
        words = self.words if self.mode == "overrun" else self.words[:limit]
        complete = len(words) == len(self.words)
        text = "".join(words)
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": "msg_fake", "type": "message", "status": "completed" if complete else "incomplete",
                "role": "assistant", "content": [part]}
        usage = {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                 "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                 "total_tokens": self.prompt_tokens + len(words)}
        whole = {"id": f"resp_fake{len(self.requests)}", "object": "response", "created_at": int(time.time()),
                 "status": "completed" if complete else "incomplete", "error": None,
                 "incomplete_details": None if complete else {"reason": "max_output_tokens"},
                 "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                 "model": body["model"], "output": [item], "parallel_tool_calls": True,
                 "previous_response_id": previous, "reasoning": {"effort": None, "summary": None},
                 "store": body.get("store") is not False, "temperature": 1.0,
                 "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                 "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}
        if whole["store"]:
            self.kept[whole["id"]] = {"response": whole, "input": body["input"]}
        if not body.get("stream"):
            return web.json_response(whole)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        opening = {**whole, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        at = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": opening},
            {"type": "response.in_progress", "response": opening},
            {"type": "response.output_item.added", "output_index": 0,
             "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
            *({"type": "response.output_text.delta", **at, "delta": word, "logprobs": []} for word in words),
            {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **at, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed" if complete else "response.incomplete", "response": whole}]
        try:
            for sequence, event in enumerate(events):
                if self.mode == "cut" and sequence == len(events) // 2:
                    request.transport.close()
                    return response
                data = json.dumps({**event, "sequence_number": sequence}, ensure_ascii=False)
                await self._write(response, f"event: {event['type']}\ndata: {data}\n\n".encode())
            await response.write_eof()
        except ConnectionResetError:
            self.hung_up += 1
            raise
        self.bodies_ended += 1
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.25, 0.125]} for i in range(len(inputs))]
        tokens = 3 * len(inputs)
        return web.json_response({"object": "list", "model": body["model"], "data": data,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
