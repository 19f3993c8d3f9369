"""The money commands: `apibox topup / adjust / balance / ledger`, and hostile input through the CLI.

Amounts are exact (no floats), a bad amount changes nothing, references make top-ups
idempotent, and the books balance after every test that moves money.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import pytest

from apibox.config import load_settings
from apibox.store.base import Store
from tests import dbquery
from tests.cli_helpers import assert_one_line_error, database, ok_json, run, tables
from tests.conftest import assert_books_balance, fund

USD = re.compile(r"^\d+\.\d{6}$")
BALANCE_KEYS = {"user_id", "email", "balance_usd", "held_usd", "available_usd"}
TABLES = {"users", "balances", "api_keys", "holds", "usage", "ledger", "_apibox_migrations"}


@pytest.fixture
def ann(cli: Any) -> int:
    """A user with a zero balance; returns the id."""
    return ok_json(cli("users", "create", "ann@example.com", "--json"))["id"]


def state(cli: Any, user: str = "ann@example.com") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What a failed command must not change: the balance and the ledger."""
    return ok_json(cli("balance", user, "--json")), ok_json(cli("ledger", user, "--json"))


# -- topup -----------------------------------------------------------------------------------


def test_topup_amounts_are_exact(cli: Any, ann: int, config_path: Path) -> None:
    results = [ok_json(cli("topup", "ann@example.com", amount, "--json")) for amount in ("10", "10.5", "0.000001")]
    assert [r["amount_usd"] for r in results] == ["10.000000", "10.500000", "0.000001"]
    assert [r["balance_usd"] for r in results] == ["10.000000", "20.500000", "20.500001"]
    assert all(r["created"] is True for r in results)
    balance = ok_json(cli("balance", "ann@example.com", "--json"))
    assert balance["balance_usd"] == balance["available_usd"] == "20.500001"
    # Micro-USD integers in the database, no float in sight.
    url = database(config_path)
    typeof, integer = {"sqlite": ("typeof(balance)", "integer"),
                       "postgresql": ("pg_typeof(balance)::text", "bigint")}[dbquery.engine(url)]
    assert dbquery.query(url, f"SELECT balance, {typeof} FROM balances")[0] == (20_500_001, integer)
    assert [r[0] for r in dbquery.query(url, "SELECT amount FROM ledger ORDER BY id")] == [10_000_000, 10_500_000, 1]
    assert_books_balance(config_path)


def test_topup_accepts_the_user_id_and_a_note(cli: Any, ann: int) -> None:
    result = ok_json(cli("topup", str(ann), "7.25", "--note", "invoice 17", "--json"))
    assert result["user_id"] == ann and result["email"] == "ann@example.com"
    entry = ok_json(cli("ledger", str(ann), "--json"))[0]
    assert entry["kind"] == "topup" and entry["note"] == "invoice 17" and entry["amount_usd"] == "7.250000"
    text = cli("topup", str(ann), "1")
    assert text.exit_code == 0 and "8.250000" in text.stdout


@pytest.mark.parametrize(("amount", "says"), [
    ("-5", "negative"), ("abc", "not an amount"), ("1e999", "too large"), ("0.0000001", "more than 6 decimals"),
    ("nan", "not a finite"), ("inf", "not a finite"), ("-inf", "not a finite"), ("0", "zero"), ("0.000000", "zero"),
    ("1000000001", "too large"), ("", "not an amount"), ("1,5", "not an amount"),
])
def test_topup_bad_amount_is_a_clear_error_and_changes_nothing(cli: Any, ann: int, amount: str, says: str) -> None:
    assert cli("topup", "ann@example.com", "3").exit_code == 0
    before = state(cli)
    line = assert_one_line_error(cli("topup", "ann@example.com", amount), says)
    assert repr(amount) in line  # it echoes what was typed
    assert state(cli) == before


