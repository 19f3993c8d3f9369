"""OpenAI-format streams passed through as bytes: what the client receives is exactly what parsing
and serializing every chunk again would have sent, for any encoder, text, padding, split and line
ending; chunks that only add text are read by their shape without being parsed, also when each
carries OpenAI's random ``obfuscation`` padding; and the upstream's
idle timeout (one watchdog per stream) fails a silent upstream but never a slow client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from apibox.gateway.render import OpenAIRenderer, ShapeFrames
from apibox.openai_wire import delta_text, learn_shape
from apibox.providers.base import ProviderRequest, StreamBroken, WireBatch
from apibox.providers.http import HttpUpstream
from apibox.providers.openai import OpenAIProvider, _OpenAIStream
from apibox.settings import ProviderSettings, Timeouts
from apibox.shapes import ChunkShape, LatestShapes, PlainRun
from apibox.sse import SSEDecoder

UPSTREAM, CLIENT = "gpt-up-2024", "my-model"
ENCODERS = {
    "orjson": lambda value: orjson.dumps(value),
    "spaced": lambda value: json.dumps(value, ensure_ascii=False).encode(),
    "ascii": lambda value: json.dumps(value).encode(),  # escapes every non-ASCII character
}
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
# OpenAI's padding is letters and digits; anything else must be read as safely
paddings = st.one_of(st.text("abcXYZ019", min_size=1, max_size=16), texts)


def chunk(delta: dict[str, Any], finish: str | None = None, *, usage: bool = True,
          pad: str | None = None) -> dict[str, Any]:
    """A chunk as OpenAI writes it: ``"usage": null`` when usage was asked for, then any padding."""
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                            "model": UPSTREAM, "system_fingerprint": "fp_1",
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage:
        body["usage"] = None
    if pad is not None:
        body["obfuscation"] = pad
    return body


def upstream_chunks(words: list[str], *, usage: bool = True, pads: list[str] | None = None,
                    thoughts: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A whole stream; ``pads``: each chunk's padding in turn (cycled), none when None;
    ``thoughts``: a reasoning model's thinking before the words, as DeepSeek streams it."""
    def pad(index: int) -> str | None:
        return pads[index % len(pads)] if pads else None
    deltas = [{"content": None, "reasoning_content": thought} for thought in thoughts]
    deltas += [{"content": word} for word in words]
    chunks = [chunk({"role": "assistant", "content": ""}, usage=usage, pad=pad(0))]
    chunks += [chunk(delta, usage=usage, pad=pad(i + 1)) for i, delta in enumerate(deltas)]
    chunks.append(chunk({}, "stop", usage=usage, pad=pad(len(deltas) + 1)))
    if usage:
        chunks.append({**chunk({}), "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(words),
                                                           "total_tokens": 5 + len(words)}})
    return chunks


def sse(chunks: list[dict[str, Any]], encoder: str, ending: str = "\n") -> bytes:
    frames = [b"data: " + ENCODERS[encoder](c) for c in chunks] + [b"data: [DONE]"]
    eol = ending.encode()
    return b"".join(frame + eol + eol for frame in frames)


