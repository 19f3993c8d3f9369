"""Helpers for OpenAI's wire format shared by providers and the gateway (pure)."""

from __future__ import annotations

import re
from itertools import islice, repeat
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
    """The text a streamed chunk delivers (content, refusal, reasoning, tool arguments, legacy text)."""
    pieces: list[str] = []
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        for field, value in delta.items():  # a delta has a field or two: fewer steps than looking up each
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


_DELIVERED_FIELDS = frozenset({"content", "refusal", "reasoning_content", "reasoning"})


# Bytes that end a JSON string or start an escape in it; a text without them is its own JSON encoding.
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')
# The delta fields a plain chunk may add its text to (the answer, or a reasoning model's thinking
# as DeepSeek and vLLM (``reasoning_content``) or Ollama and OpenRouter (``reasoning``) send it),
# and those that must then be empty.
_TEXT_FIELDS = frozenset({"content", "reasoning_content", "reasoning"})
_NOT_PLAIN_FIELDS = frozenset({"refusal", "tool_calls", "function_call"})
_PLAIN_CHOICE_KEYS = frozenset({"index", "delta", "logprobs", "finish_reason"})
# OpenAI's padding against length side channels: a random string in every chunk, unless the
# request says ``stream_options.include_obfuscation: false``.
_PAD_KEY = b'"obfuscation"'
_PAD_KEYS = (b'"obfuscation":"', b'"obfuscation": "')


class ChunkShape:
    """The bytes a stream's plain text chunks share: everything around the text (and the padding).

    Most chunks of a stream differ from each other only in the text they add (same id, model,
    created, one choice adding to one delta field, ``content`` or a reasoning model's thinking, no
    finish_reason, no usage) and, from OpenAI, in a random ``obfuscation`` string after the
    choices. One such chunk, parsed, is the shape; a later chunk whose bytes are ``prefix + TEXT +
    suffix`` (padded: ``prefix + TEXT + inner + PAD + suffix``), with TEXT and PAD free of quotes,
    backslashes and control characters, is the same JSON document with other strings, so it
    needs no parsing: ``read_run`` reads a run of them. ``learn`` returns None for a chunk that
    is not plain.
    """

    __slots__ = ("chunk", "inner", "pad", "path", "prefix", "suffix", "text")

    def __init__(self, chunk: dict[str, Any], path: tuple[str | int, ...], prefix: bytes, text: str,
                 suffix: bytes, inner: bytes = b"", pad: bytes = b"") -> None:
        self.chunk, self.path, self.prefix, self.text, self.suffix = chunk, path, prefix, text, suffix
        self.inner, self.pad = inner, pad  # b"" and b"" when the chunks are not padded

    @property
    def field(self) -> str | int:
        """The key of the text's field."""
        return self.path[-1]

    @classmethod
    def learn(cls, chunk: dict[str, Any], raw: bytes) -> ChunkShape | None:
        """The shape of an OpenAI chunk that only adds text, else None."""
        found = _plain_text(chunk)
        if found is None:
            return None
        field, text = found
        return cls.around(chunk, ("choices", 0, "delta", field), text, raw)

    @classmethod
    def around(cls, document: dict[str, Any], path: tuple[str | int, ...], text: str,
               raw: bytes) -> ChunkShape | None:
        """The shape of ``raw``, the bytes of ``document``, around ``text``, the string at ``path``
        (its last step a key that occurs once in ``raw``); None when that text or the padding
        cannot be found safely. Serves any stream of JSON events, Anthropic's text deltas too."""
        encoded = text.encode()
        key = b'"%s"' % str(path[-1]).encode()
        if _NOT_PLAIN.search(encoded) or raw.count(key) != 1:
            return None
        for form in (key + b':"', key + b': "'):  # as compact and spaced encoders write it
            if raw.count(form) == 1:
                start = raw.index(form) + len(form)
                end = start + len(encoded)
                if raw[start:end] != encoded or raw[end:end + 1] != b'"':
                    return None
                pad = document.get("obfuscation")
                if pad is None:
                    return cls(document, path, raw[:start], text, raw[end:])
                split = _split_at_padding(raw, end, pad)
                return cls(document, path, raw[:start], text, split[2], split[0], split[1]) if split else None
        return None

    def read_run(self, payloads: list[bytes], start: int) -> PlainRun | None:
        """The chunks of this shape from ``payloads[start]`` on, up to the first that is not one
        (None when the first is not one)."""
        prefix, suffix = self.prefix, self.suffix
        head, tail = len(prefix), len(suffix)
        middles = []
        if not self.inner:
            for raw in islice(payloads, start, None):
                if len(raw) < head + tail or not raw.startswith(prefix) or not raw.endswith(suffix):
                    break
                middles.append(raw[head:len(raw) - tail])
            return self._run(middles, None)
        inner, pads = self.inner, []
        for raw in islice(payloads, start, None):
            if len(raw) < head + tail or not raw.startswith(prefix) or not raw.endswith(suffix):
                break
            # the inner bytes begin with a quote: the first time they occur, a plain text has ended
            # (a text that is not plain ends the run whatever is found)
            middle, found, pad = raw[head:len(raw) - tail].partition(inner)
            if not found:
                break
            middles.append(middle)
            pads.append(pad)
        return self._run(middles, pads)

    def _run(self, middles: list[bytes], pads: list[bytes] | None) -> PlainRun | None:
        """The run of those ``middles`` (and ``pads``) that are plain and UTF-8, up to the first that is not."""
        if not middles:
            return None
        if not _NOT_PLAIN.search(b"".join(middles)) and (pads is None or _plain_ascii(b"".join(pads))):
            try:  # the usual case: one scan and one decode. NUL is in none of them, and ends any UTF-8
                return PlainRun(self, b"\0".join(middles).decode().split("\0"), middles, pads)  # cut short
            except UnicodeDecodeError:
                pass
        texts = []
        for index, middle in enumerate(middles):  # the run ends before the first that is not plain
            text = _plain_utf8(middle)
            if text is None or (pads is not None and _plain_utf8(pads[index]) is None):
                break
            texts.append(text)
        if not texts:
            return None
        count = len(texts)
        return PlainRun(self, texts, middles[:count], pads[:count] if pads is not None else None)

    def chunk_with(self, text: str, pad: bytes | None = None) -> dict[str, Any]:
        """The chunk of this shape that adds ``text`` (padded with ``pad``), parsed (for renderers that translate)."""
        chunk = _with_text(self.chunk, self.path, text)
        if pad is not None:
            chunk["obfuscation"] = pad.decode()
        return chunk


