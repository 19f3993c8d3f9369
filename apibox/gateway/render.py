"""How streamed answers reach each kind of client.

The billing loop in ``proxy`` reads upstream items (OpenAI chunks, or Anthropic events on a
native pass-through) and hands each to a renderer, which returns the bytes to send, the text
delivered (for counting) and any usage it saw. Renderers also write the ending, the cut at
the paid-for length, and the in-band error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from apibox import jsoncodec
from apibox.errors import ApiboxError
from apibox.formats.anthropic import anthropic_error_type, usage_from_anthropic, usage_to_anthropic
from apibox.formats.anthropic_stream import OpenAIToAnthropicStream
from apibox.formats.responses import INCOMPLETE, TERMINAL_EVENTS, TEXT_DELTA_EVENTS, usage_from_responses, usage_json
from apibox.formats.responses_chat import ChatToResponsesStream
from apibox.money import usd_number
from apibox.openai_wire import delta_text, usage_from_openai, usage_to_openai
from apibox.pricing import Usage
from apibox.shapes import ChunkShape, LatestShapes, PlainRun
from apibox.sse import encode


@dataclass(slots=True)  # not frozen: a frozen dataclass is three times slower to make, and one is made per chunk
class Piece:
    data: bytes
    text: str = ""
    usage: Usage | None = None


class StreamRenderer(Protocol):
    def feed(self, item: dict[str, Any], raw: bytes | None) -> Piece:
        """One parsed upstream item; ``raw``: its bytes as they came (``WireBatch``), when known."""
        ...
    def plain(self, run: PlainRun) -> bytes:
        """A run of chunks or events that only add text (OpenAI chunks, or Anthropic deltas on a
        pass-through); the caller counts its texts (and may cut inside it)."""
        ...
    def cut(self) -> bytes:
        """End the answer where the hold's paid-for length ran out. The stream's loop has sent the
        piece that went past it, as it has counted it: the client gets what it is charged for (up
        to the hold's length)."""
        ...
    def end(self, usage: Usage, cost: int) -> bytes:
        """The stream's last frames, once the answer is complete."""
        ...
    def error(self, failure: ApiboxError) -> bytes:
        """The event that ends a stream with ``failure``, in the door's error shape."""
        ...


class OpenAIRenderer:
    """OpenAI chunks to OpenAI clients: the client's model name, usage only when asked for.

    A chunk that came as OpenAI SSE is passed on as the bytes that came, with the model's name
    replaced in them; it is serialized again only when that cannot be done safely (``_only_key``).
    A ``PlainRun`` (chunks of only text, not parsed) is written as each text (and padding) between
    the bytes its shape shares with the other plain chunks, edited once per stream, in one join.
    """

    def __init__(self, model: str, wants_usage: bool) -> None:
        self.model = model
        self.wants_usage = wants_usage
        self.last: dict[str, Any] = {"id": "chatcmpl-apibox", "object": "chat.completion.chunk",
                                     "created": int(time.time())}
        self.usage_chunk: dict[str, Any] | None = None
        self.upstream_model = self.model
        self.upstream_forms = self.client_forms = model_field(model)
        self.frames: ShapeFrames[tuple[bytes, bytes, bytes] | None] = ShapeFrames()  # a shape a choice

    def feed(self, chunk: dict[str, Any], raw: bytes | None) -> Piece:
        usage = usage_from_openai(chunk["usage"]) if chunk.get("usage") else None
        if usage is not None and not chunk.get("choices"):
            self.usage_chunk = chunk  # sent at the end, with the cost
            return Piece(b"", usage=usage)
        self.last = chunk
        data = self._as_came(chunk, raw) if raw is not None else None
        if data is None:
            if not self.wants_usage:
                chunk.pop("usage", None)
            chunk["model"] = self.model
            data = encode(jsoncodec.dumps(chunk))
        return Piece(data, delta_text(chunk), usage)

    def plain(self, run: PlainRun) -> bytes:
        around = self.frames.of(run.shape, self._around)
        if around is None:
            return b"".join(self.feed(chunk, None).data for chunk in run.parsed())
        self.last = run.shape.chunk
        return run.framed(*around)

    def _around(self, shape: ChunkShape) -> tuple[bytes, bytes, bytes] | None:
        """The frame of a chunk of ``shape`` before its text, after it, and between its text and
        padding, as ``_as_came`` writes it; None when it would not."""
        text = shape.text.encode()
        edits = self._edits(shape.chunk, shape.prefix + text + shape.inner + shape.pad + shape.suffix)
        if edits is None:
            return None
        parts = [b"data: " + shape.prefix, shape.inner, shape.suffix + b"\n\n"]
        whole = parts[0] + text + parts[1] + shape.pad + parts[2]
        for old, new in edits:  # each occurs once, outside the text and padding (which have no quotes)
            parts, whole = [part.replace(old, new) for part in parts], whole.replace(old, new)
        before, inner, after = parts
        return (before, after, inner) if before + text + inner + shape.pad + after == whole else None

    def _as_came(self, chunk: dict[str, Any], raw: bytes) -> bytes | None:
        """The frame of ``raw`` with the client's model name (and without ``"usage": null`` unless the
        client asked for usage), or None when bytes cannot be replaced safely."""
        edits = self._edits(chunk, raw)
        if edits is None:
            return None
        for old, new in edits:
            raw = raw.replace(old, new)
        return b"data: " + raw + b"\n\n"

    def _edits(self, chunk: dict[str, Any], raw: bytes) -> list[tuple[bytes, bytes]] | None:
        """The byte replacements that turn ``raw`` into what the client gets; None when there are none
        that are safe."""
        edits = []
        if "usage" in chunk and not self.wants_usage:
            if chunk["usage"] is not None:
                return None
            edit = _only_key(raw, b'"usage"', NULL_USAGE, (b"", b""))
            if edit is None:
                return None
            edits.append(edit)
        upstream_model = chunk.get("model")
        if type(upstream_model) is not str:
            return None
        if upstream_model != self.upstream_model:
            self.upstream_model, self.upstream_forms = upstream_model, model_field(upstream_model)
        if upstream_model != self.model:
            edit = _only_key(raw, b'"model"', self.upstream_forms, self.client_forms)
            if edit is None:
                return None
            edits.append(edit)
        return edits

    def _head(self) -> dict[str, Any]:
        return {k: self.last[k] for k in ("id", "object", "created") if k in self.last}

    def cut(self) -> bytes:
        chunk = {**self._head(), "model": self.model,
                 "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}
        return encode(jsoncodec.dumps(chunk))

    def end(self, usage: Usage, cost: int) -> bytes:
        if not self.wants_usage:
            return b"data: [DONE]\n\n"
        chunk = self.usage_chunk or {**self._head(), "choices": []}
        raw = chunk.get("usage") if self.usage_chunk and not usage.estimated else usage_to_openai(usage)
        final = {**chunk, "model": self.model, "usage": {**raw, "cost": usd_number(cost)}}
        return encode(jsoncodec.dumps(final)) + b"data: [DONE]\n\n"

    def error(self, failure: ApiboxError) -> bytes:
        return encode(jsoncodec.dumps(failure.to_openai()))


Frame = TypeVar("Frame")  # what a renderer writes around a plain chunk's text


class ShapeFrames(Generic[Frame]):
    """The frames of a stream's latest shapes, each worked out once (by ``work_out``), not once a run.

    Kept for twice as many shapes as ``LatestShapes`` keeps, the oldest dropped first: beyond
    those, the stream itself has forgotten a shape. ``work_out`` comes with each call rather than
    kept: a renderer's bound method kept here would make a reference cycle of every stream's
    renderer, left for the cyclic garbage collector (streams at 32 connections lost a fifth of
    their throughput to its passes, and their p99 latency tripled)."""

    __slots__ = ("known",)

    def __init__(self) -> None:
        self.known: dict[ChunkShape, Frame] = {}

    def of(self, shape: ChunkShape, work_out: Callable[[ChunkShape], Frame]) -> Frame:
        known = self.known
        if shape not in known:
            known[shape] = work_out(shape)
            if len(known) > 2 * LatestShapes.KEPT:
                del known[next(iter(known))]
        return known[shape]


# A chunk's ``"usage": null`` as JSON encoders write it: compact (orjson, OpenAI) or with spaces (json.dumps).
NULL_USAGE = (b',"usage":null', b', "usage": null')


def model_field(name: str) -> tuple[bytes, bytes]:
    """``"model": NAME`` as encoders write it: compact and with a space."""
    encoded = jsoncodec.dumps(name)
    return b'"model":' + encoded, b'"model": ' + encoded


def _only_key(raw: bytes, key: bytes, forms: tuple[bytes, ...],
              replacements: tuple[bytes, ...]) -> tuple[bytes, bytes] | None:
    """The edit (``forms[i]``, ``replacements[i]``) of ``raw``'s one ``key: value`` pair; None when
    ``key`` does not occur exactly once or in none of the forms.

    The caller has parsed ``raw`` and knows its top level has ``key`` with that value. Occurring once,
    the key's bytes are that top-level key (an encoder does not escape plain letters, and inside a
    JSON string every quote is escaped, so a string that holds ``"key"`` adds an occurrence and
    the chunk is serialized again instead).
    """
    if raw.count(key) != 1:
        return None
    for form, replacement in zip(forms, replacements, strict=True):
        if raw.find(form) >= 0:  # not ``in``, which costs a discarded TypeError on bytes (see sse.py)
            return form, replacement
    return None


def _delta_frame(shape: ChunkShape) -> tuple[bytes, bytes]:
    """An Anthropic delta's event of ``shape`` before its text and after it, as the bytes came."""
    name = shape.chunk["type"].encode()
    return b"event: " + name + b"\ndata: " + shape.prefix, shape.suffix + b"\n\n"


def anthropic_error(failure: ApiboxError) -> bytes:
    body = {"type": "error", "error": {"type": anthropic_error_type(failure.status), "message": failure.message}}
    return encode(jsoncodec.dumps(body), "error")


def _frames(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(encode(jsoncodec.dumps(data), name) for name, data in events)


class AnthropicRenderer:
    """OpenAI chunks to Anthropic clients, translated event by event.

    Inside a text block, a run of plain content chunks becomes text deltas without a parse or a
    serialization: each text's bytes as they came are already its JSON string, as the translation
    would write it (no escapes: a plain text has nothing to escape, and orjson writes UTF-8 and
    ``/`` as they are)."""

    def __init__(self, model: str, input_tokens: int) -> None:
        self.translate = OpenAIToAnthropicStream(model, input_tokens)

    def feed(self, chunk: dict[str, Any], raw: bytes | None) -> Piece:
        usage = usage_from_openai(chunk.get("usage")) if chunk.get("usage") else None
        return Piece(_frames(self.translate.feed(chunk)), delta_text(chunk), usage)

    def plain(self, run: PlainRun) -> bytes:
        translate = self.translate
        if run.shape.field != "content":  # thinking: the translation has no place for it
            return b"".join(_frames(translate.feed(chunk)) for chunk in run.parsed())
        out, index, count = b"", 0, len(run.texts)
        while index < count and translate.block_kind != "text":  # until a text block is open
            out += _frames(translate.feed(run.shape.chunk_with(run.texts[index])))
            index += 1
        rest = run.nonempty(index)
        if rest is None:
            return out
        before = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' \
                 b'"delta":{"type":"text_delta","text":"' % translate.block_index
        after = b'"}}\n\n'
        return out + before + (after + before).join(rest.middles) + after  # not ``framed``: no padding

    def cut(self) -> bytes:
        self.translate.stop_reason = "max_tokens"
        return b""

    def end(self, usage: Usage, cost: int) -> bytes:
        return _frames(self.translate.finish(usage))

    def error(self, failure: ApiboxError) -> bytes:
        return anthropic_error(failure)


class AnthropicPassthrough:
    """Anthropic events to Anthropic clients as they came, but for the model's name: each as the
    bytes that came, but ``message_start``, which is written again with the client's model."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.raw_usage: dict[str, Any] = {}
        self.open_block: int | None = None
        self.closed = False
        self.frames: ShapeFrames[tuple[bytes, bytes]] = ShapeFrames()

    def feed(self, event: dict[str, Any], raw: bytes | None) -> Piece:
        kind = event.get("type", "")
        text, usage = "", None
        if kind == "message_start":
            message = event.get("message") or {}
            message["model"] = self.model
            self.raw_usage.update(message.get("usage") or {})
            usage = usage_from_anthropic(self.raw_usage)
        elif kind == "content_block_start":
            self.open_block = event.get("index")
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            text = str(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or "")
        elif kind == "message_delta":
            self.raw_usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            usage = usage_from_anthropic(self.raw_usage)
        elif kind == "message_stop":
            self.closed = True
        if raw is None or kind == "message_start":
            return Piece(encode(jsoncodec.dumps(event), kind), text, usage)
        return Piece(encode(raw, kind), text, usage)

    def plain(self, run: PlainRun) -> bytes:
        """Text or thinking deltas, as the bytes that came."""
        return run.framed(*self.frames.of(run.shape, _delta_frame))

    def cut(self) -> bytes:
        return b""  # end() closes the message, with the usage that is charged

    def end(self, usage: Usage, cost: int) -> bytes:
        if self.closed:
            return b""
        events: list[tuple[str, dict[str, Any]]] = []
        if self.open_block is not None:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": self.open_block}))
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                         "usage": usage_to_anthropic(usage)}))
        events.append(("message_stop", {"type": "message_stop"}))
        self.closed = True
        return _frames(events)

    def error(self, failure: ApiboxError) -> bytes:
        return anthropic_error(failure)


class Sequenced(Protocol):
    sequence: int  # the last event's sequence_number


def responses_error(failure: ApiboxError, stream: Sequenced) -> bytes:
    """The Responses API's error event, numbered after the stream's last."""
    stream.sequence += 1
    event = {"type": "error", "code": failure.code or failure.type, "message": failure.message,
             "param": failure.param, "sequence_number": stream.sequence}
    return encode(jsoncodec.dumps(event), "error")


class ResponsesPassthrough:
    """Responses API events to Responses clients as they came, but for the model's name: the events
    that carry the whole response (created, in progress, the last) are written again with the
    client's. An answer cut at the paid-for length ends as the upstream would have ended it had
    it been asked for no more: ``response.incomplete``, with the usage charged."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.sequence = 0  # the last event's sequence_number: an event written after it follows on
        self.opening: dict[str, Any] = {}  # the response as ``response.created`` showed it
        self.closed = False  # the upstream's last event has gone out

    def feed(self, event: dict[str, Any], raw: bytes | None) -> Piece:
        kind = event.get("type", "")
        sequence = event.get("sequence_number")
        if type(sequence) is int:
            self.sequence = sequence
        response = event.get("response")
        if isinstance(response, dict):
            response["model"] = self.model
            self.opening = self.opening or response
            self.closed = kind in TERMINAL_EVENTS
            usage = usage_from_responses(response.get("usage")) if self.closed else None
            return Piece(encode(jsoncodec.dumps(event), kind), "", usage)
        delta = event.get("delta") if kind in TEXT_DELTA_EVENTS else None
        data = encode(raw, kind) if raw is not None else encode(jsoncodec.dumps(event), kind)
        return Piece(data, delta if isinstance(delta, str) else "")

    def plain(self, run: PlainRun) -> bytes:
        return b"".join(self.feed(event, None).data for event in run.parsed())

    def cut(self) -> bytes:
        return b""  # response.incomplete follows, numbered after the last event sent

    def end(self, usage: Usage, cost: int) -> bytes:
        if self.closed:
            return b""  # the upstream's last event, with its usage, has gone out as it came
        # its output left out: clients (the openai SDK's stream) gather it from the events they had
        response = {**{k: v for k, v in self.opening.items() if k != "output"}, "status": "incomplete",
                    "incomplete_details": INCOMPLETE, "usage": usage_json(usage)}
        self.sequence += 1
        event = {"type": "response.incomplete", "response": response, "sequence_number": self.sequence}
        return encode(jsoncodec.dumps(event), "response.incomplete")

    def error(self, failure: ApiboxError) -> bytes:
        return responses_error(failure, self)


class ResponsesRenderer:
    """Chat chunks (from routes that speak only chat) to Responses clients, translated chunk by
    chunk (``ChatToResponsesStream``): the items opened, filled and closed, and at the end the
    response with the usage charged."""

    def __init__(self, model: str) -> None:
        self.translate = ChatToResponsesStream(model)

    def _frames(self, events: list[dict[str, Any]]) -> bytes:
        return b"".join(encode(jsoncodec.dumps(event), event["type"]) for event in events)

    def feed(self, chunk: dict[str, Any], raw: bytes | None) -> Piece:
        usage = usage_from_openai(chunk["usage"]) if chunk.get("usage") else None
        return Piece(self._frames(self.translate.feed(chunk)), delta_text(chunk), usage)

    def plain(self, run: PlainRun) -> bytes:
        return b"".join(self.feed(chunk, None).data for chunk in run.parsed())

    def cut(self) -> bytes:
        self.translate.incomplete = True
        return b""

    def end(self, usage: Usage, cost: int) -> bytes:
        return self._frames(self.translate.finish(usage))

    def error(self, failure: ApiboxError) -> bytes:
        return responses_error(failure, self.translate)