def test_topup_with_a_reference_credits_once(cli: Any, ann: int, config_path: Path) -> None:
    first = ok_json(cli("topup", "ann@example.com", "5", "--reference", "stripe_pi_123", "--json"))
    second = ok_json(cli("topup", "ann@example.com", "5", "--reference", "stripe_pi_123", "--json"))
    assert first["created"] is True and second["created"] is False
    assert second["ledger_id"] == first["ledger_id"]
    assert second["balance_usd"] == "5.000000"
    text = cli("topup", "ann@example.com", "5", "--reference", "stripe_pi_123")
    assert text.exit_code == 0 and "already credited" in text.stdout
    balance, ledger = state(cli)
    assert balance["balance_usd"] == "5.000000"
    assert len(ledger) == 1 and ledger[0]["reference"] == "stripe_pi_123"
    assert_books_balance(config_path)


def test_a_reference_reused_with_another_amount_or_user_is_refused(cli: Any, ann: int) -> None:
    ok_json(cli("users", "create", "bob@example.com", "--json"))
    assert cli("topup", "ann@example.com", "5", "--reference", "R1").exit_code == 0
    before = state(cli)
    assert_one_line_error(cli("topup", "ann@example.com", "6", "--reference", "R1"), "R1", "already used")
    assert_one_line_error(cli("topup", "bob@example.com", "5", "--reference", "R1"), "already used")
    assert state(cli) == before
    assert state(cli, "bob@example.com")[0]["balance_usd"] == "0.000000"


def test_topup_rejects_an_empty_reference(cli: Any, ann: int) -> None:
    assert_one_line_error(cli("topup", "ann@example.com", "5", "--reference", "  "), "reference")
    assert state(cli)[1] == []


# -- adjust ----------------------------------------------------------------------------------


def test_adjust_down_and_up(cli: Any, ann: int, config_path: Path) -> None:
    assert cli("topup", "ann@example.com", "10").exit_code == 0
    down = ok_json(cli("adjust", "ann@example.com", "-2.50", "--note", "refund of a double charge", "--json"))
    assert down["amount_usd"] == "-2.500000" and down["balance_usd"] == "7.500000"
    up = ok_json(cli("adjust", "ann@example.com", "0.25", "--note", "goodwill", "--json"))
    assert up["balance_usd"] == "7.750000"
    ledger = ok_json(cli("ledger", "ann@example.com", "--json"))
    assert [(e["kind"], e["amount_usd"], e["balance_after_usd"]) for e in ledger] == [
        ("topup", "10.000000", "10.000000"), ("adjustment", "-2.500000", "7.500000"),
        ("adjustment", "0.250000", "7.750000")]
    assert ledger[1]["note"] == "refund of a double charge"
    assert_books_balance(config_path)


def test_adjust_cannot_go_below_zero(cli: Any, ann: int) -> None:
    assert cli("topup", "ann@example.com", "10").exit_code == 0
    before = state(cli)
    assert_one_line_error(cli("adjust", "ann@example.com", "-10.000001", "--note", "too much"), "below zero")
    assert state(cli) == before
    # Exactly to zero is fine.
    assert ok_json(cli("adjust", "ann@example.com", "-10", "--note", "all of it", "--json"))["balance_usd"] == (
        "0.000000")


@pytest.mark.parametrize("note", [None, "", "   "])
def test_adjust_requires_a_note(cli: Any, ann: int, note: str | None) -> None:
    assert cli("topup", "ann@example.com", "10").exit_code == 0
    before = state(cli)
    args = ["adjust", "ann@example.com", "-1"] + ([] if note is None else ["--note", note])
    assert_one_line_error(cli(*args), "note")
    assert state(cli) == before


@pytest.mark.parametrize("amount", ["0", "abc", "nan", "-1e999", "0.0000001"])
def test_adjust_rejects_bad_amounts(cli: Any, ann: int, amount: str) -> None:
    assert cli("topup", "ann@example.com", "10").exit_code == 0
    before = state(cli)
    assert_one_line_error(cli("adjust", "ann@example.com", amount, "--note", "x"))
    assert state(cli) == before


