"""Hypothesis against the HTTP surface: random and malformed bodies, headers and keys on every
billed endpoint and on /admin. Never a 5xx, always an error body of the surface's shape with a
request id, and a refused request changes nothing in the database.

One live gateway serves the whole module (a server per example would be far too slow); the
books are audited (`apibox db check`) when it stops.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from apibox import accounts
from apibox.store import open_store
from tests.conftest import Live, assert_books_balance, databases_for
from tests.fake_anthropic import ANTHROPIC_KEY
from tests.fake_gemini import GEMINI_KEY
from tests.fake_upstream import UPSTREAM_KEY, FakeUpstream
from tests.gateway_helpers import books, query
from tests.live_variants import ADMIN_KEY, Variant, server

FUZZ = settings(max_examples=150, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass(frozen=True)
class Target:
    live: Live
    key: str  # a funded user's valid key
    revoked: str  # a revoked key of the same user
    user_id: int


@pytest.fixture(scope="module")
def target(engine: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Target]:
    tmp = Path(tmp_path_factory.mktemp("fuzz"))
    databases = databases_for(engine, tmp, request)
    gateway = Variant(tmp, databases.new("apibox"), FakeUpstream(),
                      server(admin_key=ADMIN_KEY, failed_auth_per_minute=10**9))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FAKE_UPSTREAM_KEY", UPSTREAM_KEY)
        env.setenv("FAKE_ANTHROPIC_KEY", ANTHROPIC_KEY)
        env.setenv("FAKE_GEMINI_KEY", GEMINI_KEY)
        live = gateway.start()
        try:
            key, revoked, user_id = asyncio.run(_accounts(live))
            yield Target(live, key, revoked, user_id)
        finally:
            gateway.stop()
        assert_books_balance(live.config_path)
    databases.close()


async def _accounts(live: Live) -> tuple[str, str, int]:
    db = await open_store(live.settings.database.url)
    try:
        user = await accounts.create_user(db, "fuzz@example.com")
        await accounts.topup(db, user.email, "1000")
        known = live.settings.model_index()
        key = await accounts.create_key(db, user.email, accounts.KeyOptions(), known_models=known)
        revoked = await accounts.create_key(db, user.email, accounts.KeyOptions(), known_models=known)
        await accounts.revoke_key(db, str(revoked.key.id))
        await accounts.create_user(db, "other@example.com")
        return key.secret, revoked.secret, user.id
    finally:
        await db.close()


def send(live: Live, method: str, path: str, body: bytes | None, headers: dict[str, str],
         ) -> tuple[int, dict[str, str], bytes]:
    where = urlsplit(live.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def snapshot(live: Live) -> tuple[Any, ...]:
    return (books(live), query(live, "SELECT count(*), max(id) FROM users")[0][:],
            [tuple(r) for r in query(live, "SELECT id, revoked_at, name, rpm FROM api_keys ORDER BY id")],
            query(live, "SELECT count(*) FROM admin_log")[0][0])


def check_shape(path: str, status: int, headers: dict[str, str], raw: bytes) -> None:
    """No 5xx; a request id always; errors in OpenAI's shape (Anthropic's on /v1/messages)."""
    assert status < 500, (path, status, raw[:2000])
    assert headers.get("x-request-id", "").startswith("req_"), headers
    if status < 400:
        if headers.get("content-type", "").startswith("text/event-stream"):
            assert raw.rstrip().endswith((b"[DONE]", b"}")), raw[-200:]
        else:
            json.loads(raw)
        return
    body = json.loads(raw)
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["message"]
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert isinstance(body["error"]["type"], str)


# -- strategies ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats() | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
junk_int = st.integers(min_value=-3, max_value=2**66) | scalars
models = st.sampled_from(["gpt-fake", "demo", "embed-fake", "gpt-fallback", "nope", ""]) | scalars
content = st.text(max_size=40) | st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "image", "tool_use", "tool_result", "input_audio", "x"])},
    optional={"text": st.text(max_size=20) | scalars, "image_url": values, "source": values}), max_size=2) | values
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "developer"])
                                 | scalars}, optional={"content": content, "name": scalars, "tool_calls": values,
                                                       "tool_call_id": scalars})
messages = st.lists(message, max_size=3) | values
common = {"max_tokens": junk_int, "max_completion_tokens": junk_int, "n": junk_int, "stream": st.booleans() | scalars,
          "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | scalars}) | values,
          "temperature": scalars, "tools": values, "tool_choice": values, "user": scalars, "stop": values}
chat_body = st.fixed_dictionaries({"model": models}, optional={"messages": messages, **common})
completion_body = st.fixed_dictionaries({"model": models}, optional={
    "prompt": st.text(max_size=30) | st.lists(st.integers(min_value=-5, max_value=10**6), max_size=4)
    | st.lists(st.text(max_size=5) | st.integers(min_value=0, max_value=9), max_size=4) | values,
    "best_of": junk_int, **common})
embedding_body = st.fixed_dictionaries({"model": models}, optional={
    "input": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | values,
    "encoding_format": scalars, "dimensions": junk_int, "stream": scalars})
anthropic_body = st.fixed_dictionaries({"model": models, "messages": messages}, optional={
    "max_tokens": junk_int, "system": st.text(max_size=20) | values, "stream": st.booleans() | scalars,
    "tools": values, "tool_choice": values, "thinking": values, "stop_sequences": values, "metadata": values})
input_item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "web_search_call"])
    | scalars, "role": st.sampled_from(["user", "assistant", "system", "developer"]) | scalars, "content": content,
    "call_id": scalars, "name": scalars, "arguments": scalars, "output": values})
responses_body = st.fixed_dictionaries({"model": models}, optional={
    "input": st.text(max_size=30) | st.lists(input_item, max_size=3) | values, "instructions": scalars,
    "max_output_tokens": junk_int, "stream": st.booleans() | scalars, "tools": values, "tool_choice": values,
    "text": values, "reasoning": values, "previous_response_id": scalars, "temperature": scalars})
BODIES = {"/v1/chat/completions": chat_body, "/v1/completions": completion_body, "/v1/embeddings": embedding_body,
          "/v1/messages": anthropic_body, "/v1/messages/count_tokens": anthropic_body, "/v1/responses": responses_body}

VALID = {"/v1/chat/completions": {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 5},
         "/v1/completions": {"model": "gpt-fake", "prompt": "hi", "max_tokens": 5},
         "/v1/embeddings": {"model": "embed-fake", "input": "hi"},
         "/v1/messages": {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
         "/v1/messages/count_tokens": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
         "/v1/responses": {"model": "demo", "input": "hi", "max_output_tokens": 5}}


def near_valid(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with a field or two replaced, added or removed: most get past the first checks."""
    base = VALID[path]
    fields = st.sampled_from(sorted({*base, *common, "messages", "prompt", "input", "system", "tools",
                                     "instructions", "max_output_tokens"}))
    changes = st.dictionaries(fields, st.one_of(BODIES[path].map(lambda b: next(iter(b.values()))), junk_int,
                                                values, messages, content), max_size=2)
    return st.tuples(changes, st.lists(st.sampled_from(sorted(base)), max_size=1)).map(
        lambda change: {k: v for k, v in {**base, **change[0]}.items() if k not in change[1]})


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity included, as Python writes them