class PlainRun:
    """Consecutive chunks of ``shape`` that only add text, left unparsed: their ``texts`` and, for
    each, its text's bytes as they came (``middles``) and, when the shape is padded, its padding's
    (``pads``), so a renderer can frame them all at once."""

    __slots__ = ("middles", "pads", "shape", "texts")

    def __init__(self, shape: ChunkShape, texts: list[str], middles: list[bytes],
                 pads: list[bytes] | None = None) -> None:
        self.shape = shape
        self.texts = texts
        self.middles = middles
        self.pads = pads

    def head(self, count: int) -> PlainRun:
        """The run's first ``count`` chunks."""
        pads = self.pads[:count] if self.pads is not None else None
        return PlainRun(self.shape, self.texts[:count], self.middles[:count], pads)

    def framed(self, before: bytes, after: bytes, inner: bytes = b"") -> bytes:
        """Each chunk's text (then ``inner`` and its padding, when padded) between ``before`` and
        ``after``: the frames of the whole run, in one join."""
        if self.pads is None:
            return before + (after + before).join(self.middles) + after
        padded = map(b"".join, zip(self.middles, repeat(inner), self.pads))  # text + inner + padding, in C
        return before + (after + before).join(padded) + after

    def parsed(self) -> list[dict[str, Any]]:
        if self.pads is None:
            return [self.shape.chunk_with(text) for text in self.texts]
        return [self.shape.chunk_with(text, pad) for text, pad in zip(self.texts, self.pads, strict=True)]


class LatestShapes:
    """A stream's latest two shapes: a reasoning model's thinking, then its answer; or a stream
    whose shared bytes change (Ollama's ``created`` moves on each second)."""

    __slots__ = ("before", "latest")

    def __init__(self) -> None:
        self.latest: ChunkShape | None = None
        self.before: ChunkShape | None = None

    def read_run(self, payloads: list[bytes], start: int) -> PlainRun | None:
        """The run from ``payloads[start]`` on of whichever shape it has, the latest tried first."""
        latest = self.latest
        if latest is None:
            return None
        run = latest.read_run(payloads, start)
        if run is None and self.before is not None:
            run = self.before.read_run(payloads, start)
            if run is not None:
                self.latest, self.before = self.before, latest
        return run

    def learn(self, shape: ChunkShape | None) -> None:
        if shape is not None:
            self.latest, self.before = shape, self.latest


def _with_text(value: Any, path: tuple[str | int, ...], text: str) -> Any:
    """A copy of ``value`` with ``text`` at ``path``, copying only the lists and dicts on the way."""
    step = path[0]
    copy = list(value) if type(value) is list else dict(value)
    copy[step] = _with_text(value[step], path[1:], text) if len(path) > 1 else text
    return copy


def _split_at_padding(raw: bytes, end: int, pad: object) -> tuple[bytes, bytes, bytes] | None:
    """``raw[end:]`` (after a plain chunk's text) as (inner, padding, suffix) around its top-level
    ``obfuscation`` string; None when that cannot be found safely (the key occurs more than once,
    or before the text; the padding is not plain)."""
    if type(pad) is not str:
        return None
    encoded = pad.encode()
    if _NOT_PLAIN.search(encoded) or raw.count(_PAD_KEY) != 1:
        return None
    for key in _PAD_KEYS:
        at = raw.find(key, end)
        if at >= 0:
            start = at + len(key)
            stop = start + len(encoded)
            if raw[start:stop] == encoded and raw[stop:stop + 1] == b'"':
                return raw[end:start], encoded, raw[stop:]
            return None
    return None


def _plain_ascii(data: bytes) -> bool:
    return data.isascii() and not _NOT_PLAIN.search(data)


def _plain_utf8(data: bytes) -> str | None:
    """``data`` decoded, when it is UTF-8 that is its own JSON string encoding."""
    if _NOT_PLAIN.search(data):
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


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
    if len(delta) == 1 and type(text) is str:  # the usual one
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
