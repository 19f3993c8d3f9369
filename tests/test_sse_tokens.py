"""The SSE decoder under arbitrary TCP splits, and the token estimate and bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apibox import tokens
from apibox.gateway.doors import AnthropicDoor
from apibox.gateway.proxy import Delivered
from apibox.openai_wire import delta_text, reply_text
from apibox.sse import MOST_EVENT_BYTES, Event, EventTooLarge, SSEDecoder, encode

ENDINGS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}

# Field values never contain CR or LF (that is what makes them one line).
values = st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)), max_size=12)
names = st.text(st.characters(exclude_characters="\r\n:", exclude_categories=("Cs",)), min_size=1, max_size=8)


def decode(stream: bytes, cuts: list[int]) -> list[Event]:
    """Feed ``stream`` in the pieces ``cuts`` make, then flush."""
    decoder, events, start = SSEDecoder(), [], 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        events += decoder.feed(stream[start:cut])
        start = cut
    return events + decoder.flush()


@st.composite
def event_blocks(draw: st.DrawFn) -> tuple[list[list[str]], list[Event]]:
    """Blocks of lines (data, event, comments) and the events they must decode to."""
    blocks, expected = [], []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        lines: list[str] = []
        data: list[str] = []
        name = ""
        for kind in draw(st.lists(st.sampled_from(["data", "data", "event", "comment", "nospace", "other"]),
                                  min_size=1, max_size=4)):
            if kind == "data":
                value = draw(values)
                data.append(value)
                lines.append(f"data: {value}")
            elif kind == "nospace":
                value = draw(values.filter(lambda v: not v.startswith(" ")))
                data.append(value)
                lines.append(f"data:{value}")
            elif kind == "event":
                name = draw(values.filter(lambda v: not v.startswith(" ")))
                lines.append(f"event: {name}")
            elif kind == "comment":
                lines.append(f":{draw(values)}")
            else:
                lines.append(f"id: {draw(values)}")
        blocks.append(lines)
        if data:
            expected.append(Event(data="\n".join(data), event=name))
    return blocks, expected


def render(blocks: list[list[str]], endings: list[str], final_blank: bool) -> bytes:
    """Join the blocks with the given line endings (cycled), a blank line after each block.

    A CR ending followed by an LF ending would be one CRLF ending, so an LF after a CR is
    written as CRLF instead."""
    out, i, last = [], 0, ""

    def eol() -> str:
        nonlocal i, last
        i += 1
        ending = endings[(i - 1) % len(endings)]
        last = "\r\n" if ending == "\n" and last == "\r" else ending
        return last
    for n, block in enumerate(blocks):
        for line in block:
            out.append(line + eol())
        if n < len(blocks) - 1 or final_blank:
            out.append(eol())
    return "".join(out).encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(event_blocks(), st.sampled_from(sorted(ENDINGS)), st.booleans(), st.data())
def test_events_survive_any_split(case: tuple[list[list[str]], list[Event]], ending: str, final_blank: bool,
                                  data: st.DataObject) -> None:
    blocks, expected = case
    stream = render(blocks, [ENDINGS[ending]], final_blank)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=8), label="cuts")
    assert decode(stream, cuts) == expected


@settings(max_examples=100, deadline=None)
@given(event_blocks(), st.lists(st.sampled_from(sorted(ENDINGS.values())), min_size=1, max_size=5),
       st.booleans(), st.data())
def test_mixed_line_endings_survive_any_split(case: tuple[list[list[str]], list[Event]], endings: list[str],
                                              final_blank: bool, data: st.DataObject) -> None:
    """The SSE spec lets every line end in CRLF, LF or CR, independently."""
    blocks, expected = case
    stream = render(blocks, endings, final_blank)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=8), label="cuts")
    assert decode(stream, cuts) == expected


@pytest.mark.parametrize("named", [False, True], ids=["feed_data", "feed_named"])
@settings(max_examples=200, deadline=None)
@given(event_blocks(), st.lists(st.sampled_from(sorted(ENDINGS.values())), min_size=1, max_size=3),
       st.booleans(), st.data())
def test_the_fast_decoders_give_each_events_data_on_one_line(named: bool, case: tuple[list[list[str]], list[Event]],
                                                             endings: list[str], final_blank: bool,
                                                             data: st.DataObject) -> None:
    """The fast paths (``data: ...`` frames, or ``event: NAME`` and ``data: ...``, with LF endings,
    sliced as they came) and the general one agree: each event's data on one line (and its name)."""
    blocks, expected = case
    stream = render(blocks, endings, final_blank)
    cuts = sorted(set(data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=8))))
    decoder, got = SSEDecoder(), list[object]()
    feed, flush = (decoder.feed_named, decoder.flush_named) if named else (decoder.feed_data, decoder.flush_data)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += feed(stream[start:end])
    got += flush()
    lines = [event.data.replace("\n", " ").encode() for event in expected]
    assert got == ([(event.event, line) for event, line in zip(expected, lines, strict=True)] if named else lines)


