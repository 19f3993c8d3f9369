"""The JSON access log (``server.access_log: json``) and request ids end to end.

Every request, answered or refused, is one JSON line on the ``apibox.access`` logger with its
metadata; no line (and no other log record) carries a key, a prompt, an answer or a query string.
The request id a client gets back is the one in its log line, in its usage row, and the one each
kind of upstream (OpenAI-compatible, Anthropic, Gemini) received as ``X-Request-Id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

from apibox import accounts
from apibox.cli.main import app as cli_app
from apibox.config import load_settings, parse_settings
from apibox.errors import ConfigError
from apibox.gateway.exchange import logged_path
from apibox.store import open_store
from tests.conftest import Live, serving, write_config
from tests.fake_anthropic import ANTHROPIC_KEY
from tests.fake_gemini import GEMINI_KEY
from tests.fake_upstream import UPSTREAM_KEY, WORDS, FakeUpstream
from tests.gateway_helpers import account, usage_rows
from tests.live_variants import ADMIN_KEY, Variant, request, server, store_of
from tests.serve_helpers import free_port, wait_until_serving

FIELDS = {"time", "request_id", "method", "path", "status", "duration_ms", "model", "provider", "user_id",
          "key_id", "error", "outcome", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_micro_usd",
          "charged_micro_usd"}
PROMPT = "my PRIVATE-PROMPT-7f3a about nothing"
ANSWER = "".join(WORDS)
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": PROMPT}]}


@pytest.fixture
def start(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Callable[..., Live]]:
    with ExitStack() as stack:
        yield lambda *changes: stack.enter_context(serving(Variant(tmp_path, database_url, fake, *changes)))


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # every logger: the secrets check reads all of them
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log so far, each line parsed as JSON (it must be exactly one object)."""
    out = []
    for record in caplog.records:
        if record.name == "apibox.access":
            message = record.getMessage()
            assert "\n" not in message
            line = json.loads(message)
            assert isinstance(line, dict) and set(line) == FIELDS, line
            out.append(line)
    return out


