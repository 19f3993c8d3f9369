"""`apibox db copy`: a populated SQLite database moves to PostgreSQL, and the gateway carries on
there with the same balances; a non-empty target, a busy source and bad URLs are refused with
nothing written; a copy that fails half-way leaves the target empty."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
from typer.testing import CliRunner

from apibox import accounts
from apibox.cli.main import app as cli_app
from apibox.store import open_store
from tests import dbquery
from tests.cli_helpers import Terminal, assert_one_line_error, bar_went, ok_json
from tests.conftest import ServerThread, databases_for, serving
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import account

TABLES = ("users", "balances", "api_keys", "usage", "ledger", "usage_daily", "admin_log", "stored_responses")


def copy(source: str, target: str, *extra: str) -> Any:
    return CliRunner().invoke(cli_app, ["db", "copy", "--from", source, "--to", target, *extra])


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every copied table's rows, in key order: what the copy must reproduce exactly."""
    order = {"balances": "user_id", "usage_daily": "day, user_id, key_id, model, provider, status",
             "stored_responses": "response_id"}
    return {table: [tuple(r) for r in dbquery.query(url, f"SELECT * FROM {table} ORDER BY {order.get(table, 'id')}")]
            for table in TABLES}


@pytest.fixture
def pg(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """``pg()``: the URL of a new PostgreSQL database, migrated and holding no rows, dropped after the test."""
    made = databases_for("postgresql", tmp_path, request)
    yield made.new
    made.close()


async def _people(url: str, live: Any) -> dict[str, str]:
    store = await open_store(url)
    try:
        keys = {who: (await account(store, live, f"{who}@example.com", usd)).key
                for who, usd in (("ann", "5"), ("bob", "2"))}
        spare = await accounts.create_key(store, "bob@example.com", accounts.KeyOptions(name="spare"),
                                          known_models=live.settings.model_index())
        await accounts.revoke_key(store, spare.key.id)
        return keys
    finally:
        await store.close()


def populate(directory: Path, sqlite_url: str) -> tuple[dict[str, int], dict[str, str]]:
    """Real traffic on SQLite: two users with keys, top-ups, chats and responses (one of each
    streamed; the responses kept upstream), a revoked key, a suspension in the admin log.
    Returns each user's balance afterwards, and their keys."""
    directory.mkdir()
    with serving(ServerThread(directory, sqlite_url, FakeUpstream())) as live:
        keys = asyncio.run(_people(sqlite_url, live))
        for who, stream in (("ann", False), ("ann", True), ("bob", False)):
            client = openai.OpenAI(base_url=live.v1, api_key=keys[who], max_retries=0)
            reply = client.chat.completions.create(model="gpt-fake", stream=stream,
                                                   messages=[{"role": "user", "content": f"hello {who}"}])
            if stream:
                assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
            client.responses.create(model="gpt-fake", input=f"hello {who}", stream=stream)  # kept upstream
    suspended = CliRunner().invoke(cli_app, ["users", "suspend", "bob@example.com", "--reason", "audit",
                                             "--config", str(live.config_path)])
    assert suspended.exit_code == 0, suspended.output
    balances = {email: balance for email, balance in dbquery.query(
        sqlite_url, "SELECT u.email, b.balance FROM balances b JOIN users u ON u.id = b.user_id")}
    return balances, keys


def test_sqlite_moves_to_postgresql_and_the_gateway_carries_on(tmp_path: Path, pg: Any) -> None:
    source = f"sqlite:///{tmp_path / 'old.db'}"
    balances, keys = populate(tmp_path / "before", source)
    target = pg()
    report = ok_json(copy(source, target, "--json"))
    assert report["ok"] is True
    rows = report["rows"]
    assert (rows["usage"], rows["users"], rows["api_keys"], rows["stored_responses"]) == (6, 2, 3, 3)
    assert report["totals"]["balance"] == sum(balances.values())
    assert snapshot(target) == snapshot(source)  # row for row, id for id

    # The gateway, pointed at the copy, knows the same users, keys and balances, and goes on billing.
    (tmp_path / "after").mkdir()
    with serving(ServerThread(tmp_path / "after", target, FakeUpstream())) as live:
        client = openai.OpenAI(base_url=live.v1, api_key=keys["ann"], max_retries=0)
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "still here"}])
        (balance, used, last_id), = dbquery.query(
            target, "SELECT b.balance, (SELECT count(*) FROM usage WHERE user_id = u.id), (SELECT max(id) FROM usage) "
            "FROM balances b JOIN users u ON u.id = b.user_id WHERE u.email = ?", ("ann@example.com",))
        assert balance < balances["ann@example.com"] and used == 5
        assert last_id == 7  # new rows continue after the copied ids
        with pytest.raises(openai.PermissionDeniedError):  # bob's suspension came over too
            openai.OpenAI(base_url=live.v1, api_key=keys["bob"], max_retries=0).chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "x"}])


