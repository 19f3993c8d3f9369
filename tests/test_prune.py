"""`apibox usage prune --before DATE`: old usage rows folded into daily aggregates.

Invariants: every report's sums (cost, tokens of every class, requests, errors) are identical
before and after, by every dimension the aggregates keep; `apibox db check` passes (a folded
charge is matched to the aggregates); a second prune folds nothing; a date that is not at least a
day in the past is refused; the ledger, append-only, is untouched.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from apibox import reports
from apibox.errors import StoreError
from apibox.store import open_store
from apibox.store.base import Store, UsageFilter
from apibox.store.migrations import MIGRATIONS
from apibox.store.sqlite import _statements
from tests.cli_helpers import Terminal, assert_one_line_error, bar_went, database, ok_json, run
from tests.dbquery import connect
from tests.report_helpers import (
    SINGLE_DIMENSIONS,
    Book,
    additive,
    expected,
    keyed,
    label,
    open_account,
    record,
    reported,
    seed_mixed,
    summary,
)

KEPT = ("day", "model", "user", "key", "provider")  # what the aggregates keep (not the hour)
GROUPINGS = [(d,) for d in KEPT] + [("day", "model"), ("user", "key", "provider"), ("model", "provider"), ()]
DAYS = 8


@pytest.fixture
async def book(store: Store) -> Book:
    return await seed_mixed(store, datetime.now(UTC), days=DAYS, per_day=10)


def boundary(book: Book, days_ago: int) -> date:
    return (book.now - timedelta(days=days_ago)).date()


async def snapshot(cli: Any, *extra: str) -> dict[tuple[str, ...], Any]:
    out = {}
    for by in GROUPINGS:
        out[by] = keyed(ok_json(await run(cli, "usage", "report", "--by", ",".join(by), "--format", "json",
                                          *extra)), by)
    return out


async def prune(cli: Any, before: str) -> dict[str, Any]:
    return ok_json(await run(cli, "usage", "prune", "--before", before, "--json"))


def counts(config_path: Path) -> dict[str, int]:
    with connect(database(config_path)) as db:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("usage", "usage_daily", "ledger")}


def ledger_rows(config_path: Path) -> list[tuple[Any, ...]]:
    with connect(database(config_path)) as db:
        return db.execute("SELECT * FROM ledger ORDER BY id").fetchall()


# -- the invariants ------------------------------------------------------------------------------


async def test_prune_keeps_every_total_and_the_books(cli: Any, book: Book, store: Store, config_path: Path) -> None:
    before_prune = await snapshot(cli)
    ledger = ledger_rows(config_path)
    cut = boundary(book, 3)
    folded = [r for r in book.records if r.created_at.date() < cut]  # type: ignore[union-attr]
    assert folded and len(folded) < len(book.records)
    result = await prune(cli, cut.isoformat())
    assert result == {
        "before": cut.isoformat(), "rows_folded": len(folded), "requests": len(folded),
        "cost_usd": summary(folded)["cost_usd"], "charged_usd": summary(folded)["cost_usd"],
        "first_day": min(r.created_at for r in folded).date().isoformat(),  # type: ignore[type-var,union-attr]
        "last_day": max(r.created_at for r in folded).date().isoformat(),  # type: ignore[type-var,union-attr]
        "transactions": 1, "daily_rows": result["daily_rows"], "stored_responses_forgotten": 0}
    assert counts(config_path)["usage"] == len(book.records) - len(folded)
    assert 0 < result["daily_rows"] <= len(folded)
    after_prune = await snapshot(cli)
    for by in GROUPINGS:
        assert additive(after_prune[by]) == additive(before_prune[by]), by
        assert additive(after_prune[by]) == additive(expected(book, by)), by
    # averages come from the kept latency sums; percentiles only from the rows still kept
    for key, row in after_prune[("day",)].items():
        assert row["avg_latency_ms"] == before_prune[("day",)][key]["avg_latency_ms"]
        if key[0] < cut.isoformat():
            assert (row["p50_latency_ms"], row["p95_latency_ms"], row["p50_ttft_ms"]) == (None, None, None)
        else:
            assert row == before_prune[("day",)][key]
    assert ledger_rows(config_path) == ledger  # the ledger is untouched
    assert await store.audit() == []
    check = await run(cli, "db", "check")
    assert check.exit_code == 0 and "OK" in check.stdout, check.output


async def test_totals_with_day_aligned_windows_and_filters_are_unchanged(cli: Any, book: Book) -> None:
    window = ("--since", boundary(book, 6).isoformat(), "--until", boundary(book, 1).isoformat())
    filters = [window, ("--user", "ann@example.com"), ("--model", "gpt-fake"), ("--key", str(book.key(2).id)),
               ("--since", boundary(book, 2).isoformat())]
    before_prune = {f: await snapshot(cli, *f) for f in filters}
    await prune(cli, boundary(book, 3).isoformat())
    for f in filters:
        after = await snapshot(cli, *f)
        assert {by: additive(rows) for by, rows in after.items()} == {
            by: additive(rows) for by, rows in before_prune[f].items()}, f


async def test_hour_grouping_shows_a_folded_day_as_one_group(cli: Any, book: Book) -> None:
    cut = boundary(book, 3)
    before_prune = keyed(ok_json(await run(cli, "usage", "report", "--by", "hour", "--format", "json")), ("hour",))
    await prune(cli, cut.isoformat())
    rows = ok_json(await run(cli, "usage", "report", "--by", "hour", "--format", "json"))
    after = keyed(rows, ("hour",))
    folded_days = sorted({label(book, "day", r) for r in reported(book) if r.created_at.date() < cut})  # type: ignore
    assert [k[0] for k in after if len(k[0]) == 10] == folded_days  # a date alone: the whole day, folded
    for day in folded_days:
        hours = [row for (hour,), row in before_prune.items() if hour.startswith(day)]
        assert after[(day,)]["requests"] == sum(h["requests"] for h in hours)
        assert after[(day,)]["prompt_tokens"] == sum(h["prompt_tokens"] for h in hours)
    assert {k: v for k, v in after.items() if len(k[0]) > 10} == {
        k: v for k, v in before_prune.items() if k[0][:10] >= cut.isoformat()}
    labels = [r["hour"] for r in rows]
    assert labels == sorted(labels)
    totals = [summary(reported(book))[f] for f in ("requests", "cost_usd")]
    csv_total = (await run(cli, "usage", "report", "--by", "hour", "--format", "csv")).stdout.splitlines()[-1]
    assert csv_total.startswith(f"TOTAL,{totals[0]},") and f",{totals[1]}," in csv_total


async def test_a_second_prune_folds_nothing(cli: Any, book: Book, config_path: Path) -> None:
    cut = boundary(book, 2).isoformat()
    first = await prune(cli, cut)
    state, reports_after = counts(config_path), await snapshot(cli)
    again = await prune(cli, cut)
    assert again["rows_folded"] == 0 and again["daily_rows"] == first["daily_rows"]
    assert counts(config_path) == state and await snapshot(cli) == reports_after
    text = await run(cli, "usage", "prune", "--before", boundary(book, 5).isoformat())
    assert text.exit_code == 0 and "Nothing to fold" in text.stdout
    assert (await run(cli, "db", "check")).exit_code == 0


async def test_prune_in_small_batches_equals_one_batch(cli: Any, book: Book, store: Store) -> None:
    before_prune = await snapshot(cli)
    cut = datetime.combine(boundary(book, 2), datetime.min.time(), UTC)
    result = await store.prune_usage(cut, batch_rows=4)
    folded = [r for r in book.records if r.created_at < cut]  # type: ignore[operator]
    assert result.rows == len(folded) and result.batches >= len(folded) // 5
    assert (await store.prune_usage(cut, batch_rows=4)).rows == 0
    assert {by: additive(rows) for by, rows in (await snapshot(cli)).items()} == {
        by: additive(rows) for by, rows in before_prune.items()}
    assert await store.audit() == []


async def test_a_prune_tells_its_progress_batch_by_batch(book: Book, store: Store) -> None:
    cut = datetime.combine(boundary(book, 2), datetime.min.time(), UTC)
    told: list[tuple[str, int, int]] = []
    result = await store.prune_usage(cut, batch_rows=4, progress=lambda *step: told.append(step))
    to_fold = len([r for r in book.records if r.created_at < cut])  # type: ignore[operator]
    assert to_fold > 8 and result.rows == to_fold
    assert told[0] == ("usage rows", 0, to_fold) and told[-1] == ("usage rows", to_fold, to_fold)
    assert len(told) == result.batches + 1  # the start, then each batch
    done = [step[1] for step in told]
    assert done == sorted(done) and len(set(done)) == len(done)  # every batch folded some rows


async def test_the_cli_draws_a_prunes_progress(cli: Any, book: Book, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal(monkeypatch)
    result = await run(cli, "usage", "prune", "--before", boundary(book, 3).isoformat())
    assert result.exit_code == 0 and result.stdout.startswith("Folded ")
    folded = int(result.stdout.split()[1])
    assert folded > 0 and int(bar_went(terminal.text(), "usage rows")) == folded


async def test_rows_of_one_millisecond_are_folded_together(store: Store) -> None:
    book = Book(now=datetime.now(UTC))
    (key,) = await open_account(store, book, "ann@example.com")
    at = (book.now - timedelta(days=3)).replace(microsecond=0)
    for _ in range(5):
        await record(store, book, key, at, cost=7)
    await record(store, book, key, at + timedelta(milliseconds=1), cost=7)
    result = await store.prune_usage(book.now - timedelta(days=2), batch_rows=2)
    assert result.rows == 6 and result.batches == 2 and result.charged == 42
    (row,) = await store.usage_report((), UsageFilter())
    assert (row.requests, row.cost) == (6, 42)


async def test_a_row_at_the_boundary_is_kept(store: Store) -> None:
    book = Book(now=datetime.now(UTC))
    (key,) = await open_account(store, book, "ann@example.com")
    midnight = datetime.combine(book.now.date() - timedelta(days=2), datetime.min.time(), UTC)
    await record(store, book, key, midnight - timedelta(milliseconds=1), cost=1)
    await record(store, book, key, midnight, cost=2)
    result = await reports.prune(store, (midnight.date()).isoformat())
    assert (result.rows, result.charged) == (1, 1)
    assert result.first_day == result.last_day == midnight.date() - timedelta(days=1)
    rows = await store.usage_report(("day",), UsageFilter())
    assert [(r.group["day"], r.cost) for r in rows] == [
        ((midnight - timedelta(days=1)).date().isoformat(), 1), (midnight.date().isoformat(), 2)]


async def test_late_rows_in_a_folded_day_fold_into_the_same_aggregate(cli: Any, book: Book, store: Store,
                                                                      config_path: Path) -> None:
    cut = boundary(book, 3)
    await prune(cli, cut.isoformat())
    daily = counts(config_path)["usage_daily"]
    # a request settled late, dated in a day already folded, with the same user, key, model and outcome
    first = next(r for r in book.records if r.created_at.date() < cut and r.status == "ok")  # type: ignore
    model = first.model
    key = next(k for k in book.keys if k.id == first.key_id)
    await record(store, book, key, first.created_at + timedelta(seconds=1), model=model, cost=5,  # type: ignore
                 prompt=3, completion=4, latency=10)
    expected_totals = {by: additive(expected(book, by)) for by in GROUPINGS}
    assert {by: additive(rows) for by, rows in (await snapshot(cli)).items()} == expected_totals
    again = await prune(cli, cut.isoformat())
    assert again["rows_folded"] == 1 and again["daily_rows"] == daily  # added to the existing row
    assert {by: additive(rows) for by, rows in (await snapshot(cli)).items()} == expected_totals
    assert (await run(cli, "db", "check")).exit_code == 0


async def test_the_chart_and_the_statement_read_pruned_days(cli: Any, book: Book) -> None:
    chart = ok_json(await run(cli, "usage", "chart", "--days", str(DAYS), "--json"))
    statement = (await run(cli, "ledger", "ann@example.com", "--since", boundary(book, 5).isoformat(),
                           "--format", "csv")).stdout
    await prune(cli, boundary(book, 1).isoformat())
    assert ok_json(await run(cli, "usage", "chart", "--days", str(DAYS), "--json")) == chart
    assert (await run(cli, "ledger", "ann@example.com", "--since", boundary(book, 5).isoformat(),
                      "--format", "csv")).stdout.splitlines()[:-1] == statement.splitlines()[:-1]


async def test_interrupted_requests_are_folded_but_never_reported(cli: Any, book: Book, store: Store,
                                                                 config_path: Path) -> None:
    key = book.key(0)
    assert await store.hold(key.user_id, key.id, 100, "req-crashed", "demo") is not None
    assert len(await store.recover_holds()) == 1
    totals = await snapshot(cli)
    # date the interrupted row into a day that will be folded: it is folded, and still not reported
    with connect(database(config_path)) as db:
        db.execute("UPDATE usage SET created_at = created_at - ? WHERE status = 'interrupted'", (5 * 86_400_000,))
    result = await prune(cli, boundary(book, 3).isoformat())
    assert result["rows_folded"] == result["requests"] + 1
    with connect(database(config_path)) as db:
        assert db.execute("SELECT requests FROM usage_daily WHERE status = 'interrupted'").fetchall() == [(1,)]
    assert {by: additive(r) for by, r in (await snapshot(cli)).items()} == {
        by: additive(r) for by, r in totals.items()}


# -- refusals and the audit ----------------------------------------------------------------------


@pytest.mark.parametrize(("before", "says"), [
    ("today", "not a date"),
    ("2026-13-01", "not a date"),
    ("2026-01-01T00:00:00Z", "not a date"),
    ("yesterday-ish", "not a date"),
    ("0d", "not at least a day in the past"),
    ("999999d", "not a date"),
])
def test_prune_refuses_what_is_not_a_past_date(cli: Any, before: str, says: str) -> None:
    assert_one_line_error(cli("usage", "prune", "--before", before), says)


async def test_prune_refuses_today_and_the_future(cli: Any, book: Book, config_path: Path) -> None:
    state = counts(config_path)
    today = book.now.date()
    for day in (today, today + timedelta(days=1), date(2999, 1, 1)):
        assert_one_line_error(await run(cli, "usage", "prune", "--before", day.isoformat()),
                              "not at least a day in the past", (today - timedelta(days=1)).isoformat())
    assert counts(config_path) == state
    assert (await prune(cli, (today - timedelta(days=1)).isoformat()))["rows_folded"] > 0
    assert (await prune(cli, "1d"))["rows_folded"] == 0


def test_prune_requires_before(cli: Any) -> None:
    result = cli("usage", "prune")
    assert result.exit_code == 2 and "--before" in result.output


async def test_prune_is_in_the_admin_log(cli: Any, book: Book, store: Store) -> None:
    await prune(cli, boundary(book, 3).isoformat())
    (entry,) = [a for a in await store.admin_actions() if a.action == "usage.prune"]
    assert entry.actor == "cli" and entry.target == f"before:{boundary(book, 3).isoformat()}"
    assert entry.after and entry.after["rows_folded"] > 0


async def test_prune_refuses_rows_whose_charge_does_not_match(cli: Any, book: Book, config_path: Path) -> None:
    victim = next(r for r in book.records if r.charged > 1 and r.created_at.date() < boundary(book, 3))  # type: ignore
    with connect(database(config_path)) as db:
        db.execute("UPDATE usage SET charged = charged - 1 WHERE id = ?", (victim.id,))
    state = counts(config_path)
    assert_one_line_error(await run(cli, "usage", "prune", "--before", boundary(book, 3).isoformat()),
                          f"usage row {victim.id} does not match its ledger charge")
    assert counts(config_path) == state
    with connect(database(config_path)) as db:  # put it back: the books balance again
        db.execute("UPDATE usage SET charged = charged + 1 WHERE id = ?", (victim.id,))


async def test_the_audit_catches_tampering_with_folded_rows(cli: Any, book: Book, config_path: Path) -> None:
    await prune(cli, boundary(book, 3).isoformat())
    ann = next(uid for uid, email in book.emails.items() if email == "ann@example.com")
    with connect(database(config_path)) as db:
        row = db.execute("SELECT day, key_id, model, provider, status FROM usage_daily WHERE user_id = ? "
                         "AND charged > 1 LIMIT 1", (ann,)).fetchone()
        db.execute("UPDATE usage_daily SET charged = charged - 1 WHERE user_id = ? AND day = ? AND key_id = ? "
                   "AND model = ? AND provider = ? AND status = ?", (ann, *row))
    result = await run(cli, "db", "check")
    assert result.exit_code == 1
    assert f"user {ann}: the ledger has" in result.stderr and "daily aggregates" in result.stderr
    with connect(database(config_path)) as db:
        db.execute("UPDATE usage_daily SET charged = charged + 1 WHERE user_id = ? AND day = ? AND key_id = ? "
                   "AND model = ? AND provider = ? AND status = ?", (ann, *row))
    assert (await run(cli, "db", "check")).exit_code == 0


async def test_the_audit_catches_a_usage_row_deleted_without_a_fold(cli: Any, book: Book,
                                                                      config_path: Path) -> None:
    victim = next(r for r in book.records if r.charged > 0)
    with connect(database(config_path)) as db:
        saved = db.execute("SELECT * FROM usage WHERE id = ?", (victim.id,)).fetchone()
        db.execute("DELETE FROM usage WHERE id = ?", (victim.id,))
    result = await run(cli, "db", "check")
    assert result.exit_code == 1
    assert f"user {victim.user_id}: the ledger has 1 charges of {victim.charged} for usage rows no longer kept, " \
           "the daily aggregates 0 of 0" in result.stderr
    with connect(database(config_path)) as db:
        db.execute(f"INSERT INTO usage VALUES ({', '.join('?' * len(saved))})", saved)


# -- the migration -------------------------------------------------------------------------------


@pytest.mark.sqlite_only  # upgrades a SQLite file as 0002 left it; no PostgreSQL database is that old
async def test_the_migration_keeps_the_ledger_row_for_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # a database as 0002 left it, with money in it
        db.execute("CREATE TABLE _apibox_migrations (name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)")
        for migration in MIGRATIONS[:2]:
            for statement in _statements(migration.sqlite):
                db.execute(statement)
            db.execute("INSERT INTO _apibox_migrations VALUES (?, 0)", (migration.name,))
        db.execute("INSERT INTO users (id, email, created_at) VALUES (1, 'ann@example.com', 0)")
        db.execute("INSERT INTO balances (user_id, balance) VALUES (1, 9990)")
        db.execute("INSERT INTO api_keys (id, user_id, key_hash, prefix, created_at) VALUES (1, 1, 'h', 'p', 0)")
        db.execute("INSERT INTO usage (id, request_id, created_at, user_id, key_id, model, provider, endpoint, "
                   "status, http_status, cost, charged) "
                   "VALUES (7, 'r', 5, 1, 1, 'demo', 'echo', '', 'ok', 200, 10, 10)")
        db.execute("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor, reference) "
                   "VALUES (1, 1, 'topup', 10000, 10000, 'cli', 'R-1')")
        db.execute("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor, usage_id) "
                   "VALUES (1, 5, 'charge', -10, 9990, 'gateway', 7)")
        before = db.execute("SELECT * FROM ledger ORDER BY id").fetchall()
    store = await open_store(f"sqlite:///{path}")
    try:
        assert await store.pending_migrations() == []
        assert await store.audit() == []
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT * FROM ledger ORDER BY id").fetchall() == before
            assert db.execute("PRAGMA foreign_key_list(ledger)").fetchall()[0][2] == "users"
            assert all(fk[2] != "usage" for fk in db.execute("PRAGMA foreign_key_list(ledger)"))
            for sql in ("UPDATE ledger SET amount = 1", "DELETE FROM ledger"):
                with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                    db.execute(sql)
            with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
                db.execute("INSERT INTO ledger (user_id, created_at, kind, amount, balance_after, actor, reference) "
                           "VALUES (1, 9, 'topup', 1, 9991, 'cli', 'R-1')")
        result = await store.prune_usage(datetime(2000, 1, 1, tzinfo=UTC))
        assert (result.rows, result.charged) == (1, 10)
        assert await store.audit() == []
        (row,) = await store.usage_report((), UsageFilter())
        assert (row.requests, row.cost) == (1, 10)
    finally:
        await store.close()


def test_every_dimension_but_hour_is_kept() -> None:
    assert set(KEPT) | {"hour"} == set(SINGLE_DIMENSIONS)


async def test_store_prune_raises_store_error_on_a_mismatch(store: Store, config_path: Path) -> None:
    book = Book(now=datetime.now(UTC))
    (key,) = await open_account(store, book, "ann@example.com")
    good = await record(store, book, key, book.now - timedelta(days=5), cost=3)
    bad = await record(store, book, key, book.now - timedelta(days=4), cost=9)
    with connect(database(config_path)) as db:
        db.execute("UPDATE usage SET charged = 8 WHERE id = ?", (bad.id,))
    with pytest.raises(StoreError, match=f"usage row {bad.id}"):
        await store.prune_usage(book.now - timedelta(days=2), batch_rows=1)
    with connect(database(config_path)) as db:  # the batch before it was folded, this one not
        assert db.execute("SELECT id FROM usage ORDER BY id").fetchall() == [(bad.id,)]
        db.execute("UPDATE usage SET charged = 9 WHERE id = ?", (bad.id,))
    assert good.id != bad.id
    assert (await store.prune_usage(book.now - timedelta(days=2))).rows == 1
