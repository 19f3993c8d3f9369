"""Gemini <-> OpenAI translation, unit by unit (PROTOCOLS.md 3, 4.4-4.6): requests, replies,
streamed chunks, usage, finish reasons, and the provider's bounded thought-signature map."""

from __future__ import annotations

import json
from typing import Any

import pytest

from apibox.errors import InvalidRequest
from apibox.formats.gemini import (
    SKIP_SIGNATURE,
    GeminiToOpenAI,
    finish_reason,
    openai_to_gemini_request,
    usage_from_gemini,
)
from apibox.pricing import Price, Usage, cost_micro
from apibox.providers import gemini as gemini_provider

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- requests -------------------------------------------------------------------------------


def test_system_and_developer_messages_anywhere_become_the_system_instruction() -> None:
    body = {"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in Spanish."}]},
        {"role": "assistant", "content": "Hola"},
        {"role": "system", "content": "No emojis."},
        {"role": "user", "content": "Bye"},
    ]}
    out = openai_to_gemini_request(body, {})
    assert out["systemInstruction"] == {"parts": [{"text": "Be terse."}, {"text": "Answer in Spanish."},
                                                  {"text": "No emojis."}]}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Hi"}]},
        {"role": "model", "parts": [{"text": "Hola"}]},
        {"role": "user", "parts": [{"text": "Bye"}]},
    ]
    assert "generationConfig" not in out and "tools" not in out and "toolConfig" not in out


def test_without_a_system_message_there_is_no_system_instruction() -> None:
    out = openai_to_gemini_request({"messages": [{"role": "user", "content": "Hi"}]}, {})
    assert out == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}


def test_consecutive_messages_of_one_role_share_one_content() -> None:
    body = {"messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"},
                         {"role": "assistant", "content": "three"}, {"role": "assistant", "content": "four"}]}
    out = openai_to_gemini_request(body, {})
    assert out["contents"] == [{"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
                               {"role": "model", "parts": [{"text": "three"}, {"text": "four"}]}]


def test_images_become_inline_data_and_urls_file_data() -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png?size=2"}},
        {"type": "image_url", "image_url": {"url": "https://generativelanguage.googleapis.com/v1beta/files/abc"}},
    ]}]}
    parts = openai_to_gemini_request(body, {})["contents"][0]["parts"]
    assert parts == [{"text": "Compare"}, {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                     {"fileData": {"fileUri": "https://example.com/cat.png?size=2", "mimeType": "image/png"}},
                     {"fileData": {"fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc"}}]


def test_tool_calls_carry_their_signature_and_consecutive_tool_results_merge() -> None:
    signatures = {"call_1": "sig-one"}
    body = {"messages": [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            call("call_1", "get_weather", '{"city": "Paris"}'), call("call_2", "get_time", "")]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "assistant", "content": "21C at noon."},
    ]}
    out = openai_to_gemini_request(body, signatures)
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Weather and time in Paris?"}]},
        {"role": "model", "parts": [
            {"text": "Checking."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "sig-one"},
            # An id apibox never handed out (history from elsewhere): Google's documented placeholder.
            {"functionCall": {"name": "get_time", "args": {}}, "thoughtSignature": SKIP_SIGNATURE},
        ]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"output": {"temp": 21}}}},
            {"functionResponse": {"name": "get_time", "response": {"output": "noon"}}},
        ]},
        {"role": "model", "parts": [{"text": "21C at noon."}]},
    ]
    assert signatures == {"call_1": "sig-one"}  # reading history does not change the map


def test_a_tool_result_names_the_function_of_its_call_not_its_own_name_field() -> None:
    body = {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [call("c9", "get_weather", "{}")]},
        {"role": "tool", "tool_call_id": "c9", "name": "wrong_name", "content": "sunny"},
        {"role": "tool", "tool_call_id": "unknown", "name": "fallback_name", "content": "[1, 2]"},
    ]}
    parts = openai_to_gemini_request(body, {})["contents"][1]["parts"]
    assert parts == [{"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}},
                     {"functionResponse": {"name": "fallback_name", "response": {"output": [1, 2]}}}]


@pytest.mark.parametrize("arguments", ['{"city": "Par', "not json", "{'city': 'Paris'}", "[1, 2]", '"Paris"'])
def test_invalid_tool_arguments_are_an_invalid_request(arguments: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "tool_calls": [call("c1", "get_weather", arguments)]}]}
    with pytest.raises(InvalidRequest) as caught:
        openai_to_gemini_request(body, {})
    assert caught.value.status == 400
    assert caught.value.param == "messages"
    assert "arguments" in caught.value.message