@settings(max_examples=200, deadline=None)
@given(event_blocks(), st.lists(st.sampled_from(sorted(ENDINGS.values())), min_size=1, max_size=3),
       st.booleans(), st.data())
def test_reads_kept_apart_while_a_long_event_comes_decode_as_reads_joined_at_once(
        case: tuple[list[list[str]], list[Event]], endings: list[str], final_blank: bool,
        data: st.DataObject) -> None:
    """With every unfinished event taken for a long one (``gather_from`` 1), the reads after it are
    kept apart until one may end it: every decoder still gives what the stream holds, an ending split
    between reads (CR | LF, LF | LF) included."""
    blocks, expected = case
    stream = render(blocks, endings, final_blank)
    cuts = sorted(set(data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12))))
    lines = [event.data.replace("\n", " ").encode() for event in expected]
    wanted = {"feed": expected, "feed_data": lines,
              "feed_named": [(event.event, line) for event, line in zip(expected, lines, strict=True)]}
    for feed, flush in (("feed", "flush"), ("feed_data", "flush_data"), ("feed_named", "flush_named")):
        decoder, got = SSEDecoder(), list[object]()
        decoder.gather_from = 1
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            got += getattr(decoder, feed)(stream[start:end])
        got += getattr(decoder, flush)()
        assert got == wanted[feed], feed


@pytest.mark.parametrize("feed", ["feed", "feed_data", "feed_named"])
def test_a_long_event_in_many_reads_is_kept_apart_and_read_whole_when_it_ends(feed: str) -> None:
    """A 1 MB event in 4 KB reads: none is joined to it until the one that ends it."""
    decoder = SSEDecoder()
    body = b"x" * (1024 * 1024)
    stream = b"event: big\ndata: " + body + b"\r\n\r\ndata: next\n\n"
    got: list[object] = []
    for start in range(0, len(stream), 4096):
        got += getattr(decoder, feed)(stream[start:start + 4096])
        if start + 4096 < len(body):
            assert got == [] and len(decoder._buffer) < 2 * decoder.gather_from  # the rest is kept apart
    assert len(got) == 2
    assert got[0] in (Event(body.decode(), "big"), body, ("big", body))


def test_feed_named_slices_the_usual_named_frame_as_it_came() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_named(b'event: a\ndata: {"x": 1}\n\nevent: b\ndata: {"y"') == [("a", b'{"x": 1}')]
    assert decoder.feed_named(b': 2}\n\n: comment\n\ndata: [1,\ndata: 2]\n\nevent: c\ndata:3\n\n') == [
        ("b", b'{"y": 2}'), ("", b"[1, 2]"), ("c", b"3")]
    assert decoder.feed_named(b"event: d\ndata: tail") == []
    assert decoder.flush_named() == [("d", b"tail")]


