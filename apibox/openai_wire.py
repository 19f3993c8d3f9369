"""Helpers for OpenAI's wire format shared by providers and the gateway (pure)."""

from __future__ import annotations

from typing import Any

from apibox.pricing import Usage, count_at, token_count
from apibox.shapes import ChunkShape


def _details(raw: dict[str, Any], name: str) -> dict[str, Any]:
    details = raw.get(name)
    return details if isinstance(details, dict) else {}


def usage_from_openai(raw: Any) -> Usage | None:
    """OpenAI's ``usage`` object (with DeepSeek's cache fields) -> Usage. None when it is absent
    or is no report (``pricing.token_count``: ``{}``, counts as strings or below 0). An answer's count that
    is missing is the total less the prompt (embeddings report no answer, and a total the same
    as the prompt); without a total either, that is no report."""
    if not isinstance(raw, dict):
        return None
    prompt = token_count(raw.get("prompt_tokens"))
    if not prompt:  # some servers use Responses-style names
        prompt = token_count(raw.get("input_tokens")) or prompt
    given = raw.get("completion_tokens", raw.get("output_tokens"))
    if given is not None:
        completion = token_count(given)
    else:
        total = token_count(raw.get("total_tokens"))
        completion = total - prompt if total is not None and prompt is not None and total >= prompt else None
    if prompt is None or completion is None or prompt < 1:  # no report (pricing.token_count)
        return None
    prompt_details = _details(raw, "prompt_tokens_details")
    completion_details = _details(raw, "completion_tokens_details")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=count_at(prompt_details, "cached_tokens") or count_at(raw, "prompt_cache_hit_tokens"),
        cache_write_tokens=count_at(prompt_details, "cache_write_tokens"),
        cache_write_1h_tokens=count_at(prompt_details, "cache_write_1h_tokens"),
        reasoning_tokens=count_at(completion_details, "reasoning_tokens"),
    )


def usage_to_openai(usage: Usage, cost_usd: float | None = None) -> dict[str, Any]:
    """Usage -> OpenAI's ``usage`` object, with apibox's ``cost`` (USD) when known."""
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    if usage.cache_write_tokens:
        body["prompt_tokens_details"]["cache_write_tokens"] = usage.cache_write_tokens
    if usage.cache_write_1h_tokens:  # (of those, kept an hour: Anthropic's, dearer)
        body["prompt_tokens_details"]["cache_write_1h_tokens"] = usage.cache_write_1h_tokens
    if cost_usd is not None:
        body["cost"] = cost_usd
    return body


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def delta_text(chunk: dict[str, Any]) -> str:
    """The text a streamed chunk delivers (content, refusal, reasoning, tool arguments, legacy text)."""
    return _choices_text(chunk, "delta")


def reply_text(reply: dict[str, Any]) -> str:
    """The text a whole reply delivers, counted as its stream's chunks would be."""
    return _choices_text(reply, "message")


def _choices_text(body: dict[str, Any], part: str) -> str:
    """The text of each choice's ``part`` (its delta or message), and of its legacy ``text``."""
    pieces: list[str] = []
    choices = body.get("choices")
    if type(choices) is not list:
        return ""
    for choice in choices:
        if type(choice) is not dict:
            continue
        if isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
        fields = choice.get(part)
        if not isinstance(fields, dict):
            continue
        for field, value in fields.items():  # a delta has a field or two: fewer steps than looking up each
            if type(value) is str:
                if field in _DELIVERED_FIELDS:
                    pieces.append(value)
            elif field == "tool_calls" and type(value) is list:
                for call in value:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        pieces.extend(v for v in (function.get("name"), function.get("arguments"))
                                      if isinstance(v, str))
    return "".join(pieces)


# The delta fields a plain chunk may add its text to (the answer, or a reasoning model's thinking
# as DeepSeek and vLLM (``reasoning_content``) or Ollama and OpenRouter (``reasoning``) send it),
# and those that must then be empty.
_TEXT_FIELDS = frozenset({"content", "reasoning_content", "reasoning"})
# The string fields a chunk or message delivers as output: the text fields, and a refusal.
_DELIVERED_FIELDS = _TEXT_FIELDS | {"refusal"}
_NOT_PLAIN_FIELDS = frozenset({"refusal", "tool_calls", "function_call"})
_PLAIN_CHOICE_KEYS = frozenset({"index", "delta", "logprobs", "finish_reason"})
# OpenAI's padding against length side channels: a random string in every chunk, unless the
# request says ``stream_options.include_obfuscation: false``.
PADDING_KEY = "obfuscation"


def learn_shape(chunk: dict[str, Any], raw: bytes) -> ChunkShape | None:
    """The shape of an OpenAI chunk (``raw``, parsed as ``chunk``) that only adds text, else None."""
    found = _plain_text(chunk)
    if found is None:
        return None
    field, text = found
    return ChunkShape.around(chunk, ("choices", 0, "delta", field), text, raw, PADDING_KEY)


def _plain_text(chunk: dict[str, Any]) -> tuple[str, str] | None:
    """The delta field and text of a chunk that does nothing but add text to its one choice, else
    None. Its delta's other text fields are null or empty; any other field (``role``) is left to
    the shape's bytes, which later chunks must repeat."""
    if "error" in chunk or chunk.get("usage") is not None:
        return None
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict or not choice.keys() <= _PLAIN_CHOICE_KEYS:
        return None
    if choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict:
        return None
    text = delta.get("content")
    if len(delta) == 1 and type(text) is str:  # the usual one (an empty text too: later ones add some)
        return "content", text
    found = None
    for field, value in delta.items():
        if field in _TEXT_FIELDS:
            if value is None or value == "":
                continue
            if found is not None or type(value) is not str:
                return None
            found = field, value
        elif field in _NOT_PLAIN_FIELDS and value:
            return None
    return found