raw_bodies = (st.binary(max_size=80) | st.sampled_from([b"", b"{", b"[]", b"null", b"1e999", b'"x"', b"\xff\xfe{}",
                                                        b'{"model": "gpt-fake", "messages": [', b"{}" * 3]))
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                      max_size=60)
key_like = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=14,
                   max_size=200).map(lambda tail: "sk-ab-" + tail)


def keys(target: Target) -> st.SearchStrategy[str | None]:
    return (st.sampled_from([target.key, target.revoked, None]) | key_like | header_text
            | header_text.map(lambda tail: "sk-ab-" + tail + "x" * 14))


# -- the billed endpoints -------------------------------------------------------------------------


def exchange(target: Target, path: str, body: bytes, key: str | None, extra: dict[str, str] | None = None,
             method: str = "POST") -> int:
    headers = {"Content-Type": "application/json", **(extra or {})}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    before = snapshot(target.live)
    status, response_headers, raw = send(target.live, method, path, body, headers)
    check_shape(path, status, response_headers, raw)
    if currently_in_test_context():
        event(f"HTTP {status}")  # --hypothesis-show-statistics shows how far the examples got
    if status >= 400:
        assert snapshot(target.live) == before, (path, status, raw[:500])
        assert query(target.live, "SELECT count(*) FROM holds")[0][0] == 0
    return status


@FUZZ
@given(data=st.data(), path=st.sampled_from(sorted(BODIES)))
def test_shaped_but_wrong_bodies_with_a_valid_key(target: Target, data: st.DataObject, path: str) -> None:
    body = data.draw(BODIES[path] | near_valid(path))
    exchange(target, path, encoded(body), target.key)


