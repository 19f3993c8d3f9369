"""`apibox usage report` over real billed requests, and `apibox db migrate / check`.

Usage rows are made the way the gateway makes them: ``billing.reserve`` then ``billing.settle``
on the test's own connection to the same SQLite file the CLI opens.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from apibox import accounts, billing
from apibox.cli.common import with_store
from apibox.config import Settings, load_settings
from apibox.models import LedgerKind, UsageRecord
from apibox.money import format_usd
from apibox.pricing import Usage
from apibox.store.base import Store
from apibox.store.migrations import MIGRATIONS as SCHEMA
from tests import dbquery
from tests.cli_helpers import (
    Terminal,
    assert_one_line_error,
    bar_went,
    database,
    db_file,
    ok_json,
    run,
    tables,
)
from tests.conftest import fund

MIGRATIONS = [m.name for m in SCHEMA]
NUMBERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")


@dataclass
class Seeded:
    now: datetime
    records: list[UsageRecord] = field(default_factory=list)
    keys: dict[str, int] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)

    def rows(self, **where: Any) -> list[UsageRecord]:
        return [r for r in self.records if r.status != "interrupted"
                and all(getattr(r, k) == v for k, v in where.items())]


async def bill(store: Store, settings: Settings, seeded: Seeded, email: str, key_name: str, model: str,
               prompt: int, completion: int, *, days_ago: int = 0, status: str = "ok") -> UsageRecord:
    """One request as the gateway bills it: hold the worst case, then settle the real usage."""
    key = await store.get_key(seeded.keys[key_name])
    assert key is not None
    config = settings.model_index()[model]
    request_id = f"req-{len(seeded.records)}"
    reservation = await billing.reserve(store, key, model=model, price=config.price, request_id=request_id,
                                        prompt_tokens=prompt, output_tokens=max(completion, 16))
    record = UsageRecord(request_id=request_id, user_id=key.user_id, key_id=key.id, model=model,
                         provider=config.routes[0].provider, endpoint="/v1/chat/completions", status=status,
                         http_status=200 if status == "ok" else 502, latency_ms=100 + 10 * len(seeded.records),
                         created_at=seeded.now - timedelta(days=days_ago))
    settled = await billing.settle(store, reservation, record, Usage(prompt, completion))
    seeded.records.append(settled)
    return settled


@pytest.fixture
async def seeded(store: Store, config_path: Path) -> Seeded:
    """Two users, three keys, five billed requests over three days (one an upstream error)."""
    settings = load_settings(str(config_path))
    s = Seeded(now=datetime.now(UTC))
    for email in ("ann@example.com", "bob@example.com"):
        await fund(store, settings, email, "10")
        user = await store.find_user_by_email(email)
        assert user is not None
        s.users[email] = user.id
    ann_keys = await store.list_keys(s.users["ann@example.com"])
    s.keys["ann-1"] = ann_keys[0].id
    s.keys["bob-1"] = (await store.list_keys(s.users["bob@example.com"]))[0].id
    second = await accounts.create_key(store, "ann@example.com", accounts.KeyOptions(name="second"),
                                       known_models=settings.model_index())
    s.keys["ann-2"] = second.key.id
    await bill(store, settings, s, "ann@example.com", "ann-1", "demo", 1000, 500)
    await bill(store, settings, s, "ann@example.com", "ann-1", "gpt-fake", 2000, 1000, days_ago=1)
    await bill(store, settings, s, "ann@example.com", "ann-2", "demo", 10, 3)
    await bill(store, settings, s, "bob@example.com", "bob-1", "demo", 100, 100, days_ago=10)
    await bill(store, settings, s, "bob@example.com", "bob-1", "gpt-fake", 0, 0, status="error")
    return s


async def report(cli: Any, *args: str) -> list[dict[str, Any]]:
    return ok_json(await run(cli, "usage", "report", *args, "--format", "json"))


def charged(records: list[UsageRecord]) -> str:
    return format_usd(sum(r.charged for r in records))


async def ledger_charges(store: Store, user_ids: list[int]) -> int:
    total = 0
    for user_id in user_ids:
        total += -sum(e.amount for e in await store.ledger(user_id) if e.kind == LedgerKind.CHARGE)
    return total


# -- usage report ------------------------------------------------------------------------------


def test_a_commands_result_is_not_formatted_on_the_way_out(config_path: Path) -> None:
    """asyncio.run (Python 3.11) formats the repr of its main task, result included, as it
    finishes: a command's result (a report of thousands of rows) must not be that result."""
    class Counted:
        reprs = 0

        def __repr__(self) -> str:
            Counted.reprs += 1
            return "Counted()"

    async def action(store: Store, settings: Settings) -> Counted:
        return Counted()

    assert isinstance(with_store(str(config_path), action), Counted)
    assert Counted.reprs == 0