async def test_adjust_cannot_take_money_held_for_requests_in_flight(store: Store, cli: Any,
                                                                    config_path: Path) -> None:
    settings = load_settings(str(config_path))
    await fund(store, settings, "ann@example.com", "10")
    user = await store.find_user_by_email("ann@example.com")
    assert user is not None
    key = (await store.list_keys(user.id))[0]
    hold = await store.hold(user.id, key.id, 4_000_000, "req-1", "demo")
    assert hold is not None
    shown = ok_json(await run(cli, "balance", "ann@example.com", "--json"))
    assert (shown["balance_usd"], shown["held_usd"], shown["available_usd"]) == ("10.000000", "4.000000",
                                                                               "6.000000")
    refused = await run(cli, "adjust", "ann@example.com", "-6.000001", "--note", "x")
    assert_one_line_error(refused, "held")
    done = ok_json(await run(cli, "adjust", "ann@example.com", "-6", "--note", "x", "--json"))
    assert (done["balance_usd"], done["held_usd"], done["available_usd"]) == ("4.000000", "4.000000", "0.000000")


# -- balance and ledger ------------------------------------------------------------------------


def test_balance_json_shape(cli: Any, ann: int) -> None:
    assert cli("topup", "ann@example.com", "9.99985").exit_code == 0
    balance = ok_json(cli("balance", "ann@example.com", "--json"))
    assert set(balance) == BALANCE_KEYS
    assert balance == {"user_id": ann, "email": "ann@example.com", "balance_usd": "9.999850",
                       "held_usd": "0.000000", "available_usd": "9.999850"}
    for field in ("balance_usd", "held_usd", "available_usd"):
        assert USD.match(balance[field])
    topup = ok_json(cli("topup", "ann@example.com", "1", "--json"))
    adjust = ok_json(cli("adjust", "ann@example.com", "-1", "--note", "x", "--json"))
    assert set(topup) >= BALANCE_KEYS and set(adjust) >= BALANCE_KEYS


def test_balance_text(cli: Any, ann: int) -> None:
    assert cli("topup", "ann@example.com", "2").exit_code == 0
    text = cli("balance", "ann@example.com")
    assert text.exit_code == 0
    assert "ann@example.com" in text.stdout and "2.000000" in text.stdout


def test_ledger_formats(cli: Any, ann: int) -> None:
    assert "No ledger entries" in cli("ledger", "ann@example.com").stdout
    assert ok_json(cli("ledger", "ann@example.com", "--json")) == []
    cli("topup", "ann@example.com", "10", "--note", "first", "--reference", "R-1")
    cli("adjust", "ann@example.com", "-0.5", "--note", "second")
    entries = ok_json(cli("ledger", "ann@example.com", "--json"))
    assert entries == ok_json(cli("ledger", "ann@example.com", "--format", "json"))
    assert [e["amount_usd"] for e in entries] == ["10.000000", "-0.500000"]
    assert [e["balance_after_usd"] for e in entries] == ["10.000000", "9.500000"]
    assert entries[0]["reference"] == "R-1" and entries[0]["actor"] == "cli"
    rows = list(csv.DictReader(io.StringIO(cli("ledger", "ann@example.com", "--format", "csv").stdout)))
    assert [r["amount_usd"] for r in rows] == ["10.000000", "-0.500000"]
    assert [r["note"] for r in rows] == ["first", "second"]
    assert rows[0]["id"] == str(entries[0]["id"])
    table = cli("ledger", "ann@example.com")
    assert table.exit_code == 0
    assert "10.000000" in table.stdout and "-0.500000" in table.stdout and "9.500000" in table.stdout


