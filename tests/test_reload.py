"""Reloading a running gateway's config: through the admin API, by SIGHUP (one process, and every
worker of `serve --workers 2`), and through Redis from `apibox config reload` (see also
test_scale_out.py). New models and prices apply to the next request; a file that does not validate
changes nothing; server, database and redis changes wait for a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from typer.testing import CliRunner

from apibox.cli.main import app as cli_app
from apibox.config import Settings, load_settings
from tests.cli_helpers import assert_one_line_error
from tests.conftest import Live, ServerThread, assert_books_balance, fund, serving, write_config
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import query, wait_for_usage
from tests.live_variants import ADMIN_KEY, openai_error, request, store_of
from tests.serve_helpers import add_model, make_keys, serve_process, slow_upstream


class AdminInFile(ServerThread):
    """A live gateway whose config file itself turns the admin API on (a reload re-reads the file)."""

    def configure(self, settings: Settings) -> Settings:
        path = Path(settings.source)
        path.write_text(path.read_text() + f"server: {{admin_key: {ADMIN_KEY}}}\n")
        return load_settings(str(path))


@pytest.fixture
def admin(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    with serving(AdminInFile(tmp_path, database_url, fake)) as running:
        yield running


async def chat(live_url: str, key: str, model: str) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    async with aiohttp.ClientSession() as session, session.post(
            f"{live_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, await response.json()


async def test_admin_reload_serves_new_models_at_their_prices(admin: Live) -> None:
    async with store_of(admin) as db:
        key = await fund(db, admin.settings, "ann@example.com", "5")
    status, _ = await chat(admin.url, key, "gpt-new")
    assert status == 404
    add_model(admin.config_path)
    status, _, raw = await request(admin, "POST", "/admin/reload", key=ADMIN_KEY)
    assert status == 200, raw
    summary = json.loads(raw)
    assert summary["models"] == len(admin.settings.models) + 1 and summary["needs_restart"] == []
    status, reply = await chat(admin.url, key, "gpt-new")
    assert status == 200, reply
    (row,) = await wait_for_usage(admin, query(admin, "SELECT id FROM users")[0][0], 1)
    usage = reply["usage"]
    # the new model's own price: $100/M in, $200/M out
    assert row["cost"] == -(-(usage["prompt_tokens"] * 100 + usage["completion_tokens"] * 200) // 1)
    assert row["model"] == "gpt-new"
    (action,) = [r for r in query(admin, "SELECT action, target FROM admin_log") if r[0] == "config.reload"]
    assert action[1] == str(admin.config_path)


async def test_a_config_that_does_not_validate_changes_nothing(admin: Live) -> None:
    async with store_of(admin) as db:
        key = await fund(db, admin.settings, "ann@example.com", "5")
    good = admin.config_path.read_text()
    admin.config_path.write_text(good.replace("price: {input: 2.5, output: 10, cached_input: 1.25}",
                                              "price: {input: -1, output: 10}"))
    status, _, raw = await request(admin, "POST", "/admin/reload", key=ADMIN_KEY)
    assert status == 400
    assert "not reloaded" in openai_error(raw)["message"] and "price" in openai_error(raw)["message"]
    assert (await chat(admin.url, key, "gpt-fake"))[0] == 200  # still serving what it had
    assert not [r for r in query(admin, "SELECT action FROM admin_log") if r[0] == "config.reload"]
    admin.config_path.write_text(good)  # for the books check after the test


async def test_server_and_database_changes_wait_for_a_restart(admin: Live, tmp_path: Path) -> None:
    async with store_of(admin) as db:
        key = await fund(db, admin.settings, "ann@example.com", "5")
    text = admin.config_path.read_text()
    moved = text.replace(admin.settings.database.url, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    admin.config_path.write_text(moved.replace(f"server: {{admin_key: {ADMIN_KEY}}}",
                                               f"server: {{admin_key: {ADMIN_KEY}, max_body_mb: 5}}"))
    status, _, raw = await request(admin, "POST", "/admin/reload", key=ADMIN_KEY)
    assert status == 200, raw
    assert json.loads(raw)["needs_restart"] == ["server", "database"]
    assert (await chat(admin.url, key, "gpt-fake"))[0] == 200  # same database: the key is still known
    assert not (tmp_path / "elsewhere.db").exists()
    admin.config_path.write_text(text)  # for the books check after the test (of this database, not a new one)


async def test_a_changed_listen_port_is_reported_to_wait_for_a_restart(admin: Live) -> None:
    text = admin.config_path.read_text()
    status, _, raw = await request(admin, "POST", "/admin/reload", key=ADMIN_KEY)
    assert (status, json.loads(raw)["needs_restart"]) == (200, [])  # listening elsewhere than the file: no change
    admin.config_path.write_text(text.replace(f"server: {{admin_key: {ADMIN_KEY}}}",
                                              f"server: {{admin_key: {ADMIN_KEY}, port: 9999}}"))
    status, _, raw = await request(admin, "POST", "/admin/reload", key=ADMIN_KEY)
    assert (status, json.loads(raw)["needs_restart"]) == (200, ["server"])
    admin.config_path.write_text(text)


def test_config_reload_without_redis_says_to_send_sighup(tmp_path: Path, database_url: str) -> None:
    config = write_config(tmp_path, database_url)
    result = CliRunner().invoke(cli_app, ["config", "reload", "--config", str(config)])
    assert_one_line_error(result, "SIGHUP")
    config.write_text(config.read_text().replace("max_output_tokens: 1024", "max_output_tokens: lots"))
    result = CliRunner().invoke(cli_app, ["config", "reload", "--config", str(config)])
    assert_one_line_error(result, "max_output_tokens")  # validated before anything is told


def test_an_admin_reload_reloads_every_worker_without_redis(tmp_path: Path, database_url: str) -> None:
    """Without Redis to tell the others, the worker that answers POST /admin/reload asks the
    supervisor to pass SIGHUP to every worker: none keeps the old config."""
    with slow_upstream(FakeUpstream()) as upstream:
        config = write_config(tmp_path, database_url, upstream)
        config.write_text(config.read_text() + f"server: {{admin_key: {ADMIN_KEY}}}\n")
        (key,) = asyncio.run(make_keys(config, {"ann@example.com": "5"}))
        with serve_process(config, tmp_path, "--workers", "2", ready_text="with 2 workers") as running:
            add_model(config)

            async def reload_then_ask() -> list[int]:
                async with aiohttp.ClientSession() as session, session.post(
                        f"{running.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as answer:
                    assert answer.status == 200, await answer.text()
                return [(await chat(running.url, key, "gpt-new"))[0] for _ in range(20)]  # fresh connections
            statuses = asyncio.run(reload_then_ask())
            deadline = time.monotonic() + 5
            while set(statuses) != {200}:  # the other worker reloads a moment later
                assert time.monotonic() < deadline, statuses
                time.sleep(0.1)
                statuses = [asyncio.run(chat(running.url, key, "gpt-new"))[0] for _ in range(20)]
            assert running.process.poll() is None
    assert_books_balance(config)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_every_worker(tmp_path: Path, database_url: str, workers: int) -> None:
    with slow_upstream(FakeUpstream()) as upstream:
        config = write_config(tmp_path, database_url, upstream)

        (key,) = asyncio.run(make_keys(config, {"ann@example.com": "5"}))
        with serve_process(config, tmp_path, "--workers", str(workers),
                           ready_text=f"with {workers} workers" if workers > 1 else None) as running:
            assert asyncio.run(chat(running.url, key, "gpt-new"))[0] == 404
            add_model(config)
            running.process.send_signal(signal.SIGHUP)

            async def all_new(tries: int) -> list[int]:  # fresh connections reach every worker
                return [(await chat(running.url, key, "gpt-new"))[0] for _ in range(tries)]
            deadline = time.monotonic() + 5
            while set(statuses := asyncio.run(all_new(10 * workers))) != {200}:
                assert time.monotonic() < deadline, statuses
                time.sleep(0.1)
            good = config.read_text()
            config.write_text("models: [oops")  # a broken file: each worker logs it and serves on
            running.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while running.log.read_text().count("config not reloaded") < workers:
                assert time.monotonic() < deadline, running.log.read_text()
                time.sleep(0.05)
            assert set(asyncio.run(all_new(10 * workers))) == {200}
            assert running.process.poll() is None
    config.write_text(good)
    assert_books_balance(config)
