"""Anthropic Messages <-> OpenAI chat: requests, replies, streams and usage (pure).

Used in both directions: by the Anthropic provider (OpenAI-shaped request in, Messages API
out) and by the ``/v1/messages`` door (Anthropic clients reaching OpenAI-shaped routes).
The tables in PROTOCOLS.md sections 4.1-4.4, 4.7 and 4.8 are implemented here.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from apibox.errors import InvalidRequest
from apibox.jsoncodec import obj, objects
from apibox.openai_wire import usage_to_openai
from apibox.pricing import Usage, count_at, token_count

ANTHROPIC_STOP_TO_OPENAI = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}
OPENAI_FINISH_TO_ANTHROPIC = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# An error's HTTP status -> the ``error.type`` Anthropic gives it (its SDK picks the exception by it).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


# -- usage ---------------------------------------------------------------------------------


# What a request for any JSON object (OpenAI's json_object) tells an Anthropic model, which has no such mode.
JSON_OBJECT_ONLY = "Answer with one JSON object and nothing else: no prose, no code fences."


def usage_from_anthropic(raw: Any) -> Usage | None:
    """Anthropic usage -> Usage in OpenAI's convention (prompt includes cache reads and writes);
    None when it is absent or is no report (``pricing.token_count``)."""
    if not isinstance(raw, dict):
        return None
    uncached, output = token_count(raw.get("input_tokens")), token_count(raw.get("output_tokens"))
    cache_read, cache_write = count_at(raw, "cache_read_input_tokens"), count_at(raw, "cache_creation_input_tokens")
    if uncached is None or output is None or uncached + cache_read + cache_write < 1:  # no report
        return None
    details = raw.get("output_tokens_details")
    thinking = count_at(details, "thinking_tokens") if isinstance(details, dict) else 0
    creation = raw.get("cache_creation")  # the writes by lifetime: those kept an hour cost more
    return Usage(
        prompt_tokens=uncached + cache_read + cache_write,
        completion_tokens=output,
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=thinking,
        cache_write_1h_tokens=count_at(creation, "ephemeral_1h_input_tokens") if isinstance(creation, dict) else 0,
    )


def usage_to_anthropic(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.uncached_prompt_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


# -- OpenAI request -> Anthropic request (the Anthropic provider) --------------------------


def anthropic_error_type(status: int) -> str:
    """The ``error.type`` of an Anthropic error answered with HTTP ``status``."""
    return ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";")[0]
        if media_type not in IMAGE_TYPES:
            raise InvalidRequest(
                f"image type {media_type!r} is not supported by this model (use one of {', '.join(IMAGE_TYPES)})"
            )
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _openai_parts_to_blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and part.get("text"):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                blocks.append(_image_block(url))
        elif kind == "refusal" and part.get("refusal"):
            blocks.append({"type": "text", "text": part["refusal"]})
    return blocks


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    except ValueError:
        raise InvalidRequest("a tool call's `arguments` is not valid JSON", param="messages") from None
    return value if isinstance(value, dict) else {"value": value}


def openai_to_anthropic_request(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """An OpenAI chat request as a Messages API request."""
    if (body.get("n") or 1) > 1:
        raise InvalidRequest("this model returns one choice per request; n must be 1", param="n")
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for message in body.get("messages") or ():
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = _text_of(content)
            if text:
                system.append(text)
        elif role == "user":
            add("user", _openai_parts_to_blocks(content))
        elif role == "assistant":
            blocks = _openai_parts_to_blocks(content)
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id") or new_id("toolu_"),
                        "name": function.get("name", ""),
                        "input": _arguments(function.get("arguments")),
                    }
                )
            legacy = message.get("function_call")
            if isinstance(legacy, dict):
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": new_id("toolu_"),
                        "name": legacy.get("name", ""),
                        "input": _arguments(legacy.get("arguments")),
                    }
                )
            add("assistant", blocks)
        elif role in ("tool", "function"):
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id") or message.get("name", ""),
                "content": _text_of(content) if not isinstance(content, str) else content,
            }
            add("user", [result])
    out: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens,
    }
    response_format = body.get("response_format")
    form = _json_format(response_format)
    if form is not None:
        out["output_config"] = {"format": form}
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        system.append(JSON_OBJECT_ONLY)  # Anthropic takes a schema, not "any JSON": it is asked for in words
    if system:
        out["system"] = "\n\n".join(system)
    if body.get("stop"):
        stop = body["stop"]
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(body.get("temperature"), int | float):
        out["temperature"] = min(float(body["temperature"]), 1.0)
    if isinstance(body.get("top_p"), int | float):
        out["top_p"] = body["top_p"]
    if body.get("stream"):
        out["stream"] = True
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str):
        out["metadata"] = {"user_id": user}
    tools = body.get("tools") or [{"type": "function", "function": f} for f in body.get("functions") or ()]
    if tools:
        out["tools"] = [
            {
                "name": t["function"].get("name", ""),
                **({"description": t["function"]["description"]} if t["function"].get("description") else {}),
                "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}},
            }
            for t in tools
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
    choice = _tool_choice_to_anthropic(body.get("tool_choice", body.get("function_call")))
    if body.get("parallel_tool_calls") is False and tools:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None and tools:
        out["tool_choice"] = choice
    return out


def _json_format(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format: json_schema`` as Anthropic's ``output_config.format`` (None for
    any other format)."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object",
                             param="response_format")
    return {"type": "json_schema", "schema": schema}


def _tool_choice_to_anthropic(choice: Any) -> dict[str, Any] | None:
    if choice in (None, "auto"):
        return {"type": "auto"} if choice == "auto" else None
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name:
            return {"type": "tool", "name": name}
    return None


# -- Anthropic reply/stream -> OpenAI ------------------------------------------------------


def anthropic_to_openai_reply(reply: dict[str, Any], model: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in objects(reply.get("content")):
        if block.get("type") == "text":
            text.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})},
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    usage = usage_from_anthropic(reply.get("usage"))
    translated = {
        "id": reply.get("id") or new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": ANTHROPIC_STOP_TO_OPENAI.get(str(reply.get("stop_reason")), "stop"),
            }
        ],
    }
    if usage is not None:  # none reported: the gateway estimates
        translated["usage"] = usage_to_openai(usage)
    return translated


# -- Anthropic request -> OpenAI request (the /v1/messages door to other routes) -----------


def anthropic_to_openai_request(body: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append(
            {
                "role": "system",
                "content": system
                if isinstance(system, str)
                else "\n\n".join(b.get("text", "") for b in system if isinstance(b, dict)),
            }
        )
    for message in body.get("messages") or ():
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for block in content or ():
            kind = block.get("type")
            if kind == "tool_result":
                result = block.get("content")
                text = result if isinstance(result, str) else _text_of(result)
                if block.get("is_error"):
                    text = f"Error: {text}"
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            elif kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image":
                source = block.get("source") or {}
                url = (
                    f"data:{source.get('media_type')};base64,{source.get('data')}"
                    if source.get("type") == "base64"
                    else source.get("url")
                )
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})},
                    }
                )
        if role == "assistant":
            out: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(p["text"] for p in parts if p["type"] == "text") or None,
            }
            if calls:
                out["tool_calls"] = calls
            if out["content"] is not None or calls:
                messages.append(out)
        elif parts:
            # text alone goes as one string, as every OpenAI-compatible server takes it: its blocks on
            # lines of their own (Claude Code sends a reminder and the question as two blocks)
            only_text = all(p["type"] == "text" for p in parts)
            messages.append({"role": role, "content": _text_of(parts) if only_text else parts})
    request: dict[str, Any] = {"model": body.get("model"), "messages": messages, "max_tokens": body.get("max_tokens")}
    for source, target in (("temperature", "temperature"), ("top_p", "top_p"), ("stream", "stream")):
        if body.get(source) is not None:
            request[target] = body[source]
    if body.get("stop_sequences"):
        request["stop"] = list(body["stop_sequences"])[:4]
    if body.get("tools"):
        request["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {},
                },
            }
            for t in body["tools"]
            if isinstance(t, dict) and t.get("name")
        ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if kind == "tool":
            mapped = {"type": "function", "function": {"name": choice.get("name")}}
        if mapped is not None:
            request["tool_choice"] = mapped
        if choice.get("disable_parallel_tool_use"):
            request["parallel_tool_calls"] = False
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str):
        request["user"] = user
    config = body.get("output_config")
    form = config.get("format") if isinstance(config, dict) else None
    if isinstance(form, dict) and form.get("type") == "json_schema" and isinstance(form.get("schema"), dict):
        request["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "output", "schema": form["schema"]}}
    return request


# -- OpenAI reply/stream -> Anthropic (the /v1/messages door) ------------------------------


def openai_to_anthropic_reply(reply: dict[str, Any], model: str, usage: Usage) -> dict[str, Any]:
    choice = next(iter(objects(reply.get("choices"))), {})
    message = obj(choice.get("message"))
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": str(message["content"])})
    for call in objects(message.get("tool_calls")):
        function = obj(call.get("function"))
        try:
            arguments = obj(json.loads(function.get("arguments") or "{}"))
        except (ValueError, TypeError):
            arguments = {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_id("toolu_"),
                "name": function.get("name"),
                "input": arguments,
            }
        )
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": OPENAI_FINISH_TO_ANTHROPIC.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None,
        "usage": usage_to_anthropic(usage),
    }


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]