@pytest.mark.parametrize("note", ["=cmd|'/c calc'!A1", "+1+1", "-2+3", "@SUM(A1)"])
def test_ledger_csv_cells_never_open_as_formulas(cli: Any, ann: int, note: str) -> None:
    cli("topup", "ann@example.com", "10", "--note", note, "--reference", note)
    cli("adjust", "ann@example.com", "-0.5", "--note", "fine")
    rows = list(csv.DictReader(io.StringIO(cli("ledger", "ann@example.com", "--format", "csv").stdout)))
    assert [(r["note"], r["reference"]) for r in rows] == [("'" + note, "'" + note), ("fine", "")]
    assert [r["amount_usd"] for r in rows] == ["10.000000", "-0.500000"]  # numbers stay numbers


def test_ledger_since(cli: Any, ann: int) -> None:
    cli("topup", "ann@example.com", "1")
    assert len(ok_json(cli("ledger", "ann@example.com", "--since", "1h", "--json"))) == 1
    assert ok_json(cli("ledger", "ann@example.com", "--since", "2099-01-01", "--json")) == []
    assert_one_line_error(cli("ledger", "ann@example.com", "--since", "last tuesday"), "not a date")
    assert_one_line_error(cli("ledger", "ann@example.com", "--since", "999999w"), "too far")


def test_ledger_rejects_an_unknown_format(cli: Any, ann: int) -> None:
    assert_one_line_error(cli("ledger", "ann@example.com", "--format", "xml"), "--format")


# -- hostile input through the CLI -------------------------------------------------------------


def test_sql_shaped_email_with_spaces_is_rejected_and_harmless(cli: Any, config_path: Path) -> None:
    assert_one_line_error(cli("users", "create", "x'); DROP TABLE users;--@a.b"), "not an email")
    assert tables(config_path) >= TABLES
    assert ok_json(cli("users", "list", "--json")) == []


def test_sql_shaped_email_is_stored_verbatim(cli: Any, config_path: Path) -> None:
    email = "x');drop/**/table/**/users;--@a.b"
    created = ok_json(cli("users", "create", email, "--json"))
    assert created["email"] == email
    assert ok_json(cli("users", "show", email, "--json"))["id"] == created["id"]
    assert ok_json(cli("topup", email, "1", "--json"))["balance_usd"] == "1.000000"
    assert tables(config_path) >= TABLES
    assert [u["email"] for u in ok_json(cli("users", "list", "--json"))] == [email]


def test_quotes_and_sql_in_notes_names_and_references_are_stored_as_typed(cli: Any, ann: int,
                                                                           config_path: Path) -> None:
    note = """O'Brien said "hi"; DROP TABLE ledger;-- [bold]not markup[/bold] \\ %s ?"""
    name = "Robert'); DELETE FROM balances;--"
    reference = "ref' OR '1'='1"
    assert cli("users", "update", "ann@example.com", "--name", name).exit_code == 0
    assert cli("topup", "ann@example.com", "5", "--note", note, "--reference", reference).exit_code == 0
    assert cli("adjust", "ann@example.com", "-1", "--note", note).exit_code == 0
    entries = ok_json(cli("ledger", "ann@example.com", "--json"))
    assert [e["note"] for e in entries] == [note, note]
    assert entries[0]["reference"] == reference
    assert ok_json(cli("users", "show", "ann@example.com", "--json"))["name"] == name
    # Printed as typed: no rich markup interpretation, nothing lost.
    table = cli("ledger", "ann@example.com")
    assert "[bold]not markup[/bold]" in table.stdout
    # A different reference that SQL-injection would have matched is a new credit, not a replay.
    other = ok_json(cli("topup", "ann@example.com", "5", "--reference", "anything", "--json"))
    assert other["created"] is True and other["balance_usd"] == "9.000000"
    assert tables(config_path) >= TABLES
    assert_books_balance(config_path)


def test_sql_shaped_user_references_find_nobody(cli: Any, ann: int) -> None:
    cli("topup", "ann@example.com", "5")
    for ref in ("1 OR 1=1", "' OR '1'='1' --@x.y", "1; DROP TABLE users"):
        assert_one_line_error(cli("balance", ref), "no user")
    assert ok_json(cli("balance", str(ann), "--json"))["balance_usd"] == "5.000000"
