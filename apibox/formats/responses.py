"""OpenAI's Responses API (``POST /v1/responses``) as billing reads it (pure).

Responses go to upstreams that speak the API themselves, as they came; what apibox needs of
them is the prompt's size for the hold (an OpenAI chat-shaped copy of the request), the usage
an answer reports, and its text (for an estimate when a stream breaks before its usage).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from apibox.jsoncodec import objects
from apibox.openai_wire import usage_from_openai
from apibox.pricing import Usage

# A streamed answer's last event: each carries the whole response, its usage with it.
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
INCOMPLETE = {"reason": "max_output_tokens"}  # why a response that ran out of output tokens stopped
# The events that carry the answer's text (or a tool call's arguments) bit by bit, in ``delta``.
TEXT_DELTA_EVENTS = frozenset({"response.output_text.delta", "response.refusal.delta",
                               "response.function_call_arguments.delta", "response.reasoning_text.delta",
                               "response.reasoning_summary_text.delta"})


# Built-in tools the upstream bills by the call (a search, a container, an image), on top of the
# tokens: apibox, charging by tokens, would pass that cost to the operator, so it refuses them.
PAID_TOOLS = frozenset({"web_search", "web_search_preview", "web_search_preview_2025_03_11", "file_search",
                        "code_interpreter", "image_generation", "computer_use_preview"})


def paid_tool(tools: Any) -> int | None:
    """The index of the first tool the upstream bills by the call, if any."""
    for index, tool in enumerate(tools if isinstance(tools, list) else ()):
        if isinstance(tool, dict) and tool.get("type") in PAID_TOOLS:
            return index
    return None


def response_id(answer: Iterable[Any]) -> str | None:
    """The id of the response among ``answer``: a whole response, or a stream's events (those that
    carry the response: created, in progress, the last)."""
    for item in answer:
        if type(item) is dict:
            response = item if item.get("object") == "response" else item.get("response")
            if type(response) is dict and type(response.get("id")) is str and response["id"]:
                return response["id"]  # type: ignore[no-any-return]
    return None


def billing_copy(body: dict[str, Any]) -> dict[str, Any]:
    """The request in chat completions' shape, for what every door shares: the prompt's measure,
    the hold's output (``max_output_tokens``), the limits. Input items that are not messages
    (function calls and their outputs, reasoning) count as their JSON: a bound, never short."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    for item in [{"role": "user", "content": items}] if isinstance(items, str) else items or ():
        if isinstance(item, dict) and isinstance(item.get("role"), str) and "content" in item:
            messages.append({"role": item["role"], "content": item["content"]})
        else:
            messages.append({"role": "user", "content": json.dumps(item, ensure_ascii=False)})
    copy: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": body.get("stream") is True}
    if body.get("max_output_tokens") is not None:
        copy["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        copy["tools"] = body["tools"]
    return copy


def usage_from_responses(raw: Any) -> Usage | None:
    """A response's ``usage`` (input and output tokens, with cached and reasoning details)."""
    if not isinstance(raw, dict):
        return None
    details_in, details_out = raw.get("input_tokens_details"), raw.get("output_tokens_details")
    return usage_from_openai({
        "prompt_tokens": raw.get("input_tokens"), "completion_tokens": raw.get("output_tokens"),
        "prompt_tokens_details": details_in if isinstance(details_in, dict) else None,
        "completion_tokens_details": details_out if isinstance(details_out, dict) else None})


def usage_json(usage: Usage) -> dict[str, Any]:
    """Usage as a response's ``usage`` object (``usage_from_responses`` read backwards)."""
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def reply_text(reply: dict[str, Any]) -> str:
    """Everything a whole response said: its messages' text and its tool calls' arguments."""
    parts: list[str] = []
    for item in objects(reply.get("output")):
        if isinstance(item.get("arguments"), str):
            parts.append(item["arguments"])
        for content in objects(item.get("content")):
            if isinstance(content.get("text"), str):
                parts.append(content["text"])
    return "".join(parts)
