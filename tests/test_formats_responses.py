"""The Responses API as billing reads it and as chat carries it: a request's items become chat
messages (function calls and their outputs, a developer's instructions, images), tools and
formats their chat counterparts; a chat answer becomes a response; and any JSON a client sends
as input is measured for the hold, or refused as a 400, never an error of apibox's."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from apibox import tokens
from apibox.errors import InvalidRequest
from apibox.formats.responses import billing_copy, reply_text, usage_from_responses
from apibox.formats.responses_chat import ChatToResponsesStream, chat_request, response_of
from apibox.pricing import Usage

PARIS, NICE = '{"city":"Paris"}', '{"city":"Nice"}'
CITY_TOOL = {"type": "function", "name": "city_weather", "description": "Weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_items_become_chat_messages() -> None:
    body = {"model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "temperature": 0.2,
            "input": [
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                             {"type": "input_image", "image_url": "https://x/a.png"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "call_1", "name": "city_weather", "arguments": PARIS},
                {"type": "function_call", "call_id": "call_2", "name": "city_weather", "arguments": NICE},
                {"type": "function_call_output", "call_id": "call_1", "output": "21C"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]}],
            "tools": [CITY_TOOL], "tool_choice": {"type": "function", "name": "city_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}}}
    chat = chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "auto"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "city_weather", "arguments": PARIS}},
            {"id": "call_2", "type": "function", "function": {"name": "city_weather", "arguments": NICE}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]}]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "city_weather", "parameters": CITY_TOOL["parameters"], "description": "Weather"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "city_weather"}}
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "w", "schema": {"type": "object"}}}
    assert (chat["max_tokens"], chat["temperature"]) == (50, 0.2)


def test_a_chat_answer_becomes_a_response_and_usage_reads_both_ways() -> None:
    reply = {"choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "Hi", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    usage = Usage(prompt_tokens=12, completion_tokens=5, cached_tokens=4, reasoning_tokens=2)
    answer = response_of(reply, "my-model", usage)
    assert (answer["object"], answer["model"], answer["status"]) == ("response", "my-model", "incomplete")
    assert [item["type"] for item in answer["output"]] == ["message", "function_call"]
    assert answer["output"][1]["call_id"] == "call_9" and reply_text(answer) == "Hi{}"
    assert usage_from_responses(answer["usage"]) == usage


def test_a_stream_of_chunks_becomes_numbered_events_that_close_each_item() -> None:
    stream = ChatToResponsesStream("m")
    events = stream.feed({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "He"}}]})
    events += stream.feed({"choices": [{"index": 0, "delta": {"content": "llo"}}]})
    events += stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{\"a\""}}]}}]})
    events += stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]})
    events += stream.finish(Usage(prompt_tokens=3, completion_tokens=4))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = events[-1]["response"]
    assert [item.get("arguments") for item in final["output"]] == [None, '{"a":1}']
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["output_tokens"] == 4


def test_parallel_calls_whose_arguments_come_in_turns_each_get_their_own() -> None:
    stream = ChatToResponsesStream("m")

    def call(index: int, **function: str) -> dict[str, Any]:
        head = {"id": f"call_{index}"} if "name" in function else {}
        return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **head, "function": function}]}}]}

    events = stream.feed(call(0, name="weather", arguments=""))
    events += stream.feed(call(1, name="search", arguments=""))
    for index, piece in ((0, '{"city"'), (1, '{"q"'), (0, ':"Paris"}'), (1, ':"news"}')):
        events += stream.feed(call(index, arguments=piece))
    events += stream.finish(Usage(prompt_tokens=3, completion_tokens=4))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [(item["name"], item["arguments"]) for item in final["output"]] == [
        ("weather", '{"city":"Paris"}'), ("search", '{"q":"news"}')]
    deltas = [(e["output_index"], e["delta"]) for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == [(0, '{"city"'), (1, '{"q"'), (0, ':"Paris"}'), (1, ':"news"}')]
    done = [(e["output_index"], e["arguments"]) for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done == [(0, '{"city":"Paris"}'), (1, '{"q":"news"}')]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "call_id", "output", "name", "arguments", "image_url"]),
        inner, max_size=4),
    max_leaves=16)


@given(items=st.lists(json_values, min_size=1, max_size=4), instructions=st.none() | st.text(max_size=20))
def test_any_input_is_measured_for_the_hold_and_translated_or_refused(items: list[Any],
                                                                      instructions: str | None) -> None:
    body = {"model": "m", "input": items, "instructions": instructions}
    copy = billing_copy(body)
    size = tokens.measure_prompt(copy)
    assert size.bound >= 0 and size.estimate >= 0
    try:
        chat = chat_request(body)
    except InvalidRequest as refused:
        assert refused.param and refused.param.startswith("input")
    else:
        assert all(isinstance(message["role"], str) and "content" in message for message in chat["messages"])
        assert len(chat["messages"]) <= len(items) + 1  # an item a message at most, and the instructions


def test_a_malformed_item_part_or_tool_is_named_for_what_is_wrong_with_it() -> None:
    cases = [({"input": [{"type": "message", "role": "user", "content": [{"type": "input_text"}]}]},
              "input[0].content[0].text", "must be a string"),
             ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": 5}]}]},
              "input[0].content[0].image_url", "must be a string"),
             ({"input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]", "must be an object"),
             ({"input": [5]}, "input[0]", "must be an object"),
             ({"input": "hi", "tools": [5]}, "tools[0]", "must be an object"),
             ({"input": [{"type": "computer_call"}]}, "input[0]", "is not supported")]
    for extra, param, says in cases:
        try:
            chat_request({"model": "m", **extra})
        except InvalidRequest as refused:
            assert (refused.param, says in refused.message) == (param, True), refused.message
        else:
            raise AssertionError(f"{extra} was not refused")