def test_an_event_name_that_is_not_utf8_is_read_as_the_general_decoder_reads_it() -> None:
    """Replaced, not raised: a malformed name must end the stream as any malformed event does."""
    frame = b"event: caf\xe9\ndata: {}\n\n"
    general = SSEDecoder().feed(frame)
    assert SSEDecoder().feed_named(frame) == [(general[0].event, b"{}")] == [("caf\ufffd", b"{}")]


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_every_single_split_point(ending: str) -> None:
    """Each event split at every byte boundary: inside multi-byte UTF-8, between CR and LF."""
    eol = ENDINGS[ending]
    text = (f"event: delta{eol}data: {{\"content\": \"Héllo 你好 🌍\"}}{eol}: keep-alive{eol}data: second line"
            f"{eol}{eol}data: [DONE]{eol}{eol}")
    stream = text.encode()
    expected = [Event(data='{"content": "Héllo 你好 🌍"}\nsecond line', event="delta"), Event(data="[DONE]")]
    for cut in range(len(stream) + 1):
        assert decode(stream, [cut]) == expected, cut
    for a in range(0, len(stream) + 1, 3):
        for b in range(a, len(stream) + 1, 5):
            assert decode(stream, [a, b]) == expected, (a, b)
    assert decode(stream, list(range(len(stream)))) == expected  # one byte at a time


def test_multibyte_characters_split_across_reads() -> None:
    stream = "data: 你好🌍\n\n".encode()
    decoder = SSEDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert got == [Event(data="你好🌍")]
    assert "\ufffd" not in got[0].data


def test_feed_returns_only_whole_events() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\ndata: b") == [Event("a")]
    assert decoder.feed(b"\r\n") == []
    assert decoder.feed(b"\r\n") == [Event("b")]
    assert decoder.flush() == []


@pytest.mark.parametrize(("stream", "expected"), [
    (b"data: last", [Event("last")]),
    (b"data: last\n", [Event("last")]),
    (b"data: last\r\n", [Event("last")]),
    (b"data: last\r", [Event("last")]),
    (b"event: x\ndata: a\ndata: b", [Event("a\nb", "x")]),
    (b": only a comment\n", []),
    (b"\n\n\r\n", []),
    (b"event: nothing-in-it\n\n", []),
    (b"data\n\n", [Event("")]),
    (b"data:\n\n", [Event("")]),
    (b"data:  two spaces\n\n", [Event(" two spaces")]),
])
def test_final_event_and_edge_cases(stream: bytes, expected: list[Event]) -> None:
    assert decode(stream, []) == expected
    assert decode(stream, list(range(len(stream)))) == expected


def test_flush_empties_the_buffer() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: tail") == []
    assert decoder.flush() == [Event("tail")]
    assert decoder.flush() == []


@given(st.lists(st.tuples(values, st.none() | names.filter(lambda n: not n.startswith(" "))), max_size=5))
def test_encode_decode_round_trip(frames: list[tuple[str, str | None]]) -> None:
    stream = b"".join(encode(data, event) for data, event in frames)
    assert decode(stream, []) == [Event(data, event or "") for data, event in frames]


def test_encode_shape() -> None:
    assert encode("x") == b"data: x\n\n"
    assert encode(b"{}", "message_start") == b"event: message_start\ndata: {}\n\n"


# -- tokens --------------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


@pytest.mark.parametrize(("text", "count"), [
    ("", 0), ("   \n\t", 0), ("hello", 2), ("hi", 1), ("hello world", 4), ("12345", 2), ("a, b.", 4),
])
def test_count_tokens_examples(text: str, count: int) -> None:
    assert tokens.count_tokens(text) == count


@given(texts)
def test_count_tokens_is_between_zero_and_the_visible_characters(text: str) -> None:
    count = tokens.count_tokens(text)
    visible = sum(not c.isspace() for c in text)
    assert 0 <= count <= visible
    assert (count == 0) == (visible == 0)