def test_generation_config_from_the_sampling_fields() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "max_completion_tokens": 70,
            "temperature": 0, "top_p": 0.9, "n": 1, "seed": 7, "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "stop": "END"}
    assert openai_to_gemini_request(body, {})["generationConfig"] == {
        "maxOutputTokens": 70, "temperature": 0, "topP": 0.9, "candidateCount": 1, "seed": 7,
        "presencePenalty": 0.5, "frequencyPenalty": -0.5, "stopSequences": ["END"]}
    listed = openai_to_gemini_request({"messages": [], "max_tokens": 5, "stop": ["a", "b"]}, {})
    assert listed["generationConfig"] == {"maxOutputTokens": 5, "stopSequences": ["a", "b"]}


def test_n_asks_for_as_many_candidates() -> None:
    body = openai_to_gemini_request({"messages": [{"role": "user", "content": "hi"}], "n": 3}, {})
    assert body["generationConfig"] == {"candidateCount": 3}


@pytest.mark.parametrize(("response_format", "expected"), [
    ({"type": "json_object"}, {"responseMimeType": "application/json"}),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}}},
     {"responseMimeType": "application/json", "responseJsonSchema": {"type": "object"}}),
    ({"type": "text"}, None),
])
def test_json_response_formats(response_format: dict[str, Any], expected: dict[str, Any] | None) -> None:
    out = openai_to_gemini_request({"messages": [], "response_format": response_format}, {})
    assert out.get("generationConfig") == expected


def test_tools_become_function_declarations_with_a_json_schema() -> None:
    out = openai_to_gemini_request({"messages": [], "tools": [WEATHER, TIME]}, {})
    assert out["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather in a city",
         "parametersJsonSchema": WEATHER["function"]["parameters"]},
        {"name": "get_time", "parametersJsonSchema": {"type": "object", "properties": {}}},
    ]}]
    assert "toolConfig" not in out  # no tool_choice: Gemini's default (AUTO)


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}),
    ("none", {"mode": "NONE"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
])
def test_tool_choice_modes(choice: Any, config: dict[str, Any]) -> None:
    out = openai_to_gemini_request({"messages": [], "tools": [WEATHER, TIME], "tool_choice": choice}, {})
    assert out["toolConfig"] == {"functionCallingConfig": config}


def test_tool_choice_without_tools_is_dropped() -> None:
    out = openai_to_gemini_request({"messages": [], "tool_choice": "required"}, {})
    assert "toolConfig" not in out and "tools" not in out


# -- replies ----------------------------------------------------------------------------------


def gemini_reply(parts: list[dict[str, Any]], finish: str | None = "STOP",
                 usage: dict[str, Any] | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    reply: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-upstream-1"}
    if usage is not None:
        reply["usageMetadata"] = usage
    return reply


USAGE = {"promptTokenCount": 1234, "cachedContentTokenCount": 1000, "candidatesTokenCount": 4,
         "thoughtsTokenCount": 321, "totalTokenCount": 1559}


def test_a_text_reply_drops_thought_summaries_and_reports_usage() -> None:
    translate = GeminiToOpenAI("gemini-fake", {})
    reply = translate.reply(gemini_reply([{"text": "Let me think...", "thought": True},
                                          {"text": "Hola"}, {"text": " mundo"}], usage=USAGE))
    assert reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-")
    assert reply["model"] == "gemini-fake"
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hola mundo", "refusal": None},
                                 "logprobs": None, "finish_reason": "stop"}]
    assert reply["usage"] == {"prompt_tokens": 1234, "completion_tokens": 325, "total_tokens": 1559,
                              "prompt_tokens_details": {"cached_tokens": 1000},
                              "completion_tokens_details": {"reasoning_tokens": 321}}