async def test_seeded_costs_are_the_price_of_the_tokens(seeded: Seeded) -> None:
    # demo: $5 in / $15 out per 1M: 1000*5 + 500*15 = 12,500 micro-USD.
    assert seeded.records[0].cost == seeded.records[0].charged == 12_500
    # gpt-fake: $2.5 / $10: 2000*2.5 + 1000*10 = 15,000.
    assert seeded.records[1].charged == 15_000
    assert seeded.records[4].charged == 0  # the upstream error is free


async def test_report_by_model_totals_equal_what_was_charged(cli: Any, seeded: Seeded, store: Store) -> None:
    rows = await report(cli, "--by", "model")
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"demo", "gpt-fake"}
    for model, row in by_model.items():
        records = seeded.rows(model=model)
        assert row["requests"] == len(records)
        assert row["errors"] == sum(r.status != "ok" for r in records)
        assert row["prompt_tokens"] == sum(r.prompt_tokens for r in records)
        assert row["completion_tokens"] == sum(r.completion_tokens for r in records)
        assert row["cost_usd"] == charged(records)
    assert by_model["demo"]["cost_usd"] == "0.014595"  # 12,500 + 95 + 2,000
    assert by_model["gpt-fake"]["errors"] == 1
    total = sum(int(r["cost_usd"].replace(".", "")) for r in rows)
    assert total == await ledger_charges(store, list(seeded.users.values()))


async def test_report_by_day(cli: Any, seeded: Seeded) -> None:
    rows = await report(cli, "--by", "day")
    days = [(seeded.now - timedelta(days=n)).strftime("%Y-%m-%d") for n in (10, 1, 0)]
    assert [r["day"] for r in rows] == days  # oldest first
    today = rows[-1]
    assert today["requests"] == 3 and today["errors"] == 1
    assert today["cost_usd"] == charged([seeded.records[0], seeded.records[2], seeded.records[4]])
    assert await report(cli) == rows  # day is the default grouping


async def test_report_by_user(cli: Any, seeded: Seeded) -> None:
    rows = {r["user"]: r for r in await report(cli, "--by", "user")}
    assert set(rows) == {"ann@example.com", "bob@example.com"}
    for email, user_id in seeded.users.items():
        assert rows[email]["requests"] == len(seeded.rows(user_id=user_id))
        assert rows[email]["cost_usd"] == charged(seeded.rows(user_id=user_id))


async def test_report_by_key(cli: Any, seeded: Seeded) -> None:
    rows = {r["key"]: r for r in await report(cli, "--by", "key")}
    assert set(rows) == {str(k) for k in seeded.keys.values()}
    for key_id in seeded.keys.values():
        assert rows[str(key_id)]["requests"] == len(seeded.rows(key_id=key_id))
        assert rows[str(key_id)]["cost_usd"] == charged(seeded.rows(key_id=key_id))


async def test_report_by_provider(cli: Any, seeded: Seeded) -> None:
    rows = {r["provider"]: r for r in await report(cli, "--by", "provider")}
    assert set(rows) == {"echo", "fake"}
    assert rows["echo"]["requests"] == 3 and rows["fake"]["requests"] == 2
    assert rows["fake"]["cost_usd"] == charged(seeded.rows(provider="fake"))


