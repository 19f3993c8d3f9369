"""Helpers for OpenAI's wire format shared by providers and the gateway (pure)."""

from __future__ import annotations

import re
from itertools import islice
from typing import Any

from apibox.pricing import Usage


def _int(value: Any) -> int:
    """A positive count as JSON gave it, else 0 (``type(...) is int`` leaves out JSON's true and false)."""
    return value if type(value) is int and value > 0 else 0


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


# Bytes that end a JSON string or start an escape in it; a text without them is its own JSON encoding.
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')
_CONTENT_KEYS = (b'"content":"', b'"content": "')
_PLAIN_CHOICE_KEYS = frozenset({"index", "delta", "logprobs", "finish_reason"})


class ChunkShape:
    """The bytes a stream's plain content chunks share: everything around the text.

    Most chunks of a stream differ from each other only in the text they add (same id, model,
    created, one choice adding content, no finish_reason, no usage). One such chunk, parsed, is
    the shape; a later chunk whose bytes are ``prefix + TEXT + suffix`` with TEXT free of quotes,
    backslashes and control characters is the same JSON document with another content string,
    so it needs no parsing: ``read_run`` reads a run of them. ``learn`` returns None for a chunk that is not plain.
    """

    __slots__ = ("chunk", "prefix", "suffix", "text")

    def __init__(self, chunk: dict[str, Any], prefix: bytes, text: str, suffix: bytes) -> None:
        self.chunk, self.prefix, self.text, self.suffix = chunk, prefix, text, suffix

    @classmethod
    def learn(cls, chunk: dict[str, Any], raw: bytes) -> ChunkShape | None:
        text = _plain_text(chunk)
        if text is None:
            return None
        encoded = text.encode()
        if _NOT_PLAIN.search(encoded) or raw.count(b'"content"') != 1:
            return None
        for key in _CONTENT_KEYS:
            if raw.count(key) == 1:
                start = raw.index(key) + len(key)
                end = start + len(encoded)
                if raw[start:end] == encoded and raw[end:end + 1] == b'"':
                    return cls(chunk, raw[:start], text, raw[end:])
                return None
        return None

    def read_run(self, payloads: list[bytes], start: int) -> tuple[list[str], list[bytes]]:
        """The texts of the chunks of this shape from ``payloads[start]`` on, up to the first that is
        not one, and each text's bytes as they came (``[], []`` when the first is not one)."""
        prefix, suffix = self.prefix, self.suffix
        head, tail = len(prefix), len(suffix)
        middles = []
        for raw in islice(payloads, start, None):
            if len(raw) < head + tail or not raw.startswith(prefix) or not raw.endswith(suffix):
                break
            middles.append(raw[head:len(raw) - tail])
        if not middles:
            return [], []
        if not _NOT_PLAIN.search(b"".join(middles)):  # the usual case: one scan and one decode for the run
            try:  # NUL is in none of them, and ends any UTF-8 sequence cut short
                return b"\0".join(middles).decode().split("\0"), middles
            except UnicodeDecodeError:
                pass
        texts = []
        for middle in middles:  # the run ends before the first that needs escaping or is not UTF-8
            if _NOT_PLAIN.search(middle):
                break
            try:
                texts.append(middle.decode())
            except UnicodeDecodeError:
                break
        return texts, middles[:len(texts)]

    def chunk_with(self, text: str) -> dict[str, Any]:
        """The chunk of this shape that adds ``text``, parsed (for renderers that translate)."""
        choice = self.chunk["choices"][0]
        return {**self.chunk, "choices": [{**choice, "delta": {**choice["delta"], "content": text}}]}


def _plain_text(chunk: dict[str, Any]) -> str | None:
    """The text of a chunk that does nothing but add content to its one choice, else None."""
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
    if type(delta) is not dict or delta.keys() != {"content"} or type(delta["content"]) is not str:
        return None
    return delta["content"]  # type: ignore[no-any-return]