def test_a_function_call_reply_keeps_its_signature_under_the_tool_call_id() -> None:
    signatures: dict[str, str] = {}
    translate = GeminiToOpenAI("gemini-fake", signatures)
    reply = translate.reply(gemini_reply([
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "sig-a"},
        {"functionCall": {"id": "fc-given", "name": "get_time", "args": {}}},
    ]))
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"  # STOP with function calls
    message = choice["message"]
    assert message["content"] is None
    first, second = message["tool_calls"]
    assert first["id"].startswith("call_") and len(first["id"]) > len("call_")
    assert first == {"id": first["id"], "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    assert second["id"] == "fc-given"  # Gemini's own id when it sends one
    assert json.loads(second["function"]["arguments"]) == {}
    assert signatures == {first["id"]: "sig-a"}  # no signature, nothing remembered
    assert "usage" not in reply  # no usageMetadata: none, never invented numbers (the gateway estimates)


def test_synthesized_tool_call_ids_are_unique() -> None:
    parts = [{"functionCall": {"name": "f", "args": {}}, "thoughtSignature": f"s{i}"} for i in range(20)]
    signatures: dict[str, str] = {}
    calls = GeminiToOpenAI("m", signatures).reply(gemini_reply(parts))["choices"][0]["message"]["tool_calls"]
    assert len({c["id"] for c in calls}) == 20
    assert sorted(signatures.values()) == sorted(f"s{i}" for i in range(20))


def test_a_blocked_prompt_is_an_empty_content_filtered_reply() -> None:
    reply = GeminiToOpenAI("gemini-fake", {}).reply(
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}})
    choice = reply["choices"][0]
    assert choice["message"]["content"] == ""
    assert choice["finish_reason"] == "content_filter"
    assert (reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]) == (9, 0)


def test_a_reply_without_finish_reason_ends_in_stop() -> None:
    reply = GeminiToOpenAI("m", {}).reply(gemini_reply([{"text": "x"}], finish=None))
    assert reply["choices"][0]["finish_reason"] == "stop"


# -- streamed chunks --------------------------------------------------------------------------


def stream_chunk(parts: list[dict[str, Any]], finish: str | None = None,
                 usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return gemini_reply(parts, finish, usage)


def test_chunks_role_first_then_text_then_finish_and_usage_last_wins() -> None:
    translate = GeminiToOpenAI("gemini-fake", {})
    assert translate.usage_chunk() is None
    first = translate.chunks(stream_chunk([{"text": "Hola"}], usage={"promptTokenCount": 1234}))
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "Hola"}]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gemini-fake" for c in first)
    assert all(c["choices"][0]["finish_reason"] is None for c in first)
    assert not translate.finished
    assert translate.usage_chunk() is None  # early chunks count the prompt alone: no report yet

    thinking = translate.chunks(stream_chunk([{"text": "hmm", "thought": True}]))
    assert thinking == []  # a thought summary alone says nothing to the client

    last = translate.chunks(stream_chunk([{"text": " mundo"}], "STOP", USAGE))
    assert [c["choices"][0]["delta"] for c in last] == [{"content": " mundo"}, {}]
    assert last[-1]["choices"][0]["finish_reason"] == "stop"
    assert translate.finished
    usage = translate.usage_chunk()
    assert usage is not None
    assert usage["choices"] == []
    assert usage["id"] == last[0]["id"] == first[0]["id"]
    assert usage["usage"]["prompt_tokens"] == 1234
    assert usage["usage"]["completion_tokens"] == 325  # cumulative: the last metadata, never a sum
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 1000}
    assert usage["usage"]["completion_tokens_details"] == {"reasoning_tokens": 321}


