"""`apibox usage report` (every grouping, exact sums, error rate, percentiles, totals), `apibox usage
chart`, and `apibox ledger USER` as a statement with opening and closing balances.

Reports are checked against an independent reference implementation (tests/report_helpers.py)
computed from the records the test wrote.
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import apibox.store.sql_store as sql_store
from apibox import reports
from apibox.models import LedgerKind
from apibox.money import format_usd
from apibox.store.base import Credit, Store, UsageFilter
from apibox.store.sql_reports import SORTED_TEXT_MAX, _nearest_rank, _percentiles
from tests.cli_helpers import assert_one_line_error, ok_json, run
from tests.report_helpers import (
    SINGLE_DIMENSIONS,
    Book,
    expected,
    keyed,
    micro,
    open_account,
    record,
    reported,
    seed_mixed,
    summary,
)

GROUPINGS = [(d,) for d in SINGLE_DIMENSIONS] + [
    ("day", "model"), ("user", "provider"), ("hour", "key"), ("model", "user", "provider"), ("key", "day")]


@pytest.fixture
async def book(store: Store) -> Book:
    return await seed_mixed(store, datetime.now(UTC))


async def report_json(cli: Any, *args: str) -> list[dict[str, Any]]:
    return ok_json(await run(cli, "usage", "report", *args, "--format", "json"))


async def report_csv(cli: Any, *args: str) -> list[dict[str, str]]:
    result = await run(cli, "usage", "report", *args, "--format", "csv")
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(io.StringIO(result.stdout)))


def as_csv(row: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in row.items()}


# -- exact figures -----------------------------------------------------------------------------


@pytest.mark.parametrize("by", GROUPINGS, ids=lambda by: ",".join(by))
async def test_every_grouping_matches_the_reference_exactly(cli: Any, book: Book, by: tuple[str, ...]) -> None:
    rows = await report_json(cli, "--by", ",".join(by))
    assert keyed(rows, by) == expected(book, by)
    labels = [tuple(r[d] for d in by) for r in rows]
    assert labels == sorted(labels), "groups come in order (oldest day first, emails and names sorted)"


@pytest.mark.parametrize("by", [("model",), ("day", "user"), ("hour",)], ids=lambda by: ",".join(by))
async def test_csv_ends_with_the_exact_total(cli: Any, book: Book, by: tuple[str, ...]) -> None:
    *rows, total = await report_csv(cli, "--by", ",".join(by))
    as_json = await report_json(cli, "--by", ",".join(by))
    assert rows == [as_csv(r) for r in as_json]
    assert total == as_csv({by[0]: "TOTAL", **dict.fromkeys(by[1:], ""), **summary(reported(book))})


async def test_totals_equal_the_ledger_charges(cli: Any, book: Book, store: Store) -> None:
    charged = 0
    for user_id in book.emails:
        charged -= sum(e.amount for e in await store.ledger(user_id) if e.kind.value == "charge")
    for by in SINGLE_DIMENSIONS:
        rows = await report_json(cli, "--by", by)
        assert sum(micro(r["cost_usd"]) for r in rows) == charged
        assert sum(r["requests"] for r in rows) == len(reported(book))


async def test_grouped_by_nothing_is_one_total_row(cli: Any, book: Book) -> None:
    (row,) = await report_json(cli, "--by", "")
    assert row == summary(reported(book))
    (only, ) = await report_csv(cli, "--by", "")
    assert only == as_csv(summary(reported(book)))


async def test_the_table_shows_percentiles_and_the_total(cli: Any, book: Book) -> None:
    result = await run(cli, "usage", "report", "--by", "model")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "requests" in line)
    for column in ("err %", "p50 ms", "p95 ms", "ttft p50", "cost USD"):
        assert column in header
    total = summary(reported(book))
    line = next(line for line in result.stdout.splitlines() if line.lstrip().startswith("TOTAL"))
    cells = line.split()
    assert cells[1] == str(total["requests"]) and total["cost_usd"] in cells
    assert cells[-3:] == [str(total["p50_latency_ms"]), str(total["p95_latency_ms"]), str(total["p50_ttft_ms"])]
    assert f"{total['error_rate'] * 100:.1f}" in cells


async def test_json_keeps_the_design_contract(cli: Any, book: Book) -> None:
    rows = await report_json(cli, "--by", "day,model")
    assert rows and all({"day", "model", "requests", "prompt_tokens", "completion_tokens", "cost_usd"} <= set(r)
                        for r in rows)
    assert all(r["day"] != "TOTAL" for r in rows)  # the json is the groups only
    assert ok_json(await run(cli, "usage", "report", "--by", "day,model", "--json")) == rows


async def test_filters_apply_to_every_figure(cli: Any, book: Book) -> None:
    ann_key = book.key(1)
    rows = await report_json(cli, "--by", "model", "--key", str(ann_key.id))
    assert keyed(rows, ("model",)) == expected(book, ("model",), [r for r in reported(book) if r.key_id == ann_key.id])
    since = (book.now - timedelta(days=3)).strftime("%Y-%m-%d")
    until = (book.now - timedelta(days=1)).strftime("%Y-%m-%d")
    window = reported(book, datetime.fromisoformat(since).replace(tzinfo=UTC),
                      datetime.fromisoformat(until).replace(tzinfo=UTC))
    rows = await report_json(cli, "--by", "user", "--since", since, "--until", until, "--model", "demo")
    assert keyed(rows, ("user",)) == expected(book, ("user",), [r for r in window if r.model == "demo"])
    ann = ann_key.user_id  # a user's live rows are found through the user's keys (no index by user)
    rows = await report_json(cli, "--by", "day,key", "--user", book.emails[ann])
    anns = [r for r in reported(book) if r.user_id == ann]
    assert keyed(rows, ("day", "key")) == expected(book, ("day", "key"), anns)


# -- percentiles and error rate on known data ----------------------------------------------------


def test_nearest_rank_percentiles() -> None:
    assert _nearest_rank(Counter(), (50, 95)) == [None, None]
    assert _nearest_rank(Counter([7]), (50, 95)) == [7, 7]
    assert _nearest_rank(Counter([1, 2]), (50, 95)) == [1, 2]
    assert _nearest_rank(Counter([1, 2, 3, 4]), (50, 95)) == [2, 4]
    assert _nearest_rank(Counter(range(1, 101)), (50, 95, 99, 100)) == [50, 95, 99, 100]
    assert _nearest_rank(Counter(range(1, 21)), (95,)) == [19]  # ceil(0.95 * 20) = 19: no float error
    assert _nearest_rank(Counter({5: 98, 1000: 2}), (50, 95, 99)) == [5, 5, 1000]


@pytest.mark.parametrize("count", [1, 2, 3, 999, 20_000, 150_000])
def test_group_percentiles_sorted_or_counted_in_chunks(count: int) -> None:
    rng = random.Random(count)
    values = [rng.choice((rng.randrange(0, 10), rng.randrange(0, 100_000))) for _ in range(count)]
    text = ",".join(map(str, values))
    assert (len(text) > SORTED_TEXT_MAX) == (count >= 20_000)  # both ways are exercised
    total: Counter[int] = Counter({5: 1})
    ordered = sorted(values)
    assert _percentiles(text, (1, 50, 95, 100), total) == [
        ordered[max(1, -(-count * p // 100)) - 1] for p in (1, 50, 95, 100)]
    assert total == Counter(values) + Counter({5: 1})
    assert _percentiles(None, (50,), total) == [None] and _percentiles("", (50, 95), total) == [None, None]


async def test_percentiles_on_known_latencies(cli: Any, store: Store) -> None:
    book = Book(now=datetime.now(UTC))
    (key,) = await open_account(store, book, "ann@example.com")
    at = book.now - timedelta(hours=1)
    for latency in range(100, 0, -1):  # 100 requests, 1..100 ms, written in reverse
        await record(store, book, key, at, cost=10, latency=latency, ttft=latency if latency <= 10 else None)
    (row,) = await report_json(cli, "--by", "user")
    assert (row["p50_latency_ms"], row["p95_latency_ms"], row["p50_ttft_ms"]) == (50, 95, 5)
    assert row["avg_latency_ms"] == 50.5
    assert row["errors"] == 0 and row["error_rate"] == 0.0


async def test_a_total_percentile_is_over_all_requests_not_the_groups(cli: Any, store: Store) -> None:
    book = Book(now=datetime.now(UTC))
    (key,) = await open_account(store, book, "ann@example.com")
    at = book.now - timedelta(hours=1)
    for latency in (10, 20, 30):
        await record(store, book, key, at, model="demo", cost=5, latency=latency, ttft=latency // 2)
    await record(store, book, key, at, model="gpt-fake", status="error", latency=1000)
    rows = {r["model"]: r for r in await report_json(cli, "--by", "model")}
    assert (rows["demo"]["p50_latency_ms"], rows["demo"]["p95_latency_ms"], rows["demo"]["p50_ttft_ms"]) == (20, 30, 10)
    assert (rows["gpt-fake"]["p50_latency_ms"], rows["gpt-fake"]["p50_ttft_ms"]) == (1000, None)
    assert (rows["gpt-fake"]["errors"], rows["gpt-fake"]["error_rate"]) == (1, 1.0)
    *_, total = await report_csv(cli, "--by", "model")
    assert (total["p50_latency_ms"], total["p95_latency_ms"], total["p50_ttft_ms"]) == ("20", "1000", "10")
    assert (total["errors"], total["error_rate"]) == ("1", "0.25")
    summary_rows, summary_total = await store.usage_summary(("model",), UsageFilter())
    assert [r.p50_latency_ms for r in summary_rows] == [20, 1000]
    assert summary_total.p95_latency_ms == 1000 and summary_total.error_rate == 0.25


async def test_the_store_skips_percentiles_unless_asked(store: Store) -> None:
    book = Book(now=datetime.now(UTC))
    (key,) = await open_account(store, book, "ann@example.com")
    await record(store, book, key, book.now, cost=3, latency=42, ttft=7)
    (plain,) = await store.usage_report((), UsageFilter())
    assert (plain.requests, plain.cost, plain.p50_latency_ms, plain.p50_ttft_ms) == (1, 3, None, None)
    (full,) = await store.usage_report((), UsageFilter(), percentiles=True)
    assert (full.p50_latency_ms, full.p95_latency_ms, full.p50_ttft_ms) == (42, 42, 7)


# -- hours -------------------------------------------------------------------------------------


async def test_hour_grouping_and_hour_windows(cli: Any, store: Store) -> None:
    book = Book(now=datetime.now(UTC))
    (key,) = await open_account(store, book, "ann@example.com")
    day = (book.now - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
    for at, cost in ((day + timedelta(hours=5, minutes=10), 1), (day + timedelta(hours=5, minutes=50), 2),
                     (day + timedelta(hours=7), 4), (day + timedelta(days=1), 8),
                     (day + timedelta(hours=4, minutes=59, seconds=59, milliseconds=999), 16)):
        await record(store, book, key, at, cost=cost, latency=cost)
    d0, d1 = day.strftime("%Y-%m-%d"), (day + timedelta(days=1)).strftime("%Y-%m-%d")
    rows = await report_json(cli, "--by", "hour")
    assert [(r["hour"], r["requests"], r["cost_usd"]) for r in rows] == [
        (f"{d0} 04:00", 1, format_usd(16)), (f"{d0} 05:00", 2, format_usd(3)), (f"{d0} 07:00", 1, format_usd(4)),
        (f"{d1} 00:00", 1, format_usd(8))]
    assert rows[1]["p50_latency_ms"] == 1 and rows[1]["p95_latency_ms"] == 2
    window = await report_json(cli, "--by", "hour", "--since", f"{d0}T05:00:00Z", "--until", f"{d0}T07:00:00Z")
    assert [(r["hour"], r["requests"]) for r in window] == [(f"{d0} 05:00", 2)]
    by_day_hour = await report_json(cli, "--by", "day,hour")
    assert [(r["day"], r["hour"]) for r in by_day_hour] == [(d0, f"{d0} 04:00"), (d0, f"{d0} 05:00"),
                                                             (d0, f"{d0} 07:00"), (d1, f"{d1} 00:00")]


async def test_hour_is_accepted_by_the_admin_core(store: Store) -> None:
    query = reports.ReportQuery(by=reports.parse_by("hour,provider"))
    report = await reports.build_report(store, query)
    assert report.rows == [] and report.total.requests == 0 and report.total.p50_latency_ms is None
    assert reports.parse_by(" hour , model ") == ("hour", "model")


# -- the chart ---------------------------------------------------------------------------------


async def test_chart_has_one_exact_bar_per_day(cli: Any, store: Store) -> None:
    book = Book(now=datetime.now(UTC))
    ann, = await open_account(store, book, "ann@example.com")
    bob, = await open_account(store, book, "bob@example.com")
    today = book.now.replace(hour=0, minute=0, second=0, microsecond=0)
    await record(store, book, ann, today, cost=1_234_567)
    await record(store, book, bob, today + timedelta(seconds=1), cost=1)
    await record(store, book, ann, today - timedelta(days=2), cost=617_284)
    await record(store, book, ann, today - timedelta(days=2), status="error")
    await record(store, book, ann, today - timedelta(days=40), cost=999_999)  # outside the window
    result = await run(cli, "usage", "chart", "--days", "7")
    assert result.exit_code == 0, result.output
    days = [(today - timedelta(days=n)).strftime("%Y-%m-%d") for n in range(6, -1, -1)]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()[:4].isdigit()}
    assert list(lines) == days
    assert lines[days[-1]].split()[-2:] == ["1.234568", "2"]
    assert lines[days[-3]].split()[-2:] == ["0.617284", "2"]
    assert lines[days[0]].split()[-2:] == ["0.000000", "0"]
    bar = {day: line.count("█") for day, line in lines.items()}
    assert bar[days[-1]] == 40 and bar[days[-3]] == 20 and bar[days[0]] == 0  # 617,284 is half of 1,234,568
    total = next(line for line in result.stdout.splitlines() if line.strip().startswith("TOTAL"))
    assert total.split()[-2:] == [format_usd(1_234_568 + 617_284), "4"]
    data = ok_json(await run(cli, "usage", "chart", "--days", "7", "--json"))
    assert [d["day"] for d in data] == days
    assert data[-1] == {"day": days[-1], "requests": 2, "cost_usd": "1.234568"}
    ann_only = ok_json(await run(cli, "usage", "chart", "--days", "3", "--user", "ann@example.com", "--json"))
    assert [d["cost_usd"] for d in ann_only] == ["0.617284", "0.000000", "1.234567"]
    long = ok_json(await run(cli, "usage", "chart", "--days", "41", "--json"))
    assert long[0] == {"day": (today - timedelta(days=40)).strftime("%Y-%m-%d"), "requests": 1,
                       "cost_usd": "0.999999"}


def test_chart_on_an_empty_database(cli: Any) -> None:
    result = cli("usage", "chart", "--days", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("0.000000") == 4  # three days and the total
    assert_one_line_error(cli("usage", "chart", "--days", "0"), "--days")
    assert_one_line_error(cli("usage", "chart", "--user", "nobody@example.com"), "no user")


# -- the ledger statement ----------------------------------------------------------------------


async def test_ledger_statement_opens_and_closes_the_period(cli: Any, store: Store,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    ms = lambda moment: int(moment.timestamp() * 1000)  # noqa: E731
    book = Book(now=now)
    with monkeypatch.context() as clock:  # top-ups are stamped with the store's clock
        clock.setattr(sql_store, "now_ms", lambda: ms(now - timedelta(days=10)))
        (key,) = await open_account(store, book, "ann@example.com", usd="5")
        await record(store, book, key, now - timedelta(days=5), cost=1_000_000)
        await record(store, book, key, now - timedelta(days=2), cost=250_000)
        clock.setattr(sql_store, "now_ms", lambda: ms(now - timedelta(days=1)))
        await store.credit(Credit(key.user_id, 2_000_000, LedgerKind.TOPUP))
    since = (now - timedelta(days=3)).strftime("%Y-%m-%d")
    # opening: 5 - 1 = 4; in the period: -0.25 and +2; closing 5.75
    table = await run(cli, "ledger", "ann@example.com", "--since", since)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert "opening balance 4.000000 USD" in lines[0] and since in lines[0]
    assert "closing balance 5.750000 USD" in lines[-1]
    assert "-0.250000" in table.stdout and "2.000000" in table.stdout and "-1.000000" not in table.stdout
    result = await run(cli, "ledger", "ann@example.com", "--since", since, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["kind"], r["amount_usd"], r["balance_after_usd"]) for r in rows] == [
        ("opening", "", "4.000000"), ("charge", "-0.250000", "3.750000"), ("topup", "2.000000", "5.750000"),
        ("closing", "", "5.750000")]
    assert rows[0]["created_at"].startswith(since) and rows[0]["id"] == ""
    entries = ok_json(await run(cli, "ledger", "ann@example.com", "--since", since, "--json"))
    assert [e["kind"] for e in entries] == ["charge", "topup"]  # json stays the list of entries
    until = (now - timedelta(days=1, hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
    window = await run(cli, "ledger", "ann@example.com", "--since", since, "--until", until, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(window.stdout)))
    assert [(r["kind"], r["balance_after_usd"]) for r in rows] == [
        ("opening", "4.000000"), ("charge", "3.750000"), ("closing", "3.750000")]
    empty = await run(cli, "ledger", "ann@example.com", "--since", "2099-01-01")
    assert "opening balance 5.750000" in empty.stdout and "No ledger entries" in empty.stdout
    assert "closing balance 5.750000" in empty.stdout
    plain = await run(cli, "ledger", "ann@example.com", "--format", "csv")
    assert "opening" not in plain.stdout and "closing" not in plain.stdout
    assert_one_line_error(await run(cli, "ledger", "ann@example.com", "--since", "2d", "--until", "3d"),
                          "until must be after since")
    assert_one_line_error(await run(cli, "usage", "report", "--since", "2030-01-01", "--until", "2020-01-01"),
                          "until must be after since")


# -- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "mentions"), [
    (("usage", "report"), ("--by", "hour", "--since", "--until", "--format", "p50")),
    (("usage", "chart"), ("--days", "--user", "--json")),
    (("usage", "prune"), ("--before", "--json", "yesterday")),
    (("ledger",), ("--since", "--until", "opening", "--format")),
])
def test_every_command_has_help(cli: Any, command: tuple[str, ...], mentions: tuple[str, ...]) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    for word in mentions:
        assert word in result.stdout, word
