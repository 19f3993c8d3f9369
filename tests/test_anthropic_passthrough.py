"""Anthropic streams passed through as bytes: an Anthropic client gets exactly the events that
parsing and writing every event again would send, for any text, encoder, split and line ending;
text and thinking deltas are read by their shape without being parsed; a stream translated for
an OpenAI client is the same whether its deltas came as runs or parsed; and an OpenAI stream
translated for an Anthropic client is the same whether its plain chunks were framed as bytes
or translated one by one.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apibox.formats.anthropic_stream import AnthropicToOpenAIStream
from apibox.gateway.render import AnthropicPassthrough, AnthropicRenderer, OpenAIRenderer
from apibox.providers.anthropic import NativeStream, _delta_shape, _TranslatedStream
from apibox.shapes import PlainRun
from tests.test_stream_passthrough import Content, Response, batches, paddings, texts, upstream, upstream_chunks
from tests.test_stream_passthrough import sse as openai_sse

CLIENT = "claude-client-name"
ENCODERS = {"compact": lambda value: orjson.dumps(value), "spaced": lambda value: json.dumps(value).encode()}


def delta(index: int, kind: str, text: str) -> dict[str, Any]:
    field = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}[kind]
    return {"type": "content_block_delta", "index": index, "delta": {"type": kind, field: text}}


def message(thoughts: list[str], words: list[str], tool_json: list[str]) -> list[dict[str, Any]]:
    """A whole message as Anthropic streams it: thinking, text, then a tool call's arguments."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                              "model": "claude-upstream", "content": [], "stop_reason": None,
                                              "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 1}}},
        {"type": "ping"}]
    blocks = [({"type": "thinking", "thinking": ""}, "thinking_delta", thoughts),
              ({"type": "text", "text": ""}, "text_delta", words),
              ({"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}, "input_json_delta", tool_json)]
    for index, (block, kind, pieces) in enumerate(blocks):
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        events += [delta(index, kind, piece) for piece in pieces]
        events.append({"type": "content_block_stop", "index": index})
    events.append({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                   "usage": {"output_tokens": len(words)}})
    events.append({"type": "message_stop"})
    return events


def sse(events: list[dict[str, Any]], encoder: str, ending: str = "\n") -> bytes:
    return b"".join(b"event: %s%sdata: %s%s%s" % (e["type"].encode(), ending.encode(), ENCODERS[encoder](e),
                                                 ending.encode(), ending.encode()) for e in events)


async def items(reads: list[bytes]) -> list[tuple[dict[str, Any] | PlainRun, bytes | None]]:
    """Each item the stream yields, with its data as it came (None for runs)."""
    stream = NativeStream(Response(Content(reads)), upstream())  # type: ignore[arg-type]
    return [pair async for batch in stream for pair in zip(batch, batch.raw, strict=True)]  # type: ignore[attr-defined]


def passed_on(found: list[tuple[dict[str, Any] | PlainRun, bytes | None]]) -> tuple[bytes, list[str]]:
    """What the pass-through renderer sends for ``found``, and the texts it counts as delivered."""
    renderer, out, delivered = AnthropicPassthrough(CLIENT), b"", []
    for item, raw in found:
        if isinstance(item, PlainRun):
            out += renderer.plain(item)
            delivered += item.texts
        else:
            piece = renderer.feed(item, raw)
            out += piece.data
            delivered += [piece.text] if piece.text else []
    return out, delivered


def frames(data: bytes) -> list[tuple[str, Any]]:
    parts = data.split(b"\n\n")
    assert parts[-1] == b""
    out = []
    for part in parts[:-1]:
        head, body = part.split(b"\n")
        assert head.startswith(b"event: ") and body.startswith(b"data: "), part
        out.append((head[7:].decode(), orjson.loads(body[6:])))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(texts, max_size=4), st.lists(texts, max_size=6), st.lists(texts, max_size=3),
       st.sampled_from(sorted(ENCODERS)), st.sampled_from(["\n", "\r\n"]), st.data())
async def test_the_client_gets_every_event_as_parsing_it_would_send(thoughts: list[str], words: list[str],
                                                                     tool_json: list[str], encoder: str, ending: str,
                                                                     data: st.DataObject) -> None:
    events = message(thoughts, words, tool_json)
    body = sse(events, encoder, ending)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6), label="cuts"))
    reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    out, delivered = passed_on(await items(reads))
    expected = [e for e in events if e["type"] != "ping"]
    expected[0] = {**expected[0], "message": {**expected[0]["message"], "model": CLIENT}}
    assert frames(out) == [(e["type"], e) for e in expected]
    assert [piece for piece in delivered if piece] == [piece for piece in [*thoughts, *words, *tool_json] if piece]
    # every event but message_start (written again with the client's model) is the bytes that came
    sent = out.split(b"\n\n")[1:-1]
    assert sent == [b"event: %s\ndata: %s" % (e["type"].encode(), ENCODERS[encoder](e)) for e in expected[1:]]