@given(texts, texts)
def test_count_tokens_adds_up_across_whitespace(a: str, b: str) -> None:
    assert tokens.count_tokens(a + " " + b) == tokens.count_tokens(a) + tokens.count_tokens(b)


@given(texts, texts)
def test_count_tokens_grows_with_more_words(a: str, b: str) -> None:
    assert tokens.count_tokens(a + " " + b) >= tokens.count_tokens(a)


def chat(*contents: object, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": c} for c in contents], **extra}


bodies = st.one_of(
    st.lists(texts, min_size=1, max_size=4).map(lambda cs: chat(*cs)),
    st.lists(st.lists(st.one_of(texts.map(lambda t: {"type": "text", "text": t}),
                                st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}})),
                      max_size=4), min_size=1, max_size=3).map(lambda cs: chat(*cs)),
    texts.map(lambda t: {"model": "m", "prompt": t}),
    st.lists(texts, max_size=4).map(lambda ts: {"model": "m", "prompt": ts}),
    st.lists(st.integers(min_value=0, max_value=200_000), max_size=300).map(lambda ids: {"model": "m", "prompt": ids}),
    st.lists(st.lists(st.integers(min_value=0, max_value=200_000), max_size=50), max_size=5).map(
        lambda ids: {"model": "m", "input": ids}),
    st.lists(texts, max_size=4).map(lambda ts: {"model": "m", "input": ts}),
)


@given(bodies)
def test_prompt_bound_is_never_below_the_estimate(body: dict[str, object]) -> None:
    """The hold covers at least what a stream without usage is charged for its prompt."""
    assert tokens.prompt_bound(body) >= tokens.prompt_estimate(body) >= 0


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["role", "content", "tool_calls", "function", "text", "type", "name",
                                                "arguments", "x"]), inner, max_size=4), max_leaves=12)
any_shape = st.dictionaries(st.sampled_from(["model", "messages", "tools", "prompt", "input"]), json_values,
                            max_size=4)


@given(any_shape)
def test_any_json_body_is_measured_without_error(body: dict[str, object]) -> None:
    """The prompt is measured before the upstream sees the request, so whatever shape a client
    sends (``tool_calls: true``, a message that is a number) must measure, not fail: the upstream
    refuses what is not a request. (``tool_calls: true`` was a 500 here.)"""
    assert tokens.prompt_bound(body) >= tokens.prompt_estimate(body) >= 0


def test_tool_calls_that_are_not_a_list_are_left_to_the_upstream() -> None:
    body = chat("Hello", "there")
    body["messages"][0]["tool_calls"] = True  # type: ignore[index]
    assert tokens.prompt_estimate(body) == tokens.prompt_estimate(chat("Hello", "there"))


@pytest.mark.parametrize("text", ["!!!!!!!!!!", "1.2.3.4.5.6.7.8.9", "a,b,c,d,e,f,g,h", "{}" * 50])
def test_prompt_bound_covers_punctuation_heavy_text(text: str) -> None:
    assert tokens.prompt_bound(chat(text)) >= tokens.prompt_estimate(chat(text))


def test_token_id_prompts_count_one_token_per_id() -> None:
    body = {"model": "m", "prompt": list(range(1_000))}
    assert tokens.prompt_estimate(body) == 1_000
    assert tokens.prompt_bound(body) >= 1_000  # the upstream bills exactly 1,000 prompt tokens
    batch = {"model": "m", "input": [[1, 2, 3], [4, 5]]}
    assert tokens.prompt_estimate(batch) == 5
    assert tokens.prompt_bound(batch) >= 5


def test_image_parts_count_a_tile_budget_each() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with_images = chat([{"type": "text", "text": "what is this"}, image, image])
    without = chat([{"type": "text", "text": "what is this"}])
    assert tokens.prompt_estimate(with_images) - tokens.prompt_estimate(without) == 2 * tokens.PER_IMAGE_TOKENS
    assert tokens.prompt_bound(with_images) - tokens.prompt_bound(without) == 2 * tokens.PER_IMAGE_TOKENS
    assert tokens.prompt_parts(with_images) == (["what is this"], 1, 2)


