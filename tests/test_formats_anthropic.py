"""Anthropic Messages <-> OpenAI chat translation, without a network (PROTOCOLS.md 4.1-4.4, 4.7, 4.8).

Each direction is checked field by field against the tables: requests, whole replies, the
two stream state machines and the usage mappings (prompt includes cache reads and writes on
the OpenAI side; ``input_tokens`` excludes them on the Anthropic side).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from apibox.errors import InvalidRequest
from apibox.formats.anthropic import (
    anthropic_to_openai_reply,
    anthropic_to_openai_request,
    openai_to_anthropic_reply,
    openai_to_anthropic_request,
    usage_from_anthropic,
    usage_to_anthropic,
)
from apibox.formats.anthropic_stream import AnthropicToOpenAIStream, OpenAIToAnthropicStream
from apibox.pricing import Usage

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OPENAI_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": WEATHER, "strict": True}}
PNG = "iVBORw0KGgo="


def to_anthropic(**body: Any) -> dict[str, Any]:
    return openai_to_anthropic_request({"model": "claude-x", **body}, 4096)


# -- OpenAI request -> Anthropic request (4.1) ---------------------------------------------


def test_system_and_developer_messages_anywhere_become_the_top_level_system_in_order() -> None:
    out = to_anthropic(messages=[
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "assistant", "content": "Salut"},
        {"role": "system", "content": "No emojis."},
        {"role": "user", "content": "Again"},
    ])
    assert out["system"] == "Be terse.\n\nAnswer in French.\n\nNo emojis."
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Salut"}]},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    assert "system" not in to_anthropic(messages=[{"role": "user", "content": "x"}])


def test_consecutive_tool_messages_merge_into_one_user_turn_results_first() -> None:
    out = to_anthropic(messages=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25C"},
                                                               {"type": "text", "text": "sunny"}]},
        {"role": "user", "content": "Thanks, and tomorrow?"},
    ])
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [  # a null content adds no empty text block
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "21C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "25C\nsunny"},
            {"type": "text", "text": "Thanks, and tomorrow?"},
        ]},
    ]


def test_consecutive_same_role_messages_merge_into_one_turn() -> None:
    out = to_anthropic(messages=[
        {"role": "user", "content": "one"}, {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": ""},  # empty: no block, no turn
    ])
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]


def test_assistant_text_and_tool_calls_become_one_turn_and_legacy_function_calls_get_ids() -> None:
    out = to_anthropic(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "done"},
        {"role": "assistant", "content": None, "function_call": {"name": "g", "arguments": '{"a": 1}'}},
        {"role": "function", "name": "g", "content": "ok"},
    ])
    assistant = out["messages"][1]
    assert assistant == {"role": "assistant", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_9", "name": "f", "input": {}},  # empty arguments: no input
    ]}
    legacy = out["messages"][3]["content"][0]
    assert legacy["type"] == "tool_use" and legacy["name"] == "g" and legacy["input"] == {"a": 1}
    assert legacy["id"].startswith("toolu_")
    assert out["messages"][4] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "g", "content": "ok"}]}


@pytest.mark.parametrize("arguments", ['{"city": "Par', "not json", '{"a": }'])
def test_tool_call_arguments_that_are_not_json_are_refused(arguments: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_anthropic(messages=[{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}])
    assert caught.value.status == 400
    assert caught.value.param == "messages"
    assert "arguments" in caught.value.message


@pytest.mark.parametrize("n", [2, 5])
def test_more_than_one_choice_is_refused(n: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_anthropic(messages=[{"role": "user", "content": "x"}], n=n)
    assert (caught.value.status, caught.value.param) == (400, "n")
    assert to_anthropic(messages=[{"role": "user", "content": "x"}], n=1)["messages"]


def test_max_tokens_prefers_max_completion_tokens_and_defaults_when_absent() -> None:
    messages = [{"role": "user", "content": "x"}]
    assert to_anthropic(messages=messages)["max_tokens"] == 4096
    assert openai_to_anthropic_request({"messages": messages}, 777)["max_tokens"] == 777
    assert to_anthropic(messages=messages, max_tokens=50)["max_tokens"] == 50
    assert to_anthropic(messages=messages, max_tokens=50, max_completion_tokens=20)["max_tokens"] == 20


def test_sampling_stop_stream_and_user_fields() -> None:
    messages = [{"role": "user", "content": "x"}]
    out = to_anthropic(messages=messages, temperature=1.7, top_p=0.9, stop="END", stream=True,
                       stream_options={"include_usage": True}, user="u-1", seed=4, presence_penalty=1,
                       logit_bias={"1": 2}, frequency_penalty=0.5)
    assert out["temperature"] == 1.0
    assert (out["top_p"], out["stop_sequences"], out["stream"]) == (0.9, ["END"], True)
    assert out["metadata"] == {"user_id": "u-1"}
    assert set(out) == {"model", "messages", "max_tokens", "temperature", "top_p", "stop_sequences", "stream",
                        "metadata"}  # penalties, seed, logit_bias and stream_options are dropped
    assert to_anthropic(messages=messages, temperature=0.3)["temperature"] == 0.3
    assert to_anthropic(messages=messages, temperature=0)["temperature"] == 0
    assert to_anthropic(messages=messages, stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert to_anthropic(messages=messages, user="u", safety_identifier="s")["metadata"] == {"user_id": "s"}
    assert "stream" not in to_anthropic(messages=messages, stream=False)


def test_tools_become_input_schema_tools_and_strict_is_dropped() -> None:
    bare = {"type": "function", "function": {"name": "ping"}}
    out = to_anthropic(messages=[{"role": "user", "content": "x"}], tools=[OPENAI_TOOL, bare])
    assert out["tools"] == [
        {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER},
        {"name": "ping", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    (None, None, None),
])
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "tools": [OPENAI_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = to_anthropic(**body)
    assert out.get("tool_choice") == expected


def test_tool_choice_without_tools_is_not_sent() -> None:
    out = to_anthropic(messages=[{"role": "user", "content": "x"}], tool_choice="required",
                       parallel_tool_calls=False)
    assert "tool_choice" not in out and "tools" not in out


def test_images_become_base64_or_url_blocks() -> None:
    out = to_anthropic(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}])
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_an_unsupported_image_type_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_anthropic(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}])
    assert "image/tiff" in caught.value.message


# -- Anthropic reply -> OpenAI completion (4.2) --------------------------------------------


def anthropic_reply(content: list[dict[str, Any]], stop: str = "end_turn", **usage: int) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-upstream-1",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 87, **usage}}


def test_a_reply_with_text_thinking_and_a_tool_call() -> None:
    reply = anthropic_reply([
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Let me "},
        {"type": "text", "text": "check."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
    ], stop="tool_use", cache_read_input_tokens=1800, cache_creation_input_tokens=100)
    out = anthropic_to_openai_reply(reply, "claude-fake")
    assert (out["id"], out["object"], out["model"]) == ("msg_1", "chat.completion", "claude-fake")
    assert isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."  # thinking is dropped
    assert choice["message"]["tool_calls"] == [{"id": "toolu_01A", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]
    assert out["usage"] == {
        "prompt_tokens": 25 + 1800 + 100, "completion_tokens": 87, "total_tokens": 25 + 1800 + 100 + 87,
        "prompt_tokens_details": {"cached_tokens": 1800, "cache_write_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_a_tool_only_reply_has_null_content() -> None:
    out = anthropic_to_openai_reply(anthropic_reply(
        [{"type": "tool_use", "id": "t", "name": "f", "input": {}}], stop="tool_use"), "m")
    message = out["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"
    text_only = anthropic_to_openai_reply(anthropic_reply([{"type": "text", "text": "hi"}]), "m")
    assert "tool_calls" not in text_only["choices"][0]["message"]


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter"),
    ("pause_turn", "stop"),
])
def test_stop_reasons_map_to_finish_reasons(stop: str, finish: str) -> None:
    out = anthropic_to_openai_reply(anthropic_reply([{"type": "text", "text": "x"}], stop=stop), "m")
    assert out["choices"][0]["finish_reason"] == finish


# -- usage both ways (4.4) -----------------------------------------------------------------


def test_anthropic_usage_to_openai_convention() -> None:
    usage = usage_from_anthropic({"input_tokens": 25, "cache_creation_input_tokens": 40,
                                  "cache_read_input_tokens": 1800, "output_tokens": 87,
                                  "output_tokens_details": {"thinking_tokens": 30},
                                  "cache_creation": {"ephemeral_5m_input_tokens": 40}, "service_tier": "standard"})
    assert usage == Usage(prompt_tokens=1865, completion_tokens=87, cached_tokens=1800, cache_write_tokens=40,
                          reasoning_tokens=30)
    assert usage.uncached_prompt_tokens == 25
    assert usage_from_anthropic({"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": None}) == Usage(
        prompt_tokens=5, completion_tokens=1)
    assert usage_from_anthropic(None) is None
    assert usage_from_anthropic("usage") is None


def test_openai_usage_to_anthropic_convention() -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=5, cached_tokens=30, cache_write_tokens=10)
    assert usage_to_anthropic(usage) == {"input_tokens": 60, "cache_creation_input_tokens": 10,
                                         "cache_read_input_tokens": 30, "output_tokens": 5}
    # The round trip keeps every class.
    assert usage_from_anthropic(usage_to_anthropic(usage)) == usage


# -- Anthropic stream -> OpenAI chunks (4.3) -----------------------------------------------

SAMPLE_STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "up",
                                          "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0,
                                                    "cache_read_input_tokens": 1800, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_A",
                                                                  "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}},
    {"type": "content_block_stop", "index": 2},
    {"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_B",
                                                                  "name": "get_time", "input": {}}},
    {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
    {"type": "content_block_stop", "index": 3},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 40}},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 87}},
    {"type": "message_stop"},
]


def test_anthropic_stream_becomes_openai_chunks() -> None:
    translate = AnthropicToOpenAIStream("claude-fake")
    chunks = [c for event in SAMPLE_STREAM for c in translate.feed(event)]
    assert all(c["model"] == "claude-fake" and c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"] == "msg_1"
    *answer, usage_chunk = chunks
    deltas = [c["choices"][0]["delta"] for c in answer]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},  # thinking and signatures are dropped
        {"tool_calls": [{"index": 0, "id": "toolu_A", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},  # empty fragment skipped
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_B", "type": "function",
                         "function": {"name": "get_time", "arguments": ""}}]},  # block 3 is tool 1
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in answer] == [None] * 7 + ["tool_calls"]
    assert usage_chunk["choices"] == []
    # message_delta usage is cumulative: the last value wins, never the sum.
    assert usage_chunk["usage"]["completion_tokens"] == 87
    assert usage_chunk["usage"]["prompt_tokens"] == 25 + 1800
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == 1800
    assert translate.usage == Usage(prompt_tokens=1825, completion_tokens=87, cached_tokens=1800)
    assert translate.finished


@pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("max_tokens", "length"),
                                              ("tool_use", "tool_calls"), ("refusal", "content_filter")])
def test_anthropic_stream_finish_reason(stop: str, finish: str) -> None:
    translate = AnthropicToOpenAIStream("m")
    events = [SAMPLE_STREAM[0],
              {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 3}},
              {"type": "message_stop"}]
    chunks = [c for e in events for c in translate.feed(e)]
    assert chunks[-2]["choices"][0]["finish_reason"] == finish


def test_anthropic_stream_usage_overwritten_by_message_delta_input_counts() -> None:
    translate = AnthropicToOpenAIStream("m")
    translate.feed(SAMPLE_STREAM[0])
    translate.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": 9, "input_tokens": 30, "cache_read_input_tokens": None,
                              "cache_creation_input_tokens": 12}})
    assert translate.usage == Usage(prompt_tokens=30 + 1800 + 12, completion_tokens=9, cached_tokens=1800,
                                    cache_write_tokens=12)
    assert translate.feed({"type": "ping"}) == []


def test_anthropic_stream_text_in_content_block_start_is_not_lost() -> None:
    translate = AnthropicToOpenAIStream("m")
    translate.feed(SAMPLE_STREAM[0])
    chunks = translate.feed({"type": "content_block_start", "index": 0, "content_block": {"type": "text",
                                                                                         "text": "Hi"}})
    assert [c["choices"][0]["delta"] for c in chunks] == [{"content": "Hi"}]


# -- Anthropic request -> OpenAI request (4.7) ---------------------------------------------


def test_anthropic_request_becomes_an_openai_request() -> None:
    body = {
        "model": "gpt-fake", "max_tokens": 300, "temperature": 0.5, "top_p": 0.8, "top_k": 5, "stream": True,
        "stop_sequences": ["a", "b", "c", "d", "e"], "metadata": {"user_id": "u-7"},
        "system": [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Speak French."}],
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER},
                  {"name": "ping", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look", "cache_control": {"type": "ephemeral"}},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": PNG}},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "ping", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "21C"},
                                                                            {"type": "text", "text": "sunny"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "timeout", "is_error": True},
                {"type": "text", "text": "And tomorrow?"}]},
            {"role": "user", "content": "plain"},
        ],
    }
    out = anthropic_to_openai_request(body)
    assert out["messages"] == [
        {"role": "system", "content": "Be terse.\n\nSpeak French."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": json.dumps({"city": "Paris"})}},
            {"id": "toolu_2", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "21C\nsunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"},
        {"role": "user", "content": "And tomorrow?"},  # the rest of the turn, after its tool results
        {"role": "user", "content": "plain"},
    ]
    assert (out["model"], out["max_tokens"], out["temperature"], out["top_p"], out["stream"]) == (
        "gpt-fake", 300, 0.5, 0.8, True)
    assert out["stop"] == ["a", "b", "c", "d"]  # OpenAI takes at most four
    assert out["user"] == "u-7"
    assert "top_k" not in out and "metadata" not in out and "system" not in out
    assert out["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
        {"type": "function", "function": {"name": "ping", "description": "", "parameters": {"type": "object"}}},
    ]
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ("required", False)


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
])
def test_anthropic_tool_choice_mapping(choice: dict[str, Any], expected: Any) -> None:
    out = anthropic_to_openai_request({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"name": "f", "input_schema": {}}], "tool_choice": choice})
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


def test_a_system_string_and_a_text_only_user_turn() -> None:
    out = anthropic_to_openai_request({"model": "m", "max_tokens": 5, "system": "S",
                                       "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}]})
    # each block on its own line: glued together, Claude Code's reminder ran into the question
    assert out["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}]
    assert "stream" not in out and "tools" not in out and "tool_choice" not in out


# -- OpenAI reply -> Anthropic message (4.8) -----------------------------------------------


def openai_reply(message: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}]}


def test_an_openai_reply_becomes_an_anthropic_message() -> None:
    usage = Usage(prompt_tokens=50, completion_tokens=12, cached_tokens=20)
    reply = openai_reply({"content": "Let me check.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "broken", "arguments": "{not json"}},
    ]}, "tool_calls")
    out = openai_to_anthropic_reply(reply, "gpt-fake", usage)
    assert out["id"].startswith("msg_")
    assert (out["type"], out["role"], out["model"], out["stop_reason"], out["stop_sequence"]) == (
        "message", "assistant", "gpt-fake", "tool_use", None)
    assert out["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "broken", "input": {}},
    ]
    assert out["usage"] == {"input_tokens": 30, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 20,
                            "output_tokens": 12}


@pytest.mark.parametrize(("finish", "stop"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("function_call", "tool_use"),
    ("content_filter", "refusal"), (None, "end_turn"),
])
def test_finish_reasons_map_to_stop_reasons(finish: str | None, stop: str) -> None:
    out = openai_to_anthropic_reply(openai_reply({"content": "x"}, finish), "m", Usage())
    assert out["stop_reason"] == stop


def test_an_empty_openai_reply_has_no_content_blocks() -> None:
    out = openai_to_anthropic_reply(openai_reply({"content": None}, "stop"), "m", Usage())
    assert out["content"] == []


# -- OpenAI stream -> Anthropic events (4.8) -----------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "choices": choices, **extra}


def test_openai_stream_becomes_anthropic_events_with_blocks_opened_and_closed_in_order() -> None:
    translate = OpenAIToAnthropicStream("gpt-fake", input_tokens=17)
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 40, "completion_tokens": 12}),
    ]
    events = [e for c in chunks for e in translate.feed(c)]
    events += translate.finish(Usage(prompt_tokens=40, completion_tokens=12, cached_tokens=10))
    assert all(name == data["type"] for name, data in events)
    assert [(name, data.get("index")) for name, data in events] == [
        ("message_start", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None),
    ]
    start = events[0][1]["message"]
    assert (start["role"], start["model"], start["content"], start["stop_reason"]) == (
        "assistant", "gpt-fake", [], None)
    assert start["usage"] == {"input_tokens": 17, "output_tokens": 0}
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert [e[1]["delta"] for e in events[2:4]] == [{"type": "text_delta", "text": "Hel"},
                                                    {"type": "text_delta", "text": "lo"}]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert [e[1]["delta"] for e in events[6:8]] == [{"type": "input_json_delta", "partial_json": '{"city": '},
                                                    {"type": "input_json_delta", "partial_json": '"Paris"}'}]
    assert events[9][1]["content_block"] == {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}
    assert events[10][1]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    assert events[12][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 30, "cache_creation_input_tokens": 0,
                                       "cache_read_input_tokens": 10, "output_tokens": 12}}


def test_text_after_a_tool_call_opens_a_new_text_block() -> None:
    translate = OpenAIToAnthropicStream("m")
    events = []
    for c in (chunk({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{}"}}]}),
              chunk({"content": "after"}), chunk({}, "stop")):
        events += translate.feed(c)
    events += translate.finish(None)
    assert [(n, d.get("index")) for n, d in events] == [
        ("message_start", None), ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("message_delta", None), ("message_stop", None)]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"] == {"output_tokens": 0}


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"),
                                              ("tool_calls", "tool_use"), ("content_filter", "refusal"),
                                              (None, "end_turn")])
def test_openai_stream_stop_reason(finish: str | None, stop: str) -> None:
    translate = OpenAIToAnthropicStream("m")
    translate.feed(chunk({"content": "x"}))
    if finish:
        translate.feed(chunk({}, finish))
    name, data = translate.finish(Usage(prompt_tokens=3, completion_tokens=1))[-2]
    assert (name, data["delta"]["stop_reason"]) == ("message_delta", stop)


def test_an_openai_stream_with_no_chunks_still_frames_a_whole_message() -> None:
    events = OpenAIToAnthropicStream("m", input_tokens=5).finish(Usage(prompt_tokens=5, completion_tokens=0))
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]


# -- JSON output, both ways ---------------------------------------------------------------------

ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                 "additionalProperties": False}


def test_a_json_schema_response_format_becomes_anthropics_output_format_and_back() -> None:
    asked = [{"role": "user", "content": "2+2?"}]
    out = to_anthropic(messages=asked, response_format={"type": "json_schema", "json_schema": {
        "name": "A", "schema": ANSWER_SCHEMA, "strict": True}})
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}
    assert "system" not in out
    back = anthropic_to_openai_request({"model": "m", "max_tokens": 5, "messages": asked, "output_config": {
        "format": {"type": "json_schema", "schema": ANSWER_SCHEMA}, "effort": "low"}})
    assert back["response_format"] == {"type": "json_schema", "json_schema": {"name": "output",
                                                                               "schema": ANSWER_SCHEMA}}
    assert "reasoning_effort" not in back  # many OpenAI models refuse it: the effort is left out


def test_a_json_object_response_format_is_asked_for_in_the_system_prompt() -> None:
    out = to_anthropic(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       response_format={"type": "json_object"})
    assert out["system"].startswith("Be brief.\n\n") and "one JSON object" in out["system"]
    assert "output_config" not in out
    assert "output_config" not in to_anthropic(messages=[{"role": "user", "content": "Hi"}],
                                               response_format={"type": "text"})


@pytest.mark.parametrize("form", [{"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 5}}])
def test_a_json_schema_without_a_schema_is_refused(form: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_anthropic(messages=[{"role": "user", "content": "Hi"}], response_format=form)
    assert refused.value.param == "response_format"
