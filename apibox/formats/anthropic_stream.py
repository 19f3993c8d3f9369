"""Anthropic streams <-> OpenAI chunks: the two state machines (pure).

PROTOCOLS.md 4.3 (Anthropic events in, OpenAI chunks out, for OpenAI clients of Anthropic
routes) and 4.8 (OpenAI chunks in, Anthropic events out, for ``/v1/messages`` clients of
other routes).
"""

from __future__ import annotations

import time
from typing import Any

from apibox.formats.anthropic import (
    ANTHROPIC_STOP_TO_OPENAI,
    OPENAI_FINISH_TO_ANTHROPIC,
    new_id,
    usage_from_anthropic,
    usage_to_anthropic,
)
from apibox.jsoncodec import obj, objects
from apibox.openai_wire import usage_to_openai
from apibox.pricing import Usage


def _block_index(event: dict[str, Any]) -> int:
    """The content block an event is of (0 when the upstream gave none that is a number)."""
    index = event.get("index")
    return index if type(index) is int else 0


class AnthropicToOpenAIStream:
    """Anthropic stream events in, OpenAI chunks out (PROTOCOLS.md 4.3)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.tool_index: dict[int, int] = {}
        self.raw_usage: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.finished = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def text_chunk(self, text: str) -> dict[str, Any]:
        """The chunk a text delta of ``text`` becomes (``feed`` makes none for an empty one)."""
        return self._chunk({"content": text})

    @property
    def usage(self) -> Usage | None:
        return usage_from_anthropic(self.raw_usage) if self.raw_usage else None

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = obj(event.get("message"))
            self.id = message.get("id") or self.id
            self.raw_usage.update(obj(message.get("usage")))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = obj(event.get("content_block"))
            if block.get("type") == "tool_use":
                index = len(self.tool_index)
                self.tool_index[_block_index(event)] = index
                return [
                    self._chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": index,
                                    "id": block.get("id"),
                                    "type": "function",
                                    "function": {"name": block.get("name"), "arguments": ""},
                                }
                            ]
                        }
                    )
                ]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = obj(event.get("delta"))
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [self.text_chunk(delta["text"])]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                index = self.tool_index.get(_block_index(event), 0)
                return [
                    self._chunk({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})
                ]
            return []
        if kind == "message_delta":
            stop = obj(event.get("delta")).get("stop_reason")
            if stop:
                self.finish_reason = ANTHROPIC_STOP_TO_OPENAI.get(str(stop), "stop")
            self.raw_usage.update({k: v for k, v in obj(event.get("usage")).items() if v is not None})
            return []
        if kind == "message_stop":
            self.finished = True
            chunks = [self._chunk({}, self.finish_reason or "stop")]
            usage = self.usage
            if usage is not None:
                chunks.append(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_to_openai(usage),
                    }
                )
            return chunks
        return []


class OpenAIToAnthropicStream:
    """OpenAI chunks in, Anthropic (event name, data) pairs out (PROTOCOLS.md 4.8)."""

    def __init__(self, model: str, input_tokens: int = 0) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.started = False
        self.block_index = -1
        self.block_kind: str | None = None
        self.tool_blocks: dict[int, int] = {}
        self.stop_reason: str | None = None

    def _start(self) -> list[tuple[str, dict[str, Any]]]:
        self.started = True
        return [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": new_id("msg_"),
                        "type": "message",
                        "role": "assistant",
                        "model": self.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
                    },
                },
            )
        ]

    def _close_block(self) -> list[tuple[str, dict[str, Any]]]:
        if self.block_kind is None:
            return []
        self.block_kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.block_index})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self._close_block()
        self.block_index += 1
        self.block_kind = kind
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": self.block_index, "content_block": block})
        )
        return events

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = [] if self.started else self._start()
        for choice in objects(chunk.get("choices")):
            delta = obj(choice.get("delta"))
            text = delta.get("content")
            if text and type(text) is str:
                if self.block_kind != "text":
                    events += self._open_block("text", {"type": "text", "text": ""})
                events.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": self.block_index,
                            "delta": {"type": "text_delta", "text": text},
                        },
                    )
                )
            for call in objects(delta.get("tool_calls")):
                position = call.get("index", 0)
                function = obj(call.get("function"))
                if position not in self.tool_blocks:
                    events += self._open_block(
                        "tool_use",
                        {
                            "type": "tool_use",
                            "id": call.get("id") or new_id("toolu_"),
                            "name": function.get("name", ""),
                            "input": {},
                        },
                    )
                    self.tool_blocks[position] = self.block_index
                if function.get("arguments") and type(function["arguments"]) is str:
                    events.append(
                        (
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": self.tool_blocks[position],
                                "delta": {"type": "input_json_delta", "partial_json": function["arguments"]},
                            },
                        )
                    )
            if choice.get("finish_reason"):
                self.stop_reason = OPENAI_FINISH_TO_ANTHROPIC.get(str(choice["finish_reason"]), "end_turn")
        return events

    def finish(self, usage: Usage | None) -> list[tuple[str, dict[str, Any]]]:
        events = [] if self.started else self._start()
        events += self._close_block()
        final = usage_to_anthropic(usage) if usage is not None else {"output_tokens": 0}
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": None},
                    "usage": final,
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events