def test_chat_estimate_and_bound_examples() -> None:
    body = chat("hello world", "hi")
    assert tokens.prompt_estimate(body) == 4 + 1 + 2 * tokens.PER_MESSAGE_TOKENS
    # one token per byte: 13, plus (2 messages + 1) * 4
    assert tokens.prompt_bound(body) == 13 + 3 * tokens.PER_MESSAGE_TOKENS


@given(st.text())
def test_prompt_bound_gives_every_utf8_byte_a_token(text: str) -> None:
    """No tokenizer makes a token of less than a byte, so this bound holds for any upstream."""
    assert tokens.prompt_bound(chat(text)) == len(text.encode("utf-8", "surrogatepass")) + 2 * tokens.PER_MESSAGE_TOKENS


def test_the_estimate_is_counted_only_when_asked_for_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[str] = []
    real = tokens.count_tokens
    monkeypatch.setattr(tokens, "count_tokens", lambda text: counted.append(text) or real(text))
    prompt = tokens.measure_prompt(chat("hello world", "hi"))
    assert prompt.bound == 13 + 3 * tokens.PER_MESSAGE_TOKENS
    assert counted == []  # the hold needs no counting
    assert prompt.estimate == prompt.estimate == 4 + 1 + 2 * tokens.PER_MESSAGE_TOKENS
    assert counted == ["hello world", "hi"]


def test_tool_calls_and_tools_are_counted() -> None:
    body = {"model": "m", "messages": [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]},
    ], "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}
    texts_, messages, images = tokens.prompt_parts(body)
    assert "lookup" in texts_ and '{"q": "x"}' in texts_
    assert any("parameters" in t for t in texts_)
    assert (messages, images) == (1, 0)
    assert tokens.prompt_bound(body) >= tokens.prompt_estimate(body) > tokens.PER_MESSAGE_TOKENS


def test_odd_bodies_do_not_crash() -> None:
    for body in ({}, {"messages": "nope"}, {"messages": [None, 3, {"content": [None, 1, {"type": "image"}]}]},
                 {"prompt": None}, {"input": [[], [[]]]}):
        assert tokens.prompt_bound(body) >= tokens.prompt_estimate(body) >= 0


def test_reads_of_one_frame_each_give_what_the_whole_stream_gives() -> None:
    """An upstream writing as it generates sends a frame a read: those reads take a shortcut,
    which must agree with decoding the same bytes in one piece, whatever the frames hold."""
    frames = [b'data: {"id":1,"text":"a b"}\n\n', b": keep-alive\n\n", b"event: delta\ndata: two\n\n",
              b"data: first\ndata: second\n\n", b"data: \xe4\xbd\xa0\xe5\xa5\xbd\n\n", b"data:no space\n\n",
              b"data: crlf\r\n\r\n", b"data: split", b" across reads\n\n", b"data: [DONE]\n\n"]
    whole = SSEDecoder().feed_data(b"".join(frames))
    decoder = SSEDecoder()
    one_by_one = [payload for frame in frames for payload in decoder.feed_data(frame)]
    assert one_by_one == whole
    assert whole[0] == b'{"id":1,"text":"a b"}' and whole[-1] == b"[DONE]"


