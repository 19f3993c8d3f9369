"""OpenAI's Responses API <-> chat completions, for routes whose upstream speaks only chat (pure).

A Responses request becomes a chat request (``chat_request``), and the chat answer becomes a
response (``response_of``) or, streamed, the Responses events (``ChatToResponsesStream``). What
has no chat counterpart (built-in tools such as web search, a ``previous_response_id`` that
only the upstream that stored it knows) is refused on such routes rather than dropped.
"""

from __future__ import annotations

import json
import time
from typing import Any

from apibox.errors import InvalidRequest
from apibox.formats.anthropic import new_id
from apibox.formats.responses import INCOMPLETE, usage_json
from apibox.jsoncodec import obj, objects
from apibox.pricing import Usage

# Request fields that mean the same in chat completions, passed on as they are.
SAME_FIELDS = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "service_tier", "store")


def _unsupported(what: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{what} is not supported on this model's routes, whose upstream speaks only chat "
                          "completions; use a model routed to OpenAI for it.", param=param)


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's content, as chat completions takes it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or a list of content parts.", param=param)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = _object(part, f"{param}[{index}]").get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _string(part, "text", f"{param}[{index}]")})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": _string(part, "image_url", f"{param}[{index}]"),
                                                             "detail": part.get("detail") or "auto"}})
        else:
            raise _unsupported(f"a content part of type {kind!r}", param)
    return parts


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param)
    return value