class Content:
    """A response body that arrives in the given reads (then ends), or stalls after them."""

    def __init__(self, reads: list[bytes], stall: bool = False) -> None:
        self.reads, self.stall, self.failed = list(reads), stall, asyncio.get_running_loop().create_future()

    async def readany(self) -> bytes:
        if self.reads:
            return self.reads.pop(0)
        if self.stall:
            await self.failed  # what set_exception sets
        return b""

    def set_exception(self, exc: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_exception(exc)


class Response:
    def __init__(self, content: Content) -> None:
        self.content = content

    def close(self) -> None:
        pass


def upstream(idle: float = 120.0) -> HttpUpstream:
    return HttpUpstream(ProviderSettings(name="up", type="openai", timeouts=Timeouts(idle=idle)),
                        None, {})  # type: ignore[arg-type]  # streams never post


async def batches(reads: list[bytes]) -> list[WireBatch]:
    stream = _OpenAIStream(Response(Content(reads)), upstream())  # type: ignore[arg-type]
    return [batch async for batch in stream]  # type: ignore[misc]


def rendered(found: list[WireBatch], wants_usage: bool) -> bytes:
    renderer = OpenAIRenderer(CLIENT, wants_usage)
    out = b""
    for batch in found:
        for item, raw in zip(batch, batch.raw, strict=True):
            out += renderer.plain(item) if type(item) is PlainRun else renderer.feed(item, raw).data
    return out


def reserialized(chunks: list[dict[str, Any]], wants_usage: bool) -> list[dict[str, Any]]:
    """What the client gets when every chunk is parsed and written again (the usage chunk is held back)."""
    out = []
    for c in chunks:
        if c.get("usage") and not c.get("choices"):
            continue
        c = {**c, "model": CLIENT}
        if not wants_usage:
            c.pop("usage", None)
        out.append(c)
    return out


def frames(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n\n") or not data
    parts = data.split(b"\n\n")[:-1]
    assert all(p.startswith(b"data: ") and b"\n" not in p and b"\r" not in p for p in parts), data
    return [p[6:] for p in parts]


@settings(max_examples=250, deadline=None)
@given(st.lists(texts, max_size=6), st.sampled_from(sorted(ENCODERS)), st.sampled_from(["\n", "\r\n"]),
       st.booleans(), st.booleans(), st.one_of(st.none(), st.lists(paddings, min_size=1, max_size=4)),
       st.lists(texts, max_size=4), st.data())
async def test_the_client_gets_what_reserializing_would_send(words: list[str], encoder: str, ending: str,
                                                             wants_usage: bool, usage: bool, pads: list[str] | None,
                                                             thoughts: list[str], data: st.DataObject) -> None:
    chunks = upstream_chunks(words, usage=usage, pads=pads, thoughts=thoughts)
    body = sse(chunks, encoder, ending)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6), label="cuts"))
    reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]  # b"" is the end
    out = rendered(await batches(reads), wants_usage)
    assert [orjson.loads(f) for f in frames(out)] == reserialized(chunks, wants_usage)
    assert UPSTREAM.encode() not in out


async def test_chunks_that_only_add_text_are_not_parsed_and_keep_their_bytes() -> None:
    words = ["The ", "quick ", "brown ", 'say "hi"', "fox"]
    chunks = upstream_chunks(words)
    found = await batches([sse(chunks, "orjson")])
    assert len(found) == 1 and found[0].last  # [DONE] came in the same read: it may go out with the ending
    items = [item for batch in found for item in batch]
    assert [type(i).__name__ for i in items] == ["dict", "dict", "PlainRun", "dict", "PlainRun",
                                                  "dict", "dict"]  # a quote in the text: parsed
    runs = [i for i in items if isinstance(i, PlainRun)]
    assert [r.texts for r in runs] == [["quick ", "brown "], ["fox"]]  # consecutive plain chunks: one run
    assert [r.middles for r in runs] == [[b"quick ", b"brown "], [b"fox"]]
    assert [r.parsed() for r in runs] == [[chunks[2], chunks[3]], [chunks[5]]]
    assert runs[0].head(1).texts == ["quick "]
    out = rendered(found, wants_usage=True)
    assert frames(out)[2] == orjson.dumps({**chunks[2], "model": CLIENT})  # the upstream's bytes, renamed