async def test_text_and_thinking_deltas_are_runs_of_the_bytes_that_came() -> None:
    events = message(["Let", " me"], ["Hi", ' "there"', " you", " all"], ['{"a"'])
    found = await items([sse(events, "compact")])
    runs = [item for item, _ in found if isinstance(item, PlainRun)]
    assert [(run.shape.field, run.texts) for run in runs] == [("thinking", [" me"]), ("text", [" you", " all"])]
    assert [run.middles for run in runs] == [[b" me"], [b" you", b" all"]]
    assert [run.parsed() for run in runs] == [[events[4]], [events[9], events[10]]]
    out, _ = passed_on(found)
    assert b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta",' \
           b'"text":" you"}}\n\n' in out


@pytest.mark.parametrize("event", [
    delta(0, "input_json_delta", "abc"),  # a tool's arguments: not text the shape holds
    {**delta(0, "text_delta", "a"), "extra": 1},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a", "citations": []}},
    delta(0, "text_delta", 'quote "'),
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 7}},
])
def test_only_deltas_that_add_plain_text_give_a_shape(event: dict[str, Any]) -> None:
    assert _delta_shape(event, orjson.dumps(event)) is None


@settings(max_examples=100, deadline=None)
@given(st.lists(texts, max_size=3), st.lists(texts, max_size=6), st.lists(texts, max_size=3),
       st.sampled_from(sorted(ENCODERS)), st.sampled_from(["\n", "\r\n"]), st.data())
async def test_an_anthropic_stream_reaches_an_openai_client_as_translating_each_event_would(
        thoughts: list[str], words: list[str], tool_json: list[str], encoder: str, ending: str,
        data: st.DataObject) -> None:
    """Runs of text deltas become runs of the chunks the translation would make, framed as bytes."""
    events = message(thoughts, words, tool_json)
    body = sse(events, encoder, ending)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5), label="cuts"))
    reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    out, delivered = await _translated(reads)
    assert _openai_frames(out) == _openai_frames(_translated_one_by_one(events))
    assert delivered == "".join([*words, "lookup", *tool_json])  # the tool's name too; thinking has no place