def test_streamed_function_calls_are_whole_deltas_with_increasing_indexes() -> None:
    signatures: dict[str, str] = {}
    translate = GeminiToOpenAI("m", signatures)
    a = translate.chunks(stream_chunk([{"functionCall": {"name": "f", "args": {"x": 1}}, "thoughtSignature": "s1"}]))
    b = translate.chunks(stream_chunk([{"functionCall": {"name": "g", "args": {}}}], "STOP"))
    assert a[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    (call_a,) = a[1]["choices"][0]["delta"]["tool_calls"]
    (call_b,) = b[0]["choices"][0]["delta"]["tool_calls"]
    assert (call_a["index"], call_a["function"]) == (0, {"name": "f", "arguments": json.dumps({"x": 1})})
    assert (call_b["index"], call_b["function"]["name"]) == (1, "g")
    assert call_a["type"] == call_b["type"] == "function"
    # The finish comes in a later chunk than the first call: still tool_calls.
    assert b[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert signatures == {call_a["id"]: "s1"}


@pytest.mark.parametrize(("reason", "expected"), [("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
                                                  ("OTHER", "stop")])
def test_streamed_finish_reasons(reason: str, expected: str) -> None:
    translate = GeminiToOpenAI("m", {})
    out = translate.chunks(stream_chunk([{"text": "x"}], reason))
    assert out[-1]["choices"][0]["finish_reason"] == expected


def test_a_blocked_prompt_streams_a_content_filter_finish() -> None:
    translate = GeminiToOpenAI("m", {})
    out = translate.chunks({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
    assert [c["choices"][0]["finish_reason"] for c in out] == [None, "content_filter"]
    assert translate.finished


def candidate(index: int, parts: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
    """A candidate as Gemini writes it: no ``index`` when it is 0."""
    out: dict[str, Any] = {"content": {"role": "model", "parts": parts}, **({"index": index} if index else {})}
    if finish:
        out["finishReason"] = finish
    return out


def test_every_candidate_of_a_reply_is_a_choice_by_its_index() -> None:
    reply = GeminiToOpenAI("m", {}).reply({"candidates": [
        candidate(1, [{"functionCall": {"name": "f", "args": {}}}], "STOP"),
        candidate(0, [{"text": "zero"}], "STOP"),
        candidate(2, [{"text": "two"}], "MAX_TOKENS"),
    ], "usageMetadata": USAGE})
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["message"]["content"] for c in choices] == ["zero", None, "two"]
    assert [c["finish_reason"] for c in choices] == ["stop", "tool_calls", "length"]
    assert [len(c["message"].get("tool_calls", ())) for c in choices] == [0, 1, 0]
    assert reply["usage"]["completion_tokens"] == 325  # one usage for all candidates
    unnumbered = [{"content": {"parts": [{"text": text}]}, "finishReason": "STOP"} for text in ("x", "y")]
    choices = GeminiToOpenAI("m", {}).reply({"candidates": unnumbered})["choices"]
    assert [(c["index"], c["message"]["content"]) for c in choices] == [(0, "x"), (1, "y")]  # by their order


def test_streamed_candidates_are_interleaved_choices_each_with_its_role_calls_and_finish() -> None:
    translate = GeminiToOpenAI("m", {})
    call = {"functionCall": {"name": "f", "args": {}}}
    out = translate.chunks({"candidates": [candidate(0, [{"text": "a"}]), candidate(1, [call])]})
    out += translate.chunks({"candidates": [candidate(1, [call], "STOP")]})
    assert not translate.finished  # choice 0 has not finished
    out += translate.chunks({"candidates": [candidate(0, [{"text": "b"}], "STOP")]})
    assert translate.finished
    by_choice: dict[int, list[dict[str, Any]]] = {}
    for chunk in out:
        (choice,) = chunk["choices"]
        by_choice.setdefault(choice["index"], []).append(choice)
    assert [c["delta"] for c in by_choice[0]] == [{"role": "assistant", "content": ""}, {"content": "a"},
                                                 {"content": "b"}, {}]
    assert by_choice[0][-1]["finish_reason"] == "stop"
    assert by_choice[1][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["delta"]["tool_calls"][0]["index"] for c in by_choice[1][1:3]] == [0, 1]  # a choice's own count
    assert by_choice[1][-1]["finish_reason"] == "tool_calls"


# -- usage ------------------------------------------------------------------------------------


def test_usage_from_gemini_maps_every_field() -> None:
    raw = {"promptTokenCount": 100, "cachedContentTokenCount": 60, "candidatesTokenCount": 7,
           "thoughtsTokenCount": 30, "toolUsePromptTokenCount": 5, "totalTokenCount": 142}
    assert usage_from_gemini(raw) == Usage(prompt_tokens=105, completion_tokens=37, cached_tokens=60,
                                           reasoning_tokens=30)


@pytest.mark.parametrize("raw", [None, [], "x", 3])
def test_usage_from_gemini_without_metadata_is_none(raw: Any) -> None:
    assert usage_from_gemini(raw) is None


def test_usage_from_gemini_ignores_junk_values() -> None:
    raw = {"promptTokenCount": True, "candidatesTokenCount": -3, "thoughtsTokenCount": "9",
           "cachedContentTokenCount": 2.5}
    assert usage_from_gemini(raw) is None  # no prompt count, and an answer's below 0: no report
    raw = {"promptTokenCount": 12, "candidatesTokenCount": 3, "thoughtsTokenCount": "9", "cachedContentTokenCount": 2.5}
    assert usage_from_gemini(raw) == Usage(12, 3, cached_tokens=3)  # a float is a number: rounded up, never dropped
    assert usage_from_gemini({"promptTokenCount": 12, "totalTokenCount": 12}) == Usage(prompt_tokens=12)


def test_gemini_usage_prices_cached_at_the_cached_rate_and_thoughts_as_output() -> None:
    price = Price(input=300_000, output=2_500_000, cached_input=75_000)  # gemini-fake, micro-USD per 1M
    usage = usage_from_gemini(USAGE)
    assert usage is not None
    # 234 uncached x 0.3 + 1000 cached x 0.075 + (4 + 321) output x 2.5 USD per 1M, rounded up once.
    scaled = 234 * 300_000 + 1000 * 75_000 + 325 * 2_500_000
    assert scaled == 957_700_000
    assert cost_micro(price, usage) == 958


# -- finish reasons ---------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "has_calls", "expected"), [
    ("STOP", False, "stop"),
    ("STOP", True, "tool_calls"),
    ("MAX_TOKENS", False, "length"),
    ("MAX_TOKENS", True, "length"),
    *[(r, False, "content_filter") for r in ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                                             "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION")],
    ("SAFETY", True, "content_filter"),
    *[(r, False, "stop") for r in ("MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS",
                                   "LANGUAGE", "OTHER", "NO_IMAGE", "IMAGE_OTHER", "FINISH_REASON_UNSPECIFIED")],
    (None, False, None),
    (None, True, None),
])
def test_finish_reason_table(reason: str | None, has_calls: bool, expected: str | None) -> None:
    assert finish_reason(reason, has_calls) == expected


# -- the provider's signature map ---------------------------------------------------------------


def test_the_signature_map_forgets_the_oldest_beyond_its_bound() -> None:
    bound = gemini_provider.SIGNATURES_KEPT
    assert 1_000 <= bound <= 1_000_000  # enough for busy tool loops, small enough to stay in memory
    kept = gemini_provider._Signatures()
    for i in range(bound + 10):
        kept[f"call_{i}"] = f"sig_{i}"
    assert len(kept) == bound
    assert "call_0" not in kept and "call_9" not in kept
    assert kept["call_10"] == "sig_10"
    assert kept[f"call_{bound + 9}"] == f"sig_{bound + 9}"


def test_the_signature_map_is_what_translation_fills_and_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemini_provider, "SIGNATURES_KEPT", 2)
    kept = gemini_provider._Signatures()
    translate = GeminiToOpenAI("m", kept)
    ids = []
    for i in range(3):
        part = {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": f"s{i}"}
        reply = translate.reply(gemini_reply([part]))
        ids.append(reply["choices"][0]["message"]["tool_calls"][0]["id"])
    assert list(kept) == ids[1:]
    history = {"messages": [{"role": "assistant", "tool_calls": [call(i, "f", "{}") for i in ids]}]}
    parts = openai_to_gemini_request(history, kept)["contents"][0]["parts"]
    # The forgotten call falls back to the placeholder; the others get their own signatures back.
    assert [p["thoughtSignature"] for p in parts] == [SKIP_SIGNATURE, "s1", "s2"]
