"""Streams of JSON events that differ only in one string, read by their bytes instead of parsed.

An LLM streams its answer a few characters at a time, each piece a JSON event that repeats
everything else of the one before. ``ChunkShape`` learns those shared bytes from one parsed
event; ``read_run`` then recognizes the following events by a prefix and suffix compare and
hands them on as a ``PlainRun``: their texts, for counting, and their bytes, for writing to the
client in one join. The wire formats say which events are plain (``openai_wire``,
``providers.anthropic``); this module only reads bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import islice, repeat
from typing import Any

# Bytes that end a JSON string or start an escape in it; a text without them is its own JSON encoding.
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')


class ChunkShape:
    """The bytes a stream's plain text chunks share: everything around the text (and the padding).

    Most chunks of a stream differ from each other only in the text they add: an OpenAI chunk's
    id, model and created are the stream's, its one choice adds to one delta field; an Anthropic
    text delta differs only in its text. OpenAI's also differ in a random padding string after
    the choices. One such chunk, parsed, is the shape (``around``); a later chunk whose bytes are
    ``prefix + TEXT + suffix`` (padded: ``prefix + TEXT + inner + PAD + suffix``), with TEXT and
    PAD free of quotes, backslashes and control characters, is the same JSON document with other
    strings, so it needs no parsing: ``read_run`` reads a run of them. Which chunks are plain is
    the wire format's to say (``openai_wire.learn_shape``, ``providers.anthropic``).
    """

    __slots__ = ("chunk", "inner", "pad", "pad_key", "path", "prefix", "suffix", "text")

    def __init__(self, chunk: dict[str, Any], path: tuple[str | int, ...], prefix: bytes, text: str,
                 suffix: bytes, inner: bytes = b"", pad: bytes = b"", pad_key: str = "") -> None:
        self.chunk, self.path, self.prefix, self.text, self.suffix = chunk, path, prefix, text, suffix
        self.inner, self.pad, self.pad_key = inner, pad, pad_key  # b"", b"" and "" when not padded

    @property
    def field(self) -> str | int:
        """The key of the text's field."""
        return self.path[-1]

    @classmethod
    def around(cls, document: dict[str, Any], path: tuple[str | int, ...], text: str, raw: bytes,
               pad_key: str | None = None) -> ChunkShape | None:
        """The shape of ``raw``, the bytes of ``document``, around ``text``, the string at ``path``
        (its last step a key that occurs once in ``raw``), and around the padding string at the top
        level's ``pad_key`` when there is one after the text; None when either cannot be found safely."""
        encoded = text.encode()
        start = _string_at(raw, str(path[-1]), encoded)
        if start is None:
            return None
        end = start + len(encoded)
        if pad_key is None or document.get(pad_key) is None:
            return cls(document, path, raw[:start], text, raw[end:])
        pad = document[pad_key]
        if type(pad) is not str:
            return None
        padding = pad.encode()
        pad_start = _string_at(raw, pad_key, padding, end)  # after the text: the inner bytes lie between
        if pad_start is None:
            return None
        pad_end = pad_start + len(padding)
        return cls(document, path, raw[:start], text, raw[pad_end:], raw[end:pad_start], padding, pad_key)

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
            chunk[self.pad_key] = pad.decode()
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

    def nonempty(self, start: int = 0) -> PlainRun | None:
        """The run's chunks from ``start`` on that add some text (a translation makes no event of
        an empty one); None when none does."""
        kept = [index for index in range(start, len(self.texts)) if self.texts[index]]
        if len(kept) == len(self.texts):
            return self
        if not kept:
            return None
        pads = None if self.pads is None else [self.pads[index] for index in kept]
        return PlainRun(self.shape, [self.texts[index] for index in kept], [self.middles[index] for index in kept],
                        pads)

    def framed(self, before: bytes, after: bytes, inner: bytes = b"") -> bytes:
        """Each chunk's text (then ``inner`` and its padding, when padded) between ``before`` and
        ``after``: the frames of the whole run, in one join."""
        if self.pads is None:
            return before + (after + before).join(self.middles) + after
        padded = map(b"".join, zip(self.middles, repeat(inner), self.pads))  # text + inner + padding, in C
        return before + (after + before).join(padded) + after

    def parsed(self) -> list[dict[str, Any]]:
        """Each chunk of the run, parsed (for renderers that translate)."""
        if self.pads is None:
            return [self.shape.chunk_with(text) for text in self.texts]
        return [self.shape.chunk_with(text, pad) for text, pad in zip(self.texts, self.pads, strict=True)]


class LatestShapes:
    """A stream's latest few shapes, the one last used first: a reasoning model's thinking, then
    its answer; each choice of a stream asked for ``n`` > 1 answers (a chunk's choice index is in
    its bytes); or a stream whose shared bytes change (Ollama's ``created`` moves on each second)."""

    __slots__ = ("shapes",)

    KEPT = 4  # beyond that a stream parses its chunks: a miss tries every shape kept

    def __init__(self) -> None:
        self.shapes: list[ChunkShape] = []

    def read_run(self, payloads: list[bytes], start: int) -> PlainRun | None:
        """The run from ``payloads[start]`` on of whichever shape it has, the one last used tried first."""
        shapes = self.shapes
        if not shapes:
            return None
        run = shapes[0].read_run(payloads, start)
        if run is None:
            for position in range(1, len(shapes)):
                run = shapes[position].read_run(payloads, start)
                if run is not None:
                    shapes.insert(0, shapes.pop(position))
                    break
        return run

    def split(self, payloads: list[bytes]) -> Iterator[PlainRun | int]:
        """A read's payloads in turn: each run of chunks of a shape as one ``PlainRun``, any other
        payload as its index (to be parsed; what it teaches, ``learn``, applies from the next)."""
        index, count = 0, len(payloads)
        while index < count:
            run = self.read_run(payloads, index)
            if run is None:
                yield index
                index += 1
            else:
                yield run
                index += len(run.texts)

    def learn(self, shape: ChunkShape | None) -> None:
        if shape is not None:
            self.shapes.insert(0, shape)
            del self.shapes[self.KEPT:]


def _with_text(value: Any, path: tuple[str | int, ...], text: str) -> Any:
    """A copy of ``value`` with ``text`` at ``path``, copying only the lists and dicts on the way."""
    step = path[0]
    copy = list(value) if type(value) is list else dict(value)
    copy[step] = _with_text(value[step], path[1:], text) if len(path) > 1 else text
    return copy


def _string_at(raw: bytes, key: str, value: bytes, since: int = 0) -> int | None:
    """Where ``value``, the string of ``key``, begins in ``raw`` (a JSON document that holds it),
    when it is found safely: ``key`` occurs once, after ``since``, written as compact or spaced
    encoders write it, and ``value`` is its own JSON encoding; else None."""
    name = b'"%s"' % key.encode()
    if _NOT_PLAIN.search(value) or raw.count(name) != 1:
        return None
    for form in (name + b':"', name + b': "'):
        at = raw.find(form, since)
        if at >= 0:
            start = at + len(form)
            stop = start + len(value)
            return start if raw[start:stop] == value and raw[stop:stop + 1] == b'"' else None
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
