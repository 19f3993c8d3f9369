"""How streamed answers reach each kind of client.

The billing loop in ``proxy`` reads upstream items (OpenAI chunks, or Anthropic events on a
native pass-through) and hands each to a renderer, which returns the bytes to send, the text
delivered (for counting) and any usage it saw. Renderers also write the ending, the cut at
the paid-for length, and the in-band error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from apibox import jsoncodec
from apibox.formats.anthropic import usage_from_anthropic, usage_to_anthropic
from apibox.formats.anthropic_stream import OpenAIToAnthropicStream
from apibox.money import usd_number
from apibox.openai_wire import delta_text, usage_from_openai, usage_to_openai
from apibox.pricing import Usage
from apibox.sse import encode


@dataclass(frozen=True, slots=True)
class Piece:
    data: bytes
    text: str = ""
    usage: Usage | None = None


class StreamRenderer(Protocol):
    def feed(self, item: dict[str, Any]) -> Piece: ...
    def cut(self) -> bytes:
        """End the answer where the hold's paid-for length ran out."""
        ...
    def end(self, usage: Usage, cost: int) -> bytes:
        """The stream's last frames, once the answer is complete."""
        ...
    def error(self, message: str) -> bytes: ...


class OpenAIRenderer:
    """OpenAI chunks to OpenAI clients: the client's model name, usage only when asked for."""

    def __init__(self, model: str, wants_usage: bool) -> None:
        self.model = model
        self.wants_usage = wants_usage
        self.head: dict[str, Any] = {"id": "chatcmpl-apibox", "object": "chat.completion.chunk",
                                     "created": int(time.time())}
        self.usage_chunk: dict[str, Any] | None = None

    def feed(self, chunk: dict[str, Any]) -> Piece:
        usage = usage_from_openai(chunk.get("usage")) if chunk.get("usage") else None
        if usage is not None and not chunk.get("choices"):
            self.usage_chunk = chunk  # sent at the end, with the cost
            return Piece(b"", usage=usage)
        if not self.wants_usage:
            chunk.pop("usage", None)
        chunk["model"] = self.model
        self.head = {k: chunk[k] for k in ("id", "object", "created") if k in chunk}
        return Piece(encode(jsoncodec.dumps(chunk)), delta_text(chunk), usage)

    def cut(self) -> bytes:
        chunk = {**self.head, "model": self.model,
                 "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}
        return encode(jsoncodec.dumps(chunk))

    def end(self, usage: Usage, cost: int) -> bytes:
        if not self.wants_usage:
            return b"data: [DONE]\n\n"
        chunk = self.usage_chunk or {**self.head, "choices": []}
        raw = chunk.get("usage") if self.usage_chunk and not usage.estimated else usage_to_openai(usage)
        final = {**chunk, "model": self.model, "usage": {**raw, "cost": usd_number(cost)}}
        return encode(jsoncodec.dumps(final)) + b"data: [DONE]\n\n"

    def error(self, message: str) -> bytes:
        return encode(jsoncodec.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                            "code": "upstream_stream_broken"}}))


def anthropic_error(message: str, kind: str = "api_error") -> bytes:
    return encode(jsoncodec.dumps({"type": "error", "error": {"type": kind, "message": message}}), "error")


def _frames(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(encode(jsoncodec.dumps(data), name) for name, data in events)


class AnthropicRenderer:
    """OpenAI chunks to Anthropic clients, translated event by event."""

    def __init__(self, model: str, input_tokens: int) -> None:
        self.translate = OpenAIToAnthropicStream(model, input_tokens)

    def feed(self, chunk: dict[str, Any]) -> Piece:
        usage = usage_from_openai(chunk.get("usage")) if chunk.get("usage") else None
        return Piece(_frames(self.translate.feed(chunk)), delta_text(chunk), usage)

    def cut(self) -> bytes:
        self.translate.stop_reason = "max_tokens"
        return b""

    def end(self, usage: Usage, cost: int) -> bytes:
        return _frames(self.translate.finish(usage))

    def error(self, message: str) -> bytes:
        return anthropic_error(message)


class AnthropicPassthrough:
    """Anthropic events to Anthropic clients as they came, but for the model's name."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.raw_usage: dict[str, Any] = {}
        self.open_block: int | None = None
        self.closed = False

    def feed(self, event: dict[str, Any]) -> Piece:
        kind = event.get("type", "")
        text, usage = "", None
        if kind == "message_start":
            message = event.get("message") or {}
            message["model"] = self.model
            self.raw_usage.update(message.get("usage") or {})
            usage = usage_from_anthropic(self.raw_usage)
        elif kind == "content_block_start":
            self.open_block = event.get("index")
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            text = str(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or "")
        elif kind == "message_delta":
            self.raw_usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            usage = usage_from_anthropic(self.raw_usage)
        elif kind == "message_stop":
            self.closed = True
        return Piece(encode(jsoncodec.dumps(event), kind), text, usage)

    def cut(self) -> bytes:
        return b""  # end() closes the message, with the usage that is charged

    def end(self, usage: Usage, cost: int) -> bytes:
        if self.closed:
            return b""
        events: list[tuple[str, dict[str, Any]]] = []
        if self.open_block is not None:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": self.open_block}))
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                         "usage": usage_to_anthropic(usage)}))
        events.append(("message_stop", {"type": "message_stop"}))
        self.closed = True
        return _frames(events)

    def error(self, message: str) -> bytes:
        return anthropic_error(message)