async def line_for(caplog: pytest.LogCaptureFixture, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The line of one request (a stream's is written just after its last byte, so wait a little)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in lines(caplog) if line["request_id"] == request_id]
        if found:
            assert len(found) == 1
            return found[0]
        assert time.monotonic() < deadline, f"no access-log line for {request_id}"
        await asyncio.sleep(0.02)


async def test_each_request_is_one_json_line_with_its_metadata_and_no_secret(start, access) -> None:
    live = start(server(access_log="json", admin_key=ADMIN_KEY))
    async with store_of(live) as db:
        ann = await account(db, live, "ann@example.com", "1")
        bob = await account(db, live, "bob@example.com", "0")
    began = datetime.now(UTC)

    status, headers, _ = await request(live, "POST", "/v1/chat/completions", key=ann.key, json_body=CHAT)
    assert status == 200
    row = usage_rows(live, ann.user_id)[0]
    line = await line_for(access, headers["x-request-id"])
    assert {k: v for k, v in line.items() if k not in ("time", "duration_ms")} == {
        "request_id": row["request_id"], "method": "POST", "path": "/v1/chat/completions", "status": 200,
        "model": "gpt-fake", "provider": "fake", "user_id": ann.user_id, "key_id": row["key_id"], "error": None,
        "outcome": "ok", "prompt_tokens": 21, "completion_tokens": len(WORDS), "cached_tokens": 0,
        "cost_micro_usd": row["cost"], "charged_micro_usd": row["charged"]}
    logged_at = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert line["time"].endswith("Z") and began - timedelta(seconds=1) <= logged_at <= datetime.now(UTC)
    assert isinstance(line["duration_ms"], int | float) and 0 <= line["duration_ms"] < 10_000

    status, headers, _ = await request(live, "POST", "/v1/chat/completions", key=ann.key,
                                       json_body={**CHAT, "stream": True})
    assert status == 200
    line = await line_for(access, headers["x-request-id"])
    assert (line["status"], line["outcome"], line["completion_tokens"]) == (200, "ok", len(WORDS))
    assert line["cost_micro_usd"] == usage_rows(live, ann.user_id)[1]["cost"]

    status, headers, _ = await request(live, "POST", "/v1/chat/completions", key=bob.key, json_body=CHAT)
    assert status == 402
    line = await line_for(access, headers["x-request-id"])
    assert (line["status"], line["error"], line["model"], line["user_id"]) == (402, "insufficient_quota",
                                                                               "gpt-fake", bob.user_id)
    assert line["key_id"] is not None and line["provider"] is None and line["cost_micro_usd"] is None

    wrong_key = "sk-ab-WRONG" + "k" * 40
    status, headers, _ = await request(live, "POST", "/v1/chat/completions", key=wrong_key, json_body=CHAT)
    assert status == 401
    line = await line_for(access, headers["x-request-id"])
    assert (line["status"], line["error"], line["user_id"], line["key_id"], line["model"]) == (
        401, "invalid_api_key", None, None, None)

    # A key or a secret in the URL (a client's mistake) is not written down: no query string, no key.
    status, headers, _ = await request(live, "GET", f"/v1/models/{ann.key}?key={ann.key}&token=QUERY-SECRET",
                                       key=ann.key)
    assert status == 404
    line = await line_for(access, headers["x-request-id"])
    assert line["path"] == "/v1/models/sk-ab-[redacted]" and line["user_id"] == ann.user_id

    status, headers, _ = await request(live, "GET", "/admin/users", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200
    assert (await line_for(access, headers["x-request-id"]))["status"] == 200

    status, headers, _ = await request(live, "GET", "/metrics")
    assert status == 200
    assert (await line_for(access, headers["x-request-id"]))["path"] == "/metrics"

    assert len(lines(access)) == 7
    everything = access.text + "".join(str(r.__dict__) for r in access.records)
    for secret in (ann.key, bob.key, wrong_key, ADMIN_KEY, UPSTREAM_KEY, ANTHROPIC_KEY, GEMINI_KEY, "QUERY-SECRET",
                   "PRIVATE-PROMPT-7f3a", ANSWER):
        assert secret not in everything, secret


async def test_no_access_log_unless_configured(live: Live, live_store, access) -> None:
    assert live.settings.server.access_log == "none"
    who = await account(live_store, live, "ann@example.com", "1")
    assert (await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT))[0] == 200
    assert (await request(live, "GET", "/metrics"))[0] == 200
    assert [r for r in access.records if r.name == "apibox.access"] == []


async def test_a_stream_the_client_leaves_is_logged_as_it_was_settled(start, access) -> None:
    live = start(server(access_log="json"))
    async with store_of(live) as db:
        who = await account(db, live, "ann@example.com", "1")
    live.fake.words = [" word"] * 900  # one token each: within what the hold pays for
    async with aiohttp.ClientSession() as session, session.post(
            f"{live.v1}/chat/completions", json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {who.key}"}) as response:
        request_id = response.headers["x-request-id"]
        await response.content.readany()
        response.close()
    line = await line_for(access, request_id)
    deadline = time.monotonic() + 5
    while not usage_rows(live, who.user_id):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    row = usage_rows(live, who.user_id)[0]
    assert (line["status"], line["outcome"]) == (row["http_status"], row["status"])
    assert line["cost_micro_usd"] == row["cost"] and line["request_id"] == row["request_id"]


@pytest.mark.parametrize(("model", "upstream"), [("gpt-fake", "fake"), ("claude-fake", "anthropic"),
                                                  ("gemini-fake", "gemini")])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_request_id_reaches_every_kind_of_upstream(live: Live, live_store, model: str, upstream: str,
                                                             stream: bool) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, headers, raw = await request(live, "POST", "/v1/chat/completions", key=who.key,
                                         json_body={**CHAT, "model": model, "stream": stream})
    assert status == 200, raw
    fake = {"fake": live.fake, "anthropic": live.anthropic, "gemini": live.gemini}[upstream]
    assert len(fake.requests) == 1
    sent = {name.lower(): value for name, value in fake.requests[0].headers.items()}
    request_id = headers["x-request-id"]
    assert request_id.startswith("req_") and sent["x-request-id"] == request_id
    deadline = time.monotonic() + 5
    while not usage_rows(live, who.user_id):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert usage_rows(live, who.user_id)[0]["request_id"] == request_id


async def test_the_request_id_reaches_an_anthropic_upstream_through_the_messages_door(live: Live,
                                                                                       live_store) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    body = {"model": "claude-fake", "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]}
    status, headers, raw = await request(live, "POST", "/v1/messages", key=who.key, json_body=body)
    assert status == 200, raw
    sent = {name.lower(): value for name, value in live.anthropic.requests[0].headers.items()}
    assert sent["x-request-id"] == headers["x-request-id"]


async def test_apibox_serve_writes_the_access_log_to_stdout_as_bare_json_lines(tmp_path: Path,
                                                                                database_url: str) -> None:
    config = write_config(tmp_path, database_url)
    config.write_text("server: {access_log: json}\n" + config.read_text())
    db = await open_store(load_settings(str(config)).database.url)
    await accounts.create_user(db, "ann@example.com")
    await accounts.topup(db, "ann@example.com", "1")
    secret = (await accounts.create_key(db, "ann@example.com", accounts.KeyOptions(),
                                        known_models=load_settings(str(config)).model_index())).secret
    await db.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    errors = tmp_path / "serve.err"
    with errors.open("wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "apibox", "serve", "--config", str(config), "--port",
                                    str(port)], stdout=subprocess.PIPE, stderr=err, cwd=tmp_path)
        try:
            wait_until_serving(url, process, errors)
            ids = []
            async with aiohttp.ClientSession() as session:
                body = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}]}
                async with session.post(f"{url}/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {secret}"}) as response:
                    assert response.status == 200
                    ids.append(response.headers["x-request-id"])
                async with session.get(f"{url}/metrics") as response:
                    assert response.status == 200
                    ids.append(response.headers["x-request-id"])
        finally:
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=30)
    logged = [json.loads(text) for text in out.decode().splitlines()]
    assert [line["request_id"] for line in logged] == ids
    assert all(set(line) == FIELDS for line in logged)
    assert (logged[0]["model"], logged[0]["provider"], logged[0]["status"]) == ("demo", "echo", 200)
    assert "apibox serving on" in errors.read_text()  # the other messages stay on stderr
    assert secret not in out.decode() + errors.read_text() and PROMPT not in out.decode()


# -- configuration ----------------------------------------------------------------------------


def test_access_log_config_is_json_or_none() -> None:
    assert parse_settings("").server.access_log == "none"
    assert parse_settings("server: {access_log: json}").server.access_log == "json"
    assert parse_settings("server: {access_log: none}").server.access_log == "none"
    with pytest.raises(ConfigError) as caught:
        parse_settings("server: {access_log: xml}", source="apibox.yaml")
    assert "apibox.yaml: server.access_log: must be one of json, none, got 'xml'" in caught.value.message


def test_config_check_shows_the_access_log(tmp_path: Path) -> None:
    path = tmp_path / "apibox.yaml"
    path.write_text("server: {access_log: json}\n")
    result = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["server"]["access_log"] == "json"
    result = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0 and "access log: json" in result.stdout


def test_logged_paths_lose_keys_and_length() -> None:
    assert logged_path("/v1/chat/completions") == "/v1/chat/completions"
    assert logged_path("/x/sk-ab-abc_DEF-123/y") == "/x/sk-ab-[redacted]/y"
    assert len(logged_path("/" + "a" * 5000)) == 200
