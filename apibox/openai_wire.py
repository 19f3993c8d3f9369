"""Helpers for OpenAI's wire format shared by providers and the gateway (pure)."""

from __future__ import annotations

from typing import Any

from apibox.pricing import Usage


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_openai(raw: Any) -> Usage | None:
    """OpenAI's ``usage`` object (with DeepSeek's cache fields) -> Usage; None when absent."""
    if not isinstance(raw, dict):
        return None
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    cached = _int(prompt_details.get("cached_tokens")) or _int(raw.get("prompt_cache_hit_tokens"))
    prompt = _int(raw.get("prompt_tokens"))
    if not prompt and raw.get("input_tokens"):  # some servers use Responses-style names
        prompt = _int(raw.get("input_tokens"))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=_int(raw.get("completion_tokens")) or _int(raw.get("output_tokens")),
        cached_tokens=cached,
        cache_write_tokens=_int(prompt_details.get("cache_write_tokens")),
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")),
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
    if cost_usd is not None:
        body["cost"] = cost_usd
    return body


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def delta_text(chunk: dict[str, Any]) -> str:
    """The text a streamed chunk delivers (content, refusal, tool arguments, legacy text)."""
    pieces: list[str] = []
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        for field in ("content", "refusal", "reasoning_content"):
            if isinstance(delta.get(field), str):
                pieces.append(delta[field])
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                pieces.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
    return "".join(pieces)