def _string(part: dict[str, Any], field: str, param: str) -> str:
    if not isinstance(part.get(field), str):
        raise InvalidRequest(f"'{param}.{field}' must be a string.", param=f"{param}.{field}")
    return part[field]  # type: ignore[no-any-return]


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    for index, item in enumerate([{"role": "user", "content": items}] if isinstance(items, str) else items):
        param = f"input[{index}]"
        kind = _object(item, param).get("type", "message")
        if kind == "message" and not isinstance(item.get("role"), str):
            raise InvalidRequest(f"'{param}' is a message without a 'role'.", param=f"{param}.role")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _content(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # consecutive calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # a reasoning model's own notes: chat upstreams take none back
        else:
            raise _unsupported(f"an input item of type {kind!r}", param)
    return messages


def _tools(tools: Any) -> list[dict[str, Any]]:
    converted = []
    for index, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = _object(tool, f"tools[{index}]").get("type")
        if kind != "function":
            raise _unsupported(f"the built-in tool {kind!r}", f"tools[{index}]")
        function = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object"}}
        for field in ("description", "strict"):
            if tool.get(field) is not None:
                function[field] = tool[field]
        converted.append({"type": "function", "function": function})
    return converted


def _response_format(text: Any) -> dict[str, Any] | None:
    form = text.get("format") if isinstance(text, dict) else None
    if not isinstance(form, dict) or form.get("type") in (None, "text"):
        return None
    if form["type"] == "json_object":
        return {"type": "json_object"}
    if form["type"] == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in form.items() if k != "type"}}
    raise _unsupported(f"the text format {form['type']!r}", "text.format")


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as a chat completions request (model, limits and streaming set by the caller)."""
    if body.get("previous_response_id"):
        raise _unsupported("previous_response_id (a response stored upstream)", "previous_response_id")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    chat.update({field: body[field] for field in SAME_FIELDS if body.get(field) is not None})
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    if effort:
        chat["reasoning_effort"] = effort
    return chat


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def _response(response_id: str, created: int, model: str, status: str, output: list[dict[str, Any]],
              usage: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "created_at": created, "status": status,
            "error": None, "incomplete_details": INCOMPLETE if status == "incomplete" else None,
            "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": usage}


def response_of(reply: dict[str, Any], model: str, usage: Usage) -> dict[str, Any]:
    """A whole chat completion as a response: its message, then its tool calls, each an output item."""
    choice = next(iter(objects(reply.get("choices"))), {})
    message = obj(choice.get("message"))
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(_message_item(new_id("msg_"), str(message["content"]), "completed"))
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        function = call["function"] if isinstance(call.get("function"), dict) else {}
        output.append(_call_item(new_id("fc_"), str(call.get("id") or new_id("call_")), str(function.get("name")),
                                 str(function.get("arguments") or ""), "completed"))
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    return _response(new_id("resp_"), int(time.time()), model, status, output, usage_json(usage))


class ChatToResponsesStream:
    """Chat completion chunks in, the Responses API's events out (with their sequence numbers): the
    response created, then each output item opened, filled delta by delta and closed (the
    message's text, each tool call's arguments), then the response completed with its usage.

    Tool calls stay open together until text follows them or the answer ends: a server may send
    the arguments of parallel calls in turns, each fragment under its call's index, and each
    goes to its own item (``output_index``), as clients gather them."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id, self.created = new_id("resp_"), int(time.time())
        self.sequence = -1
        self.started = False
        self.output: list[dict[str, Any]] = []  # every item opened so far, in output order
        self.message: dict[str, Any] | None = None  # the message being written
        self.calls: dict[int, dict[str, Any]] = {}  # a chunk's tool call index -> its item
        self.open_calls: list[dict[str, Any]] = []  # the calls whose arguments may still come
        self.incomplete = False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, **fields, "sequence_number": self.sequence}

    def _start(self) -> list[dict[str, Any]]:
        self.started = True
        response = _response(self.id, self.created, self.model, "in_progress", [], None)
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def _close(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        index = self.output.index(item)
        item["status"] = "completed"
        if item["type"] == "function_call":
            return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
        part = item["content"][0]
        at = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [self._event("response.output_text.done", **at, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **at, part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _close_message(self) -> list[dict[str, Any]]:
        message, self.message = self.message, None
        return self._close(message) if message is not None else []

    def _close_all(self) -> list[dict[str, Any]]:
        events = self._close_message()
        for call in self.open_calls:
            events += self._close(call)
        self.open_calls = []
        return events

    def _open(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        index = len(self.output)
        self.output.append(item)
        shown = {**item, "status": "in_progress"}
        if item["type"] == "message":
            shown["content"] = []
        events = [self._event("response.output_item.added", output_index=index, item=shown)]
        if item["type"] == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return events

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events = [] if self.started else self._start()
        for choice in objects(chunk.get("choices")):
            if choice.get("index", 0) != 0:
                continue  # a Responses answer has one choice
            delta = obj(choice.get("delta"))
            text = delta.get("content")
            if text and type(text) is str:
                if self.message is None:
                    events += self._close_all()
                    self.message = _message_item(new_id("msg_"), "", "in_progress")
                    events += self._open(self.message)
                self.message["content"][0]["text"] += text
                events.append(self._event("response.output_text.delta", item_id=self.message["id"],
                                          output_index=self.output.index(self.message), content_index=0,
                                          delta=text, logprobs=[]))
            for call in objects(delta.get("tool_calls")):
                position = call.get("index", 0)
                function = obj(call.get("function"))
                if position not in self.calls:
                    item = _call_item(new_id("fc_"), call.get("id") or new_id("call_"), function.get("name") or "", "",
                                      "in_progress")
                    self.calls[position] = item
                    events += self._close_message() + self._open(item)
                    self.open_calls.append(item)
                item = self.calls[position]
                arguments = function.get("arguments")
                if arguments and type(arguments) is str and item["status"] == "in_progress":
                    item["arguments"] += arguments
                    events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                              output_index=self.output.index(item), delta=arguments))
            if choice.get("finish_reason") == "length":
                self.incomplete = True
        return events

    def finish(self, usage: Usage) -> list[dict[str, Any]]:
        """The events that end the answer: its open item closed, the response with its usage."""
        events = ([] if self.started else self._start()) + self._close_all()
        status = "incomplete" if self.incomplete else "completed"
        response = _response(self.id, self.created, self.model, status, self.output, usage_json(usage))
        events.append(self._event(f"response.{status}", response=response))
        return events