@FUZZ
@given(path=st.sampled_from(sorted(BODIES)), body=values | raw_bodies, data=st.data())
def test_random_and_malformed_bodies_and_keys(target: Target, path: str, body: Any, data: st.DataObject) -> None:
    key = data.draw(keys(target))
    exchange(target, path, body if isinstance(body, bytes) else encoded(body), key)


@FUZZ
@given(path=st.sampled_from(sorted(BODIES)), data=st.data(),
       headers=st.dictionaries(st.sampled_from(["Content-Type", "X-Forwarded-For", "x-api-key", "Accept",
                                                "Accept-Encoding", "anthropic-version", "anthropic-beta",
                                                "OpenAI-Organization", "User-Agent", "X-Request-Id",
                                                "Content-Encoding"]), header_text, max_size=4))
def test_random_header_values(target: Target, path: str, data: st.DataObject, headers: dict[str, str]) -> None:
    key = data.draw(keys(target))
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    scheme = data.draw(st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  "]))
    extra = dict(headers)
    if key is not None:
        extra["Authorization"] = scheme + key
    exchange(target, path, encoded(body), None, extra)


# (br and zstd, whose decoders are not installed, aiohttp itself answers with a plain-text 400
# before the request reaches apibox)
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "x-unknown"])
def test_a_body_its_content_encoding_cannot_decode_is_a_400_in_the_doors_shape(target: Target,
                                                                               encoding: str) -> None:
    for path in BODIES:
        status = exchange(target, path, b"xx not compressed", target.key, {"Content-Encoding": encoding})
        assert status == 400, (path, encoding)
    assert exchange(target, "/admin/users", b"xx", ADMIN_KEY, {"Content-Encoding": encoding}) == 400


def test_an_unusable_key_is_refused_on_every_endpoint(target: Target) -> None:
    """Deterministic corner: the revoked key and a key of the right shape but unknown."""
    for path in BODIES:
        for key in (target.revoked, "sk-ab-" + "A" * 43):
            assert exchange(target, path, b'{"model": "demo"}', key) == 401


# -- the admin API ------------------------------------------------------------------------------

ADMIN_ROUTES = ["/admin/users", "/admin/users/{}", "/admin/users/{}/state", "/admin/users/{}/balance",
                "/admin/users/{}/ledger", "/admin/keys", "/admin/keys/{}", "/admin/keys/{}/revoke",
                "/admin/topups", "/admin/adjustments", "/admin/usage", "/admin/log", "/admin/{}"]
ADMIN_FIELDS = st.sampled_from(["email", "name", "group", "state", "reason", "user", "amount", "note", "reference",
                                "models", "budget", "expires", "rpm", "tpm", "concurrency", "allow_ips"])
admin_bodies = st.dictionaries(ADMIN_FIELDS, values | st.sampled_from(
    ["1", "2", "fuzz@example.com", "-5", "abc", "1e999", "NaN", "0.0000001", "30d", "gpt-fake", "suspended",
     "1 OR 1=1", "'; DROP TABLE users; --", "²", "99999999999999999999999"]), max_size=5)
path_parts = st.sampled_from(["1", "2", "999", "fuzz@example.com", "0", "-1", "²", "99999999999999999999999",
                              "1 OR 1=1", "'; DROP TABLE api_keys; --", "%", ".."]) | st.text(max_size=12)
queries = st.dictionaries(st.sampled_from(["user", "key", "model", "since", "until", "by", "limit"]),
                          st.sampled_from(["1", "fuzz@example.com", "7d", "day,model", "key", "colour", "-1",
                                           "99999999999999999999999", "²", "2026-13-45"]) | st.text(max_size=10),
                          max_size=3)


@FUZZ
@given(route=st.sampled_from(ADMIN_ROUTES), part=path_parts, method=st.sampled_from(["GET", "POST", "PATCH", "DELETE"]),
       body=admin_bodies | values | raw_bodies, params=queries,
       key=st.sampled_from([ADMIN_KEY, ADMIN_KEY, ADMIN_KEY, None, ADMIN_KEY + " ", "x"]) | header_text)
def test_admin_api_random_requests(target: Target, route: str, part: str, method: str, body: Any,
                                   params: dict[str, str], key: str | None) -> None:
    path = route.format(quote(part, safe=""))
    if params:
        path += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    raw = body if isinstance(body, bytes) else encoded(body)
    status = exchange(target, path, raw, key, method=method)
    if (key or "").strip() != ADMIN_KEY:
        assert status in (401, 404, 405), status
