"""Gemini generateContent <-> OpenAI chat: requests, replies, streams and usage (pure).

PROTOCOLS.md sections 3 and 4.5-4.6. Gemini has no stable tool-call ids and wants its
thought signatures back with each function call, so callers pass a ``signatures`` mapping
(tool-call id -> signature) that lives across turns.
"""

from __future__ import annotations

import json
import mimetypes
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from apibox.errors import InvalidRequest
from apibox.jsoncodec import obj, objects
from apibox.openai_wire import usage_to_openai
from apibox.pricing import Usage, count_at, token_count

SKIP_SIGNATURE = "skip_thought_signature_validator"
FILTERED = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
}


def usage_from_gemini(raw: Any) -> Usage | None:
    """Gemini's ``usageMetadata`` -> Usage (thoughts are output); None when it is absent or is no
    report (``pricing.token_count``). Gemini leaves out ``candidatesTokenCount`` when the answer is
    empty: then it is the total less the rest, and without a total, no report (a stream's early
    chunks may count the prompt alone)."""
    if not isinstance(raw, dict):
        return None
    prompt, thoughts = token_count(raw.get("promptTokenCount")), count_at(raw, "thoughtsTokenCount")
    tools = count_at(raw, "toolUsePromptTokenCount")
    answer = token_count(raw["candidatesTokenCount"]) if "candidatesTokenCount" in raw else None
    if answer is None and "candidatesTokenCount" not in raw and prompt is not None:
        total = token_count(raw.get("totalTokenCount"))
        answer = total - prompt - tools - thoughts if total is not None and total >= prompt + tools + thoughts else None
    if prompt is None or answer is None or prompt < 1:  # no report (pricing.token_count)
        return None
    return Usage(
        prompt_tokens=prompt + tools,
        completion_tokens=answer + thoughts,
        cached_tokens=count_at(raw, "cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    if reason is None:
        return None
    if reason == "MAX_TOKENS":
        return "length"
    if reason in FILTERED:
        return "content_filter"
    return "tool_calls" if has_calls else "stop"


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content or ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and part.get("text"):
            parts.append({"text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str) and url.startswith("data:"):
                header, _, data = url.partition(",")
                parts.append({"inlineData": {"mimeType": header[5:].split(";")[0], "data": data}})
            elif isinstance(url, str):  # a Files API URI, or a public URL: typed by its name when it has one
                kind = mimetypes.guess_type(url.split("?", 1)[0])[0]
                parts.append({"fileData": {"fileUri": url, **({"mimeType": kind} if kind else {})}})
    return parts


def openai_to_gemini_request(body: dict[str, Any], signatures: MutableMapping[str, str]) -> dict[str, Any]:
    """An OpenAI chat request as a generateContent body (the model goes in the URL)."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for message in body.get("messages") or ():
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.extend(_parts(content))
        elif role == "user":
            add("user", _parts(content))
        elif role == "assistant":
            parts = _parts(content)
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                call_names[call.get("id", "")] = function.get("name", "")
                try:
                    args = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    raise InvalidRequest("a tool call's `arguments` is not valid JSON", param="messages") from None
                if not isinstance(args, dict):  # Gemini's functionCall.args is an object
                    raise InvalidRequest("a tool call's `arguments` must be a JSON object", param="messages")
                parts.append(
                    {
                        "functionCall": {"name": function.get("name", ""), "args": args},
                        "thoughtSignature": signatures.get(call.get("id", ""), SKIP_SIGNATURE),
                    }
                )
            add("model", parts)
        elif role == "tool":
            text = (
                content
                if isinstance(content, str)
                else "".join(p.get("text", "") for p in content or () if isinstance(p, dict))
            )
            try:
                output: Any = json.loads(text)
            except ValueError:
                output = text
            name = call_names.get(message.get("tool_call_id", ""), message.get("name", ""))
            add("user", [{"functionResponse": {"name": name, "response": {"output": output}}}])
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    for key, value in (
        ("maxOutputTokens", limit),
        ("temperature", body.get("temperature")),
        ("topP", body.get("top_p")),
        ("candidateCount", body.get("n")),
        ("seed", body.get("seed")),
        ("presencePenalty", body.get("presence_penalty")),
        ("frequencyPenalty", body.get("frequency_penalty")),
    ):
        if value is not None:
            config[key] = value
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    response_format = body.get("response_format") or {}
    if response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema:
            config["responseJsonSchema"] = schema
    if config:
        out["generationConfig"] = config
    tools = [
        t["function"] for t in body.get("tools") or () if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    if tools:
        out["tools"] = [
            {
                "functionDeclarations": [
                    {
                        "name": f.get("name", ""),
                        **({"description": f["description"]} if f.get("description") else {}),
                        **({"parametersJsonSchema": f["parameters"]} if f.get("parameters") else {}),
                    }
                    for f in tools
                ]
            }
        ]
        choice = body.get("tool_choice")
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(choice) if isinstance(choice, str) else None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            out["toolConfig"] = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
        elif mode:
            out["toolConfig"] = {"functionCallingConfig": {"mode": mode}}
    return out


@dataclass(slots=True)
class _Answer:
    """What one candidate of a Gemini response adds to its choice."""

    index: int
    text: str
    calls: list[dict[str, Any]]
    finish: str | None


def _index(candidate: dict[str, Any]) -> int:
    """A candidate's index; Gemini leaves it out when it is 0 (proto3's JSON omits defaults)."""
    index = candidate.get("index")
    return index if type(index) is int and index >= 0 else 0


class GeminiToOpenAI:
    """Gemini responses (whole or streamed chunks) -> OpenAI replies or chunks.

    Each candidate is a choice (``candidateCount`` is OpenAI's ``n``), its index the candidate's
    own, since a streamed chunk may carry some of the candidates only."""

    def __init__(self, model: str, signatures: MutableMapping[str, str]) -> None:
        self.model = model
        self.signatures = signatures
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.usage: Usage | None = None
        self.tool_counts: dict[int, int] = {}  # per choice: the tool calls it has made so far
        self.started: set[int] = set()  # the choices whose role chunk has been sent
        self.ended: set[int] = set()  # and those whose finish has

    @property
    def finished(self) -> bool:
        """Every choice begun has finished."""
        return bool(self.ended) and self.started <= self.ended

    def _read(self, response: dict[str, Any]) -> list[_Answer]:
        self.usage = usage_from_gemini(response.get("usageMetadata")) or self.usage
        candidates = objects(response.get("candidates"))
        if not candidates:
            blocked = obj(response.get("promptFeedback")).get("blockReason")
            return [_Answer(0, "", [], "content_filter" if blocked else None)]
        indexes = [_index(candidate) for candidate in candidates]
        if len(set(indexes)) < len(indexes):  # numbered alike (a server that numbers none): by their order
            indexes = list(range(len(candidates)))
        return [self._answer(candidate, index) for candidate, index in zip(candidates, indexes, strict=True)]

    def _answer(self, candidate: dict[str, Any], index: int) -> _Answer:
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        made = self.tool_counts.get(index, 0)
        for part in objects(obj(candidate.get("content")).get("parts")):
            if "text" in part and not part.get("thought"):
                text.append(str(part["text"]))
            elif "functionCall" in part:
                call = obj(part["functionCall"])
                call_id = call.get("id") or "call_" + uuid.uuid4().hex[:24]
                if part.get("thoughtSignature"):
                    self.signatures[call_id] = part["thoughtSignature"]
                calls.append(
                    {
                        "index": made + len(calls),
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.get("name", ""), "arguments": json.dumps(call.get("args") or {})},
                    }
                )
        self.tool_counts[index] = made + len(calls)
        return _Answer(index, "".join(text), calls, finish_reason(candidate.get("finishReason"), made + len(calls) > 0))

    def reply(self, response: dict[str, Any]) -> dict[str, Any]:
        choices = []
        for answer in sorted(self._read(response), key=lambda answer: answer.index):
            message: dict[str, Any] = {"role": "assistant", "content": answer.text if answer.text or not answer.calls
                                       else None, "refusal": None}
            if answer.calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in answer.calls]
            choices.append({"index": answer.index, "message": message, "logprobs": None,
                            "finish_reason": answer.finish or "stop"})
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **({"usage": usage_to_openai(self.usage)} if self.usage is not None else {}),  # none: estimated
        }

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def chunks(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        """One streamed Gemini chunk -> the OpenAI chunks it stands for, a choice's role chunk first."""
        out: list[dict[str, Any]] = []
        for answer in self._read(response):
            index = answer.index
            if index not in self.started:
                self.started.add(index)
                out.append(self._chunk(index, {"role": "assistant", "content": ""}))
            if answer.text:
                out.append(self._chunk(index, {"content": answer.text}))
            if answer.calls:
                out.append(self._chunk(index, {"tool_calls": answer.calls}))
            if answer.finish:
                self.ended.add(index)
                out.append(self._chunk(index, {}, answer.finish))
        return out

    def usage_chunk(self) -> dict[str, Any] | None:
        if self.usage is None:
            return None
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_to_openai(self.usage),
        }