def test_a_copy_draws_each_table_then_the_audit(tmp_path: Path, pg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    source = f"sqlite:///{tmp_path / 'old.db'}"
    populate(tmp_path / "before", source)
    terminal = Terminal(monkeypatch)
    assert copy(source, pg()).exit_code == 0
    drawn = terminal.text()
    assert [bar_went(drawn, table) for table in ("users", "api_keys", "usage", "stored_responses")] == [
        "2", "3", "6", "3"]
    assert drawn.index("audit") > drawn.index("usage ")  # the copy's audit comes after its rows
    assert int(bar_went(drawn, "audit")) > 1


def test_a_non_empty_target_is_refused_and_left_as_it_was(tmp_path: Path, pg: Any) -> None:
    source = f"sqlite:///{tmp_path / 'old.db'}"
    populate(tmp_path / "before", source)
    target = pg()
    assert copy(source, target).exit_code == 0
    before = snapshot(target)
    assert_one_line_error(copy(source, target), "not empty", "users (2 rows)")
    assert snapshot(target) == before


def test_a_source_with_requests_in_flight_is_refused(tmp_path: Path, pg: Any) -> None:
    source = f"sqlite:///{tmp_path / 'old.db'}"
    populate(tmp_path / "before", source)

    async def hold() -> None:
        store = await open_store(source)
        try:
            key = (await store.list_keys())[0]
            assert await store.hold(key.user_id, key.id, 1_000, "in-flight", "gpt-fake") is not None
        finally:
            await store.close()
    asyncio.run(hold())
    target = pg()
    assert_one_line_error(copy(source, target), "1 requests in flight")
    assert all(not rows for rows in snapshot(target).values())


def test_a_copy_that_fails_half_way_leaves_the_target_empty(tmp_path: Path, pg: Any) -> None:
    source = f"sqlite:///{tmp_path / 'old.db'}"
    populate(tmp_path / "before", source)
    target = pg()  # migrated: the ledger's table is there to put a trigger on
    # The ledger comes after users, keys and usage: make the target refuse it.
    dbquery.execute(target, "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                            "$$ BEGIN RAISE EXCEPTION 'disk full (simulated)'; END $$")
    dbquery.execute(target, "CREATE TRIGGER refuse BEFORE INSERT ON ledger EXECUTE FUNCTION refuse()")
    result = copy(source, target)
    assert result.exit_code != 0
    assert "disk full (simulated)" in result.output
    assert all(not rows for rows in snapshot(target).values())


@pytest.mark.parametrize(("source", "target", "message"), [
    ("sqlite:///{tmp}/nope.db", "sqlite:///{tmp}/b.db", "no SQLite database"),
    ("sqlite:///{tmp}/a.db", "sqlite:///{tmp}/a.db", "the same database"),
    ("mysql://x/y", "sqlite:///{tmp}/b.db", "not a database URL"),
    ("sqlite:///{tmp}/a.db", "postgresql://apibox:s3cret-pw@127.0.0.1:9/none", "cannot connect"),
])
def test_bad_urls_are_refused_in_one_line(tmp_path: Path, source: str, target: str, message: str) -> None:
    (tmp_path / "a.db").touch()
    result = copy(source.format(tmp=tmp_path), target.format(tmp=tmp_path))
    line = assert_one_line_error(result, message)
    assert "s3cret-pw" not in line
    assert not (tmp_path / "b.db").exists()