async def test_text_runs_before_and_after_a_late_message_start_carry_the_id_of_their_moment() -> None:
    """A malformed stream whose deltas come before ``message_start``: the chunks made before it
    carry the translation's own id, those after it the message's, runs and parsed chunks alike."""
    events = message([], ["Hi", " there", " you", " all", " again", " and", " more"], [])
    start = events.pop(0)
    block = next(i for i, e in enumerate(events) if e["type"] == "content_block_start" and e["index"] == 1)
    events.insert(block + 4, start)  # three deltas (the first parsed, a run of two), then the message
    out, delivered = await _translated([sse(events, "compact")])
    chunks = _openai_frames(out)
    without_ids = [{k: v for k, v in chunk.items() if k != "id"} for chunk in chunks]
    assert without_ids == [{k: v for k, v in chunk.items() if k != "id"}
                           for chunk in _openai_frames(_translated_one_by_one(events))]
    texts_with_ids = [(c["choices"][0]["delta"]["content"], c["id"]) for c in chunks
                      if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert [text for text, _ in texts_with_ids] == ["Hi", " there", " you", " all", " again", " and", " more"]
    early = {chunk_id for _, chunk_id in texts_with_ids[:3]}
    assert len(early) == 1 and early != {"msg_1"}
    assert {chunk_id for _, chunk_id in texts_with_ids[3:]} == {"msg_1"}
    assert delivered == "Hi there you all again and more" + "lookup"  # the tool block's name


async def _translated(reads: list[bytes]) -> tuple[bytes, str]:
    """An Anthropic stream read by ``_TranslatedStream`` and rendered for an OpenAI client: the
    bytes sent and the text counted as delivered."""
    translated = _TranslatedStream(NativeStream(Response(Content(reads)), upstream()), "claude-upstream")  # type: ignore[arg-type]
    renderer, out, delivered = OpenAIRenderer(CLIENT, False), b"", ""
    async for batch in translated:  # type: ignore[attr-defined]
        for item in batch:
            if isinstance(item, PlainRun):
                out += renderer.plain(item)
                delivered += "".join(item.texts)
            else:
                piece = renderer.feed(item, None)
                out, delivered = out + piece.data, delivered + piece.text
    return out, delivered


def _translated_one_by_one(events: list[dict[str, Any]]) -> bytes:
    """What translating and rendering each event in turn sends."""
    reference, one_by_one, expected = AnthropicToOpenAIStream("claude-upstream"), OpenAIRenderer(CLIENT, False), b""
    for chunk in (chunk for event in events if event["type"] != "ping" for chunk in reference.feed(event)):
        expected += one_by_one.feed(chunk, None).data
    return expected


def _openai_frames(data: bytes) -> list[dict[str, Any]]:
    """The chunks of an OpenAI stream, without ``created`` (each translation reads the clock)."""
    frames = data.split(b"\n\n")
    assert frames[-1] == b"" and all(f.startswith(b"data: ") for f in frames[:-1])
    return [{k: v for k, v in orjson.loads(f[6:]).items() if k != "created"} for f in frames[:-1]]


@settings(max_examples=150, deadline=None)
@given(st.lists(texts, max_size=6), st.lists(texts, max_size=3),
       st.one_of(st.none(), st.lists(paddings, min_size=1, max_size=3)), st.booleans(), st.data())
async def test_an_openai_stream_reaches_an_anthropic_client_as_translating_each_chunk_would(
        words: list[str], thoughts: list[str], pads: list[str] | None, usage: bool, data: st.DataObject) -> None:
    body = openai_sse(upstream_chunks(words, usage=usage, pads=pads, thoughts=thoughts), "orjson")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5), label="cuts"))
    await _assert_translated_as_one_by_one([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)
                                            if b > a], words)


async def test_a_run_whose_first_texts_are_empty_opens_the_text_block_at_its_first_text() -> None:
    """The first plain chunk, parsed, adds nothing: so do the run's first; the block opens at "a"."""
    words = ["", "", "", "a", "b"]
    await _assert_translated_as_one_by_one([openai_sse(upstream_chunks(words), "orjson")], words)


async def _assert_translated_as_one_by_one(reads: list[bytes], words: list[str]) -> None:
    framed, one_by_one = AnthropicRenderer(CLIENT, 7), AnthropicRenderer(CLIENT, 7)
    out, expected = b"", b""
    for batch in await batches(reads):
        for item in batch:
            if isinstance(item, PlainRun):
                out += framed.plain(item)
                expected += b"".join(one_by_one.feed(chunk, None).data for chunk in item.parsed())
            else:
                out += framed.feed(item, None).data
                expected += one_by_one.feed(item, None).data
    assert _without_ids(frames(out)) == _without_ids(frames(expected))  # each made a message id of its own
    texts_out = [e["delta"]["text"] for name, e in frames(out) if name == "content_block_delta"]
    assert texts_out == [word for word in words if word]


def _without_ids(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(name, {**event, "message": {**event["message"], "id": ""}} if name == "message_start" else event)
            for name, event in events]


async def test_only_the_batch_that_ends_the_message_is_last() -> None:
    """It holds ``message_stop``, so it may go out together with the answer's ending."""
    body = sse(message([], ["one", "two"], []), "compact")
    stop = body.index(b"event: message_stop")
    stream = NativeStream(Response(Content([body[:stop], body[stop:]])), upstream())  # type: ignore[arg-type]
    assert [batch.last async for batch in stream] == [False, True]  # type: ignore[attr-defined]