@pytest.mark.parametrize("raw", [
    chunk({"content": "a"}, "stop"),  # a finish reason
    {**chunk({"content": "a"}), "usage": {"prompt_tokens": 1}},
    {**chunk({"content": "a"}), "choices": [chunk({"content": "a"})["choices"][0]] * 2},  # two choices
    chunk({"content": 'quote "'}),
    chunk({"content": "back\\slash"}),
    chunk({"content": "tab\t"}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
    {**chunk({"content": "a"}), "error": None},
    {**chunk({"content": "a"}), "content": "a"},  # "content" twice in the bytes
    chunk({"content": "a", "reasoning_content": "b"}),  # text in two fields
    chunk({"content": "a", "refusal": "no"}),  # a refusal is text too
    chunk({"content": "", "tool_calls": [{"index": 0, "function": {"arguments": "x"}}]}),
    chunk({"content": None}),  # no text at all
    chunk({"role": "assistant", "content": ""}),
])
def test_only_plain_text_chunks_give_a_shape(raw: dict[str, Any]) -> None:
    assert learn_shape(raw, orjson.dumps(raw)) is None


def test_a_text_written_with_escapes_gives_no_shape() -> None:
    """Its bytes are not the text itself (``\\u00e9`` for ``é``): no prefix and suffix lie around it."""
    escaped = chunk({"content": "Héllo"})
    assert learn_shape(escaped, ENCODERS["ascii"](escaped)) is None
    assert learn_shape(escaped, ENCODERS["orjson"](escaped)) is not None


def read(shape: ChunkShape, payloads: list[bytes], start: int = 0) -> tuple[list[str], list[bytes], list[bytes] | None]:
    """``shape.read_run``'s run as (texts, middles, pads); ``([], [], None)`` for none."""
    run = shape.read_run(payloads, start)
    if run is None:
        return [], [], None
    assert run.texts, "a run is never empty"
    return run.texts, run.middles, run.pads


@pytest.mark.parametrize(("delta", "field"), [
    ({"content": "a"}, "content"),
    ({"role": "assistant", "content": "a"}, "content"),  # Ollama repeats the role: the shape's bytes do too
    ({"content": None, "reasoning_content": "a"}, "reasoning_content"),  # DeepSeek's and vLLM's thinking
    ({"role": "assistant", "content": "", "reasoning": "a"}, "reasoning"),  # Ollama's and OpenRouter's
    ({"content": "a", "refusal": None, "tool_calls": None}, "content"),
])
def test_a_chunk_that_adds_text_to_one_field_gives_a_shape_of_that_field(delta: dict[str, Any], field: str) -> None:
    sample = chunk(delta)
    shape = learn_shape(sample, orjson.dumps(sample))
    assert shape is not None and shape.field == field and shape.text == "a"
    later = chunk({**delta, field: "bc"})
    assert read(shape, [orjson.dumps(later)])[:2] == (["bc"], [b"bc"])
    run = shape.read_run([orjson.dumps(later)], 0)
    assert run is not None and run.parsed() == [later]
    assert [delta_text(c) for c in run.parsed()] == run.texts  # what a parsed chunk would count as delivered


async def test_a_stream_whose_shared_bytes_change_gets_a_new_shape_each_time() -> None:
    """Ollama's ``created`` moves on each second: a new shape each second, the older ones forgotten."""
    chunks = upstream_chunks([f"w{i}" for i in range(9)])
    for index in range(1, 10):
        chunks[index]["created"] += (index - 1) // 3  # three chunks a second
    found = await batches([sse(chunks, "orjson")])
    items = [item for batch in found for item in batch]
    assert [len(item.texts) if isinstance(item, PlainRun) else 0 for item in items] == [0, 0, 2, 0, 2, 0, 2, 0, 0]
    assert [orjson.loads(f) for f in frames(rendered(found, wants_usage=True))] == reserialized(chunks, True)


@pytest.mark.parametrize("n", [2, 3, 4])
async def test_each_choice_of_a_stream_asked_for_several_has_a_shape_of_its_own(n: int) -> None:
    """``n`` answers come interleaved, a chunk per choice in turn: after each choice's first
    text, every text chunk of every choice is read by its shape, whichever came just before."""
    def of_choice(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body = chunk(delta, finish)
        body["choices"] = [{**body["choices"][0], "index": index}]
        return body
    chunks = [of_choice(c, {"role": "assistant", "content": ""}) for c in range(n)]
    chunks += [of_choice(c, {"content": f"w{word}c{c}"}) for word in range(4) for c in range(n)]
    chunks += [of_choice(c, {}, "stop") for c in range(n)]
    found = await batches([sse(chunks, "orjson")])
    items = [item for batch in found for item in batch]
    parsed = [item for item in items if not isinstance(item, PlainRun)]
    assert len(parsed) == n + n + n  # the roles, each choice's first text, the finishes
    read_by_shape = [text for run in items if isinstance(run, PlainRun) for text in run.texts]
    assert read_by_shape == [f"w{word}c{c}" for word in range(1, 4) for c in range(n)]
    assert [orjson.loads(f) for f in frames(rendered(found, wants_usage=False))] == reserialized(chunks, False)
    renderer = OpenAIRenderer(CLIENT, False)
    framed: list[ChunkShape] = []
    work_out = renderer._around

    def counted(shape: ChunkShape) -> tuple[bytes, bytes, bytes] | None:
        framed.append(shape)
        return work_out(shape)
    renderer._around = counted  # type: ignore[method-assign]
    for run in (item for item in items if isinstance(item, PlainRun)):
        renderer.plain(run)
    assert len(framed) == n  # each choice's frame worked out once, not once a run


async def test_a_reasoning_models_thinking_and_answer_are_two_shapes_neither_parsed() -> None:
    chunks = upstream_chunks(["Hi", " there"], thoughts=["Let", " me", " think"])
    found = await batches([sse(chunks, "orjson")])
    items = [item for batch in found for item in batch]
    runs = [item for item in items if isinstance(item, PlainRun)]
    assert [(run.shape.field, run.texts) for run in runs] == [("reasoning_content", [" me", " think"]),
                                                              ("content", [" there"])]
    assert [run.parsed() for run in runs] == [chunks[2:4], chunks[5:6]]
    assert [type(item).__name__ for item in items] == ["dict", "dict", "PlainRun", "dict", "PlainRun",
                                                        "dict", "dict"]  # each shape learned from its first chunk
    assert [orjson.loads(f) for f in frames(rendered(found, wants_usage=False))] == reserialized(chunks, False)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_a_shape_reads_its_own_kind_and_nothing_else(encoder: str) -> None:
    encode = ENCODERS[encoder]
    shape = learn_shape(chunk({"content": "The "}), encode(chunk({"content": "The "})))
    assert shape is not None

    def text_of(raw: bytes) -> str | None:
        texts, middles, _ = read(shape, [raw])
        if not texts:
            return None
        assert middles == [texts[0].encode()]  # the text's bytes, as they came
        return texts[0]
    assert text_of(encode(chunk({"content": "fox"}))) == "fox"
    assert text_of(encode(chunk({"content": ""}))) == ""
    assert text_of(encode(chunk({"content": "fox"}, "stop"))) is None
    assert text_of(encode(chunk({"content": 'a "quote"'}))) is None  # escaped: parsed instead
    assert text_of(encode({**chunk({"content": "fox"}), "created": 1700000001})) is None
    assert text_of(shape.prefix + b"\xff" + shape.suffix) is None  # not UTF-8: parsed (and refused)
    assert text_of(shape.prefix[:-3] + shape.suffix) is None
    unicode = encode(chunk({"content": "Héllo 你好 🌍"}))
    assert text_of(unicode) == ("Héllo 你好 🌍" if encoder != "ascii" else None)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_a_run_of_plain_chunks_ends_before_the_first_that_is_not_one(encoder: str) -> None:
    """Read as a run (one scan and one decode), the texts are those read one chunk at a time."""
    encode = ENCODERS[encoder]
    shape = learn_shape(chunk({"content": "The "}), encode(chunk({"content": "The "})))
    assert shape is not None
    plain = [encode(chunk({"content": text})) for text in ("a", "", "bc")]
    quoted = encode(chunk({"content": 'say "hi"'}))
    stop = encode(chunk({"content": "x"}, "stop"))
    half = "é".encode()  # a character cut in two, each half a chunk of its own
    cut = [shape.prefix + half[:1] + shape.suffix, shape.prefix + half[1:] + shape.suffix]
    assert read(shape, plain, 0)[:2] == (["a", "", "bc"], [b"a", b"", b"bc"])
    assert read(shape, [stop, *plain], 1)[:2] == (["a", "", "bc"], [b"a", b"", b"bc"])
    assert read(shape, [*plain, stop, *plain], 0)[:2] == (["a", "", "bc"], [b"a", b"", b"bc"])
    assert read(shape, [*plain, quoted, *plain], 0)[:2] == (["a", "", "bc"], [b"a", b"", b"bc"])
    assert read(shape, [plain[0], *cut], 0)[:2] == (["a"], [b"a"])
    assert read(shape, [quoted, *plain], 0)[:2] == ([], [])
    assert read(shape, plain, len(plain))[:2] == ([], [])


def _read_one_by_one(shape: ChunkShape, payloads: list[bytes]) -> tuple[list[str], list[bytes], list[bytes] | None]:
    """What ``read_run`` must give, found the slow way: each payload in turn, until one is not plain."""
    texts, middles, pads = [], [], []
    for raw in payloads:
        if len(raw) < len(shape.prefix) + len(shape.suffix) or not raw.startswith(shape.prefix) \
                or not raw.endswith(shape.suffix):
            break
        between = raw[len(shape.prefix):len(raw) - len(shape.suffix)]
        middle, pad = between, b""
        if shape.inner:  # padded: the text ends at its first quote, and the padding follows the inner bytes
            middle, found, pad = between.partition(b'"')
            if not found or not (b'"' + pad).startswith(shape.inner):
                break
            pad = (b'"' + pad)[len(shape.inner):]
        if any(byte in b'"\\' or byte < 0x20 for byte in middle + pad):
            break
        try:
            texts.append(middle.decode())
            pad.decode()
        except UnicodeDecodeError:
            texts[len(middles):] = []
            break
        middles.append(middle)
        pads.append(pad)
    if not texts:
        return [], [], None
    return texts, middles, pads if shape.inner else None


_PARTS = ["prefix", "suffix", "inner", "a", "é", "\"", "\\", "\t", '"}', "}", "\xff", "\xc3"]  # \xc3: cut short
_PAYLOAD = st.lists(st.sampled_from(_PARTS), max_size=6)


def _shape(padded: bool) -> ChunkShape:
    sample = chunk({"content": "The "}, pad="xY7" if padded else None)
    shape = learn_shape(sample, orjson.dumps(sample))
    assert shape is not None and bool(shape.inner) == padded
    return shape


@settings(max_examples=400, deadline=None)
@given(st.booleans(),
       st.lists(st.one_of(_PAYLOAD, _PAYLOAD.map(lambda middle: ["prefix", *middle, "suffix"]),
                          st.tuples(_PAYLOAD, _PAYLOAD).map(
                              lambda two: ["prefix", *two[0], "inner", *two[1], "suffix"])),
                max_size=8),
       st.integers(min_value=0, max_value=3))
def test_a_run_is_read_as_reading_each_chunk_in_turn_would(padded: bool, parts: list[list[str]], start: int) -> None:
    """Payloads made of the shape's own prefix, inner bytes and suffix, texts and the bytes that end a
    run, in any order, most of them framed like a chunk (a read's payloads never hold a line break):
    the run read at once is the one read chunk by chunk, padded or not."""
    shape = _shape(padded)
    pieces = {"prefix": shape.prefix, "suffix": shape.suffix, "inner": shape.inner or b'"}]', "\xff": b"\xff",
              "\xc3": b"\xc3"}
    payloads = [b"".join(pieces.get(part) or part.encode() for part in payload) for payload in parts]
    start = min(start, len(payloads))
    assert read(shape, payloads, start) == _read_one_by_one(shape, payloads[start:])


def test_a_padded_shape_reads_each_chunks_text_and_padding() -> None:
    shape = _shape(padded=True)
    assert shape.inner == b'"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"'
    assert shape.suffix == b'"}'
    payloads = [orjson.dumps(chunk({"content": text}, pad=pad)) for text, pad in
                [("a ", "Q"), ("", "longer0padding9"), ("é", "x"), ("say \"hi\"", "y"), ("b", "z")]]
    assert read(shape, payloads) == (["a ", "", "é"], [b"a ", b"", "é".encode()], [b"Q", b"longer0padding9", b"x"])
    assert read(shape, payloads, 4) == (["b"], [b"b"], [b"z"])
    unpadded = orjson.dumps(chunk({"content": "a"}))
    assert read(shape, [unpadded]) == ([], [], None)  # no padding where the shape has it: parsed
    assert read(shape, [orjson.dumps(chunk({"content": "a"}, pad='q"uote'))]) == ([], [], None)
    assert read(shape, [shape.prefix + b"a" + shape.inner + b"}"]) == ([], [], None)  # one quote, read twice
    assert read(_shape(padded=False), [payloads[0]]) == ([], [], None)  # padding where the shape has none
    run = shape.read_run(payloads, 0)
    assert run is not None and run.parsed() == [chunk({"content": t}, pad=p) for t, p in [("a ", "Q"),
                                                ("", "longer0padding9"), ("é", "x")]]
    assert run.head(1).pads == [b"Q"]


@pytest.mark.parametrize("raw", [
    {**chunk({"content": "a"}), "obfuscation": 7},  # padding that is not a string
    {**chunk({"content": "a"}), "obfuscation": 'q"'},  # padding with a quote
    {"obfuscation": "p", **chunk({"content": "a"})},  # padding before the text
    {**chunk({"content": "a"}, pad="p"), "x": {"obfuscation": "p"}},  # the key twice
])
def test_padding_that_cannot_be_read_safely_gives_no_shape(raw: dict[str, Any]) -> None:
    assert learn_shape(raw, orjson.dumps(raw)) is None


async def test_only_a_batch_that_ends_the_stream_is_last() -> None:
    body = sse(upstream_chunks(["one", "two"]), "orjson")
    done = body.index(b"data: [DONE]")
    assert [b.last for b in await batches([body[:done], body[done:]])] == [False]
    first = body.index(b"\n\n") + 2
    assert [b.last for b in await batches([body[:first], body[first:]])] == [False, True]


async def test_a_chunk_that_is_not_utf8_is_serialized_again() -> None:
    body = sse(upstream_chunks(["ok"]), "orjson").replace(b'"ok"', b'"o\xffk"')
    out = rendered(await batches([body]), wants_usage=True)
    assert "o\ufffdk" in [c["choices"][0]["delta"].get("content") for c in map(orjson.loads, frames(out))]


def test_feed_data_keeps_the_usual_frame_as_it_came_and_joins_the_rest_on_one_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_data(b'data: {"a": 1}\n\ndata: {"b"') == [b'{"a": 1}']
    assert decoder.feed_data(b': 2}\n\n: comment\n\nevent: x\ndata: [1,\ndata: 2]\n\n') == [b'{"b": 2}', b"[1, 2]"]
    assert decoder.feed_data(b"data: tail") == []
    assert decoder.flush_data() == [b"tail"]


async def test_a_silent_upstream_fails_the_stream_after_its_idle_time() -> None:
    body = sse(upstream_chunks(["one", "two"]), "orjson")
    first = body[:body.index(b"\n\n") + 2]
    stream = _OpenAIStream(Response(Content([first], stall=True)), upstream(idle=0.2))  # type: ignore[arg-type]
    started = asyncio.get_running_loop().time()
    got = []
    with pytest.raises(StreamBroken, match=r"was silent for 0\.2s"):
        async for batch in stream:  # type: ignore[attr-defined]
            got.append(batch)
    assert 0.19 <= asyncio.get_running_loop().time() - started < 1.0
    assert len(got) == 1


async def test_time_spent_writing_to_a_slow_client_is_not_silence() -> None:
    body = sse(upstream_chunks(["one", "two", "three"]), "orjson")
    reads = [body[i:i + 120] for i in range(0, len(body), 120)]
    stream = _OpenAIStream(Response(Content(reads)), upstream(idle=0.1))  # type: ignore[arg-type]
    items = 0
    async for batch in stream:  # type: ignore[attr-defined]
        items += len(batch)
        await asyncio.sleep(0.15)  # longer than the idle time, between reads
    assert items == len(upstream_chunks(["one", "two", "three"]))


async def test_a_live_upstream_stream_through_the_provider(aiohttp_server: Any) -> None:
    """Over a real connection: a compact LF stream, as OpenAI sends it, read and renamed."""
    chunks = upstream_chunks(["Hello", " world"])

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in sse(chunks, "orjson").split(b"\n\n")[:-1]:
            await response.write(part + b"\n\n")
        return response
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        provider = OpenAIProvider(ProviderSettings(name="up", type="openai", base_url=str(server.make_url("/v1"))),
                                  session)
        stream = await provider.open_stream(ProviderRequest("chat/completions", {"model": UPSTREAM, "stream": True},
                                                            "req_1"))
        try:
            found = [batch async for batch in stream]  # type: ignore[attr-defined]
        finally:
            await stream.aclose()
    out = rendered(found, wants_usage=False)
    assert [orjson.loads(f) for f in frames(out)] == reserialized(chunks, wants_usage=False)


def test_shape_frames_work_each_shape_out_once_and_forget_the_oldest_beyond_twice_the_kept() -> None:
    worked_out: list[ChunkShape] = []

    def frame(shape: ChunkShape) -> str:
        worked_out.append(shape)
        return shape.text
    shapes = [ChunkShape({}, ("content",), b"{", f"t{i}", b"}") for i in range(2 * LatestShapes.KEPT + 1)]
    frames: ShapeFrames[str] = ShapeFrames()
    assert [frames.of(shape, frame) for shape in shapes[:2] * 3] == ["t0", "t1"] * 3
    assert worked_out == shapes[:2]
    for shape in shapes[2:]:
        frames.of(shape, frame)
    assert frames.of(shapes[1], frame) == "t1" and worked_out[-1] is shapes[-1]  # still known
    assert frames.of(shapes[0], frame) == "t0" and worked_out[-1] is shapes[0]  # the oldest was forgotten
