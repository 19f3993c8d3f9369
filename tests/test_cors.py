"""CORS: a web page may call the API from a browser (as it may call OpenAI's), with the answers'
headers its script needs; the admin API, probes and metrics stay out of pages' reach; and
``server.cors_origins`` narrows the pages allowed, or allows none."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from apibox.gateway.cors import EXPOSED_HEADERS
from apibox.store import Store
from tests.conftest import Live, serving
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import account, sse_events
from tests.live_variants import ADMIN_KEY, CHAT, Variant, request, server, store_of

PAGE = "https://chat.example.com"
ASKED_HEADERS = "authorization, content-type, x-stainless-os, x-stainless-retry-count"


def preflight_headers(origin: str = PAGE) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": ASKED_HEADERS}


async def test_a_preflight_from_any_page_is_answered_with_what_the_sdk_asked_for(live: Live) -> None:
    status, headers, body = await request(live, "OPTIONS", "/v1/chat/completions", headers=preflight_headers())
    assert (status, body) == (204, b"")
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Access-Control-Allow-Headers"] == ASKED_HEADERS
    assert "POST" in headers["Access-Control-Allow-Methods"].split(", ")
    assert int(headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_answers_to_a_page_say_it_may_read_them_and_their_headers(live: Live, live_store: Store,
                                                                       stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, body = await request(live, "POST", "/v1/chat/completions", key=who.key,
                                          json_body={**CHAT, "stream": stream}, headers={"Origin": PAGE})
    assert status == 200
    assert not stream or sse_events(body)[-1] == "[DONE]"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "x-request-id" in headers["Access-Control-Expose-Headers"].split(", ")
    assert headers["Access-Control-Expose-Headers"] == EXPOSED_HEADERS


async def test_an_error_to_a_page_is_readable_by_it_too(live: Live) -> None:
    status, headers, _ = await request(live, "POST", "/v1/chat/completions", key="sk-wrong", json_body=CHAT,
                                       headers={"Origin": PAGE})
    assert status == 401
    assert headers["Access-Control-Allow-Origin"] == "*"  # else the page's SDK sees a network error, not the 401


async def test_a_client_that_is_no_page_gets_no_cors_headers(live: Live, live_store: Store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, _ = await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT)
    assert status == 200
    assert not [name for name in headers if name.lower().startswith("access-control-")]


@pytest.fixture
def narrowed(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A gateway that allows one page, with the admin API on."""
    with serving(Variant(tmp_path, database_url, fake, server(cors_origins=(PAGE,), admin_key=ADMIN_KEY))) as running:
        yield running


async def test_an_allowed_page_is_named_and_another_is_refused(narrowed: Live) -> None:
    async with store_of(narrowed) as store:
        who = await account(store, narrowed, "ann@example.com", "1")
    status, headers, _ = await request(narrowed, "OPTIONS", "/v1/chat/completions", headers=preflight_headers())
    assert status == 204
    assert (headers["Access-Control-Allow-Origin"], headers["Vary"]) == (PAGE, "Origin")
    status, headers, _ = await request(narrowed, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT,
                                       headers={"Origin": PAGE})
    assert (status, headers["Access-Control-Allow-Origin"]) == (200, PAGE)

    other = "https://elsewhere.example.org"
    status, headers, _ = await request(narrowed, "OPTIONS", "/v1/chat/completions",
                                       headers=preflight_headers(other))
    assert status == 405 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await request(narrowed, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT,
                                       headers={"Origin": other})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers  # the browser keeps it from the page


@pytest.mark.parametrize("path", ["/admin/users", "/metrics", "/healthz"])
async def test_the_admin_api_probes_and_metrics_are_no_pages_business(narrowed: Live, path: str) -> None:
    status, headers, _ = await request(narrowed, "OPTIONS", path, headers=preflight_headers())
    assert status != 204 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await request(narrowed, "GET", path, key=ADMIN_KEY, headers={"Origin": PAGE})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


@pytest.fixture
def closed(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A gateway that allows no page."""
    with serving(Variant(tmp_path, database_url, fake, server(cors_origins=()))) as running:
        yield running


async def test_no_page_at_all_when_the_list_is_empty(closed: Live) -> None:
    status, headers, _ = await request(closed, "OPTIONS", "/v1/chat/completions", headers=preflight_headers())
    assert status == 405 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await request(closed, "GET", "/v1/models", key="sk-wrong", headers={"Origin": PAGE})
    assert status == 401 and "Access-Control-Allow-Origin" not in headers