async def test_report_by_two_dimensions(cli: Any, seeded: Seeded) -> None:
    rows = await report(cli, "--by", "day,model")
    pairs = {(r["day"], r["model"]): r for r in rows}
    expected = {(r.created_at.strftime("%Y-%m-%d"), r.model) for r in seeded.rows()}  # type: ignore[union-attr]
    assert set(pairs) == expected
    today = seeded.now.strftime("%Y-%m-%d")
    assert pairs[(today, "demo")]["requests"] == 2
    assert pairs[(today, "demo")]["cost_usd"] == charged([seeded.records[0], seeded.records[2]])
    spaced = await report(cli, "--by", "user, provider")
    assert {(r["user"], r["provider"]) for r in spaced} == {
        ("ann@example.com", "echo"), ("ann@example.com", "fake"), ("bob@example.com", "echo"),
        ("bob@example.com", "fake")}


async def test_report_csv_matches_json(cli: Any, seeded: Seeded) -> None:
    result = await run(cli, "usage", "report", "--by", "model,user", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["model", "user", "requests", "errors", "error_rate", "prompt_tokens",
                             "completion_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
                             "cost_usd", "avg_latency_ms", "p50_latency_ms", "p95_latency_ms", "p50_ttft_ms"]
    as_json = await report(cli, "--by", "model,user")
    *rows, total = rows  # csv ends with the TOTAL row
    assert len(rows) == len(as_json)
    for row, data in zip(rows, as_json, strict=True):
        assert row["model"] == data["model"] and row["user"] == data["user"]
        for column in NUMBERS:
            assert row[column] == str(data[column])
    assert (total["model"], total["user"]) == ("TOTAL", "")
    assert total["cost_usd"] == charged(seeded.rows())
    assert int(total["requests"]) == len(seeded.rows())


async def test_report_json_flag_equals_format_json(cli: Any, seeded: Seeded) -> None:
    assert ok_json(await run(cli, "usage", "report", "--by", "model", "--json")) == await report(cli, "--by", "model")


async def test_report_table_has_a_totals_row(cli: Any, seeded: Seeded) -> None:
    result = await run(cli, "usage", "report", "--by", "model")
    assert result.exit_code == 0, result.output
    total_line = next(line for line in result.stdout.splitlines() if "TOTAL" in line)
    assert charged(seeded.rows()) in total_line
    assert " 5 " in total_line  # five requests
    assert "demo" in result.stdout and "gpt-fake" in result.stdout


async def test_report_since_and_until(cli: Any, seeded: Seeded) -> None:
    recent = await report(cli, "--by", "model", "--since", "7d")
    assert sum(r["requests"] for r in recent) == 4
    assert sum(int(r["cost_usd"].replace(".", "")) for r in recent) == sum(
        r.charged for r in seeded.rows() if r.created_at > seeded.now - timedelta(days=7))  # type: ignore[operator]
    old = await report(cli, "--by", "user", "--until", "7d")
    assert [(r["user"], r["requests"]) for r in old] == [("bob@example.com", 1)]
    since_date = (seeded.now - timedelta(days=2)).strftime("%Y-%m-%d")
    assert sum(r["requests"] for r in await report(cli, "--since", since_date)) == 4
    assert await report(cli, "--since", "2099-01-01") == []


async def test_report_filters(cli: Any, seeded: Seeded) -> None:
    bob = await report(cli, "--by", "model", "--user", "bob@example.com")
    assert {r["model"]: r["requests"] for r in bob} == {"demo": 1, "gpt-fake": 1}
    by_id = await report(cli, "--by", "model", "--user", str(seeded.users["bob@example.com"]))
    assert by_id == bob
    demo = await report(cli, "--by", "user", "--model", "demo")
    assert {r["user"]: r["cost_usd"] for r in demo} == {
        "ann@example.com": charged(seeded.rows(model="demo", user_id=seeded.users["ann@example.com"])),
        "bob@example.com": charged(seeded.rows(model="demo", user_id=seeded.users["bob@example.com"]))}
    key = await report(cli, "--by", "model", "--key", str(seeded.keys["ann-2"]))
    assert [(r["model"], r["requests"]) for r in key] == [("demo", 1)]
    both = await report(cli, "--by", "day", "--user", "ann@example.com", "--model", "gpt-fake")
    assert [r["requests"] for r in both] == [1]
    assert await report(cli, "--model", "no-such-model") == []


async def test_report_filter_values_are_not_sql(cli: Any, seeded: Seeded) -> None:
    assert await report(cli, "--by", "model", "--model", "demo' OR '1'='1") == []
    assert await report(cli, "--by", "model", "--model", "demo\" OR 1=1 --") == []


async def test_interrupted_requests_are_not_reported(cli: Any, seeded: Seeded, store: Store) -> None:
    key = await store.get_key(seeded.keys["bob-1"])
    assert key is not None
    assert await store.hold(key.user_id, key.id, 1000, "req-crashed", "demo") is not None
    assert len(await store.recover_holds()) == 1
    rows = await report(cli, "--by", "user")
    assert sum(r["requests"] for r in rows) == len(seeded.rows())


@pytest.mark.parametrize(("args", "says"), [
    (("--by", "week"), "cannot group by 'week'"),
    (("--by", "day,colour"), "cannot group by 'colour'"),
    (("--by", "day,day"), "twice"),
    (("--by", "model;DROP TABLE usage"), "cannot group by"),
    (("--format", "xml"), "--format"),
    (("--since", "yesterday-ish"), "not a date"),
    (("--since", "999999w"), "too far"),
    (("--until", "9999-12-31T23:59:59-05:00"), "too far"),
    (("--key", "abc"), "no key"),
    (("--key", "999"), "no key"),
])
def test_report_rejects_bad_arguments(cli: Any, args: tuple[str, ...], says: str) -> None:
    assert_one_line_error(cli("usage", "report", *args), says)


def test_report_on_an_empty_database(cli: Any) -> None:
    assert ok_json(cli("usage", "report", "--format", "json")) == []
    table = cli("usage", "report", "--by", "model")
    assert table.exit_code == 0 and "TOTAL" in table.stdout
    result = cli("usage", "report", "--format", "csv")
    assert result.stdout.strip().splitlines() == [
        "day,requests,errors,error_rate,prompt_tokens,completion_tokens,cached_tokens,cache_write_tokens,"
        "reasoning_tokens,cost_usd,avg_latency_ms,p50_latency_ms,p95_latency_ms,p50_ttft_ms",
        "TOTAL,0,0,0.0,0,0,0,0,0,0.000000,0.0,,,"]


# -- db migrate / check ------------------------------------------------------------------------


@pytest.mark.empty_database
def test_db_migrate_is_idempotent(cli: Any, config_path: Path, engine: str) -> None:
    assert tables(config_path) == set()  # nothing made before the first command (on SQLite, not even the file)
    assert engine != "sqlite" or not db_file(config_path).exists()
    first = cli("db", "migrate")
    assert first.exit_code == 0, first.output
    assert f"Applied {', '.join(MIGRATIONS)}." in first.stdout
    second = cli("db", "migrate")
    assert second.exit_code == 0 and "up to date" in second.stdout
    assert ok_json(cli("db", "migrate", "--json")) == {"applied": []}
    assert dbquery.query(database(config_path), "SELECT name FROM _apibox_migrations ORDER BY name") == [
        (name,) for name in MIGRATIONS]
    assert {"users", "balances", "api_keys", "holds", "usage", "ledger"} <= tables(config_path)


@pytest.mark.empty_database
def test_db_migrate_json_on_a_fresh_database(cli: Any) -> None:
    assert ok_json(cli("db", "migrate", "--json")) == {"applied": MIGRATIONS}


def test_db_migrate_keeps_the_data(cli: Any) -> None:
    cli("users", "create", "ann@example.com")
    cli("topup", "ann@example.com", "5")
    assert cli("db", "migrate").exit_code == 0
    assert ok_json(cli("balance", "ann@example.com", "--json"))["balance_usd"] == "5.000000"


def test_db_check_passes_on_good_books(cli: Any) -> None:
    empty = cli("db", "check")
    assert empty.exit_code == 0 and "OK" in empty.stdout
    cli("users", "create", "ann@example.com")
    cli("topup", "ann@example.com", "5")
    cli("adjust", "ann@example.com", "-1", "--note", "x")
    result = cli("db", "check")
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout and result.stderr == ""
    assert ok_json(cli("db", "check", "--json")) == {"ok": True, "problems": []}


def test_db_check_draws_its_progress_on_a_terminal_only(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _good_books(cli)
    terminal = Terminal(monkeypatch)
    result = cli("db", "check")
    assert result.exit_code == 0 and result.stdout == "OK: balances, holds, ledger and usage agree.\n"
    assert int(bar_went(terminal.text(), "audit")) > 1
    terminal.clear()
    assert ok_json(cli("db", "check", "--json")) == {"ok": True, "problems": []}
    assert terminal.text() == ""  # --json: nothing drawn


@pytest.mark.parametrize("command", [("usage", "report", "--by", "model"), ("usage", "report", "--format", "csv"),
                                     ("usage", "chart", "--days", "3")])
def test_reports_show_a_spinner_while_they_read_on_a_terminal_only(cli: Any, monkeypatch: pytest.MonkeyPatch,
                                                                     command: tuple[str, ...]) -> None:
    _good_books(cli)
    plain = cli(*command)
    terminal = Terminal(monkeypatch)
    drawn = cli(*command)
    assert drawn.exit_code == 0 and drawn.stdout == plain.stdout  # stdout is the same; the spinner is on stderr
    assert "Reading usage..." in terminal.text()
    terminal.clear()
    assert cli(*command, "--json").exit_code == 0
    assert terminal.text() == ""  # --json: nothing drawn


async def test_the_audit_tells_its_progress_check_by_check(store: Store) -> None:
    told: list[tuple[str, int, int]] = []
    assert await store.audit(lambda *step: told.append(step)) == []
    checks = told[0][2]
    assert checks > 0 and told == [("audit", done, checks) for done in range(checks + 1)]


def _good_books(cli: Any) -> None:
    cli("users", "create", "ann@example.com")
    assert cli("topup", "ann@example.com", "10").exit_code == 0
    assert cli("db", "check").exit_code == 0


def tamper(config_path: Path, sql: str) -> None:
    dbquery.execute(database(config_path), sql)


def test_db_check_fails_when_a_balance_differs_from_the_ledger(cli: Any, config_path: Path) -> None:
    _good_books(cli)
    tamper(config_path, "UPDATE balances SET balance = balance + 1")
    result = cli("db", "check")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "user 1: balance 10000001 differs from the ledger's sum 10000000" in result.stderr
    assert "OK" not in result.output
    data = json.loads(cli("db", "check", "--json").stdout)
    assert data["ok"] is False
    assert any("balance 10000001" in p for p in data["problems"])
    assert cli("db", "check", "--json").exit_code == 1


def test_db_check_fails_when_a_ledger_rows_balance_after_is_not_the_running_sum(cli: Any,
                                                                                  config_path: Path) -> None:
    _good_books(cli)
    # an entry whose amount the balance agrees with, but whose balance_after does not follow the entries before it
    tamper(config_path, "INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor) "
                        "VALUES (1, 0, 'adjustment', 5, 999, 'test')")
    tamper(config_path, "UPDATE balances SET balance = balance + 5")
    result = cli("db", "check")
    assert result.exit_code == 1
    (problem,) = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert "ledger row 2 (user 1): balance_after 999 differs from the running sum 10000005" in problem


def test_db_check_fails_when_held_differs_from_the_open_holds(cli: Any, config_path: Path) -> None:
    _good_books(cli)
    tamper(config_path, "UPDATE balances SET held = 7")
    result = cli("db", "check")
    assert result.exit_code == 1
    assert "held 7 differs from the open holds' sum 0" in result.stderr


def test_db_check_fails_on_a_charge_without_a_ledger_row(cli: Any, config_path: Path) -> None:
    _good_books(cli)
    cli("keys", "create", "ann@example.com")
    tamper(config_path, "INSERT INTO usage (request_id, created_at, user_id, key_id, model, provider, endpoint, "
                        "status, http_status, cost, charged) VALUES ('r', 0, 1, 1, 'demo', 'echo', '', 'ok', 200, "
                        "50, 50)")
    result = cli("db", "check")
    assert result.exit_code == 1
    assert "usage row 1 charged 50 but has no ledger row" in result.stderr


def test_db_check_names_every_problem(cli: Any, config_path: Path) -> None:
    _good_books(cli)
    cli("users", "create", "bob@example.com")
    cli("topup", "bob@example.com", "3")
    tamper(config_path, "UPDATE balances SET balance = balance + 2")
    result = cli("db", "check")
    assert result.exit_code == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2
    assert any("user 1" in p for p in problems) and any("user 2" in p for p in problems)
