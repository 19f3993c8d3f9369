"""Upstream answers of shapes they should not have: read without a crash, or failed cleanly.

Real upstreams keep to their formats, but proxies, compatible servers and bugs do not. Whatever
JSON object an upstream sends as a whole reply or as a stream's event, the translations read it
as far as it makes sense (a list where an object belongs counts as an empty object) and never
raise; and should anything still fail to read, the gateway treats it as the upstream's failure,
as a malformed event is: the client gets an error in its own format, never a 500, and the books
stay sound.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from apibox.formats.anthropic import anthropic_to_openai_reply, openai_to_anthropic_reply
from apibox.formats.anthropic_stream import AnthropicToOpenAIStream, OpenAIToAnthropicStream
from apibox.formats.gemini import GeminiToOpenAI
from apibox.formats.responses_chat import ChatToResponsesStream
from apibox.gateway.doors import AnthropicDoor, OpenAIDoor, ResponsesDoor
from apibox.pricing import Usage
from tests.conftest import Live
from tests.gateway_helpers import account, wait_for_usage

# The names the formats use, so that generated objects reach past the first lookup.
NAMES = ["type", "message", "content_block", "delta", "index", "text", "partial_json", "usage", "stop_reason",
         "choices", "content", "tool_calls", "function", "arguments", "name", "id", "finish_reason", "candidates",
         "parts", "functionCall", "args", "usageMetadata", "input_tokens", "output_tokens", "role", "output"]
WORDS = ["text", "tool_use", "message_start", "content_block_start", "content_block_delta", "message_delta",
         "message_stop", "text_delta", "input_json_delta", "end_turn", "stop", "length", "STOP"]
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(WORDS) | st.text(max_size=3)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(NAMES), inner, max_size=4), max_leaves=14)
OBJECTS = st.dictionaries(st.sampled_from(NAMES), JSON, max_size=5)
LENIENT = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@LENIENT
@given(OBJECTS)
def test_any_whole_reply_is_read_and_rendered_for_every_door(reply: dict[str, Any]) -> None:
    usage = Usage(1, 1)
    anthropic_to_openai_reply(reply, "m")
    GeminiToOpenAI("m", {}).reply(reply)
    openai_to_anthropic_reply(reply, "m", usage)
    for door in (OpenAIDoor(), AnthropicDoor({}, {}), ResponsesDoor({})):
        for native in (False, True):
            door.usage(reply, native)
            door.reply_text(reply, native)
            door.render_reply(reply, native, "m", usage, 5)


@LENIENT
@given(st.lists(OBJECTS, min_size=1, max_size=4))
@example([{"type": "message_delta", "usage": "ab"}])  # shapes hypothesis once took a while to find
@example([{"type": "message_start", "message": {"usage": [1]}}])
@example([{"type": "content_block_start", "content_block": "a"}])
@example([{"type": "content_block_start", "index": [1], "content_block": {"type": "tool_use"}},
          {"type": "content_block_delta", "index": {}, "delta": {"type": "input_json_delta", "partial_json": "{"}}])
def test_any_stream_of_events_is_translated_for_every_door(events: list[dict[str, Any]]) -> None:
    from_anthropic, to_anthropic = AnthropicToOpenAIStream("m"), OpenAIToAnthropicStream("m")
    from_gemini, to_responses = GeminiToOpenAI("m", {}), ChatToResponsesStream("m")
    for event in events:
        from_anthropic.feed(event)
        to_anthropic.feed(event)
        from_gemini.chunks(event)
        to_responses.feed(event)
    to_anthropic.finish(Usage(1, 1))
    to_responses.finish(Usage(1, 1))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_reply_of_the_wrong_shape_is_read_as_far_as_it_makes_sense(live: Live, live_store: Any,
                                                                          stream: bool) -> None:
    """Claude's reply or first event with its message a list: an answer without text, charged what
    the upstream reported, not a 500."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.replaced = {"content_block_delta": {"type": "content_block_delta", "index": 0, "delta": []}}
    async with anthropic.AsyncAnthropic(base_url=live.url, api_key=who.key, max_retries=0) as sdk:
        if stream:
            async with sdk.messages.stream(model="gpt-fake", max_tokens=50, messages=[
                    {"role": "user", "content": "Hi"}]) as events:
                message = await events.get_final_message()
        else:
            message = await sdk.messages.create(model="gpt-fake", max_tokens=50,
                                                messages=[{"role": "user", "content": "Hi"}])
    assert message.stop_reason == "end_turn"
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert row["status"] == "ok" and row["charged"] > 0


async def test_an_event_that_cannot_be_read_ends_the_stream_as_a_broken_one(live: Live, live_store: Any,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The pass-through reads a message_start whose message is a list: the net under the
    translations turns that into the upstream's failure, an Anthropic error event, not a 500.
    The log says where reading failed, without the exception's text or traceback, which may
    quote what the upstream sent."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.anthropic.replaced = {"message_start": {"type": "message_start", "message": ["x"]}}
    async with anthropic.AsyncAnthropic(base_url=live.url, api_key=who.key, max_retries=0) as sdk:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with sdk.messages.stream(model="claude-fake", max_tokens=50,
                                           messages=[{"role": "user", "content": "Hi"}]) as events:
                await events.get_final_message()
    assert "cannot read" in str(caught.value)
    [logged] = [record for record in caplog.records if record.getMessage().startswith("upstream claude sent")]
    assert logged.exc_info is None and "cannot read (TypeError in feed, " in logged.getMessage()
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert (row["status"], row["http_status"]) == ("cut", 502)