@pytest.mark.parametrize("stream", [
    b"data: a\n\ndata: b\n\ndata: c\n\n",  # usual frames only: split in one go
    b"data: a\n\ndata: \n\ndata: c",  # an empty data line, and a frame not yet ended
    b"data: a\n\n\n\ndata: b\n\n",  # an empty block between frames
    b"data: a\n\ndata: b\n\n\n",  # a stray line break after the last frame
    b"data: a\n\ndata: b\ndata: c\n\n",  # data on two lines
    b"data: a\n\n: keep-alive\n\ndata: b\n\n",  # a comment among usual frames
    b"data: a\n\nevent: x\ndata: b\n\n",  # a named event
    b"data: a\n\ndata:b\n\n",  # no space after the colon
    b"data: a\n",  # no frame ended yet
])
def test_a_read_of_several_frames_gives_each_events_data(stream: bytes) -> None:
    """A read of several frames is split at once when all are usual frames; any other block
    among them sends the read the general way. Either way: what decoding event by event gives."""
    reference = SSEDecoder()
    events = reference.feed(stream) + reference.flush()
    decoder = SSEDecoder()
    assert decoder.feed_data(stream) + decoder.flush_data() == [event.data.replace("\n", " ").encode()
                                                                 for event in events]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.text(alphabet="ab1 .é", max_size=6), max_size=6), max_size=8),
       st.integers(min_value=0, max_value=40))
def test_a_stream_is_cut_at_the_first_text_past_its_paid_for_tokens(batches: list[list[str]], limit: int) -> None:
    """However the texts come in batches, the cut falls on the text whose tokens, added to all
    before it, pass the limit; the texts kept are those up to it, and their count is exact."""
    texts = [text for batch in batches for text in batch]
    running = [sum(tokens.count_tokens(t) for t in texts[:i + 1]) for i in range(len(texts))]
    past = next((i for i, total in enumerate(running) if total > limit), None)
    delivered, cut_at, seen = Delivered(), None, 0
    for batch in batches:
        index = delivered.add_all(batch, limit)
        if index is not None:
            cut_at = seen + index
            break
        seen += len(batch)
    assert cut_at == past
    kept = texts if past is None else texts[:past + 1]
    assert delivered.pieces == kept
    assert delivered.tokens() == sum(tokens.count_tokens(t) for t in kept)


def test_a_whole_reply_counts_the_text_its_stream_would() -> None:
    """Thinking, refusals and tool calls are output a reply without usage is charged for by
    estimate, as a stream's chunks are; ids and types of tool calls are not text."""
    message = {"role": "assistant", "reasoning_content": "Let me see.", "content": "Yes.", "refusal": None,
               "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}
    assert reply_text({"choices": [{"index": 0, "message": message}]}) == 'Let me see.Yes.f{"a":1}'
    assert reply_text({"choices": [{"index": 0, "message": message}]}) == \
        delta_text({"choices": [{"index": 0, "delta": message}]})
    assert reply_text({"choices": [{"index": 0, "text": "legacy"}]}) == "legacy"
    assert reply_text({"choices": [{"index": 0, "message": {"role": "assistant", "reasoning": "hm"}}]}) == "hm"


def test_a_whole_anthropic_reply_counts_its_thinking_as_its_stream_would() -> None:
    """A native Anthropic reply without usage: its thinking is output, as a stream's thinking deltas are."""
    reply = {"content": [{"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                         {"type": "text", "text": "Yes."},
                         {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]}
    assert AnthropicDoor({}, {}).reply_text(reply, native=True) == 'Hmm.Yes.{"a": 1}'


@pytest.mark.parametrize("feed", ["feed", "feed_data", "feed_named"])
def test_an_event_past_the_most_an_event_may_hold_is_refused_not_buffered_on(feed: str) -> None:
    """An upstream that never ends its event (200 MB were sent in an audit) is a broken stream at 64 MB."""
    decoder = SSEDecoder()
    big = b"data: " + b"x" * (10 * 1024 * 1024)
    getattr(decoder, feed)(big)  # 10 MB pending: an answer's images may come to that
    with pytest.raises(EventTooLarge):
        getattr(decoder, feed)(b"x" * MOST_EVENT_BYTES)
    decoder = SSEDecoder()
    assert len(getattr(decoder, feed)(big + b"\n\n")) == 1  # and one that ends is read whole
