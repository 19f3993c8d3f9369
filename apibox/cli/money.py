"""`apibox topup / adjust / balance / ledger`: the money commands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from apibox import accounts, reports
from apibox.cli.common import (
    ConfigOption,
    JsonOption,
    console,
    fail,
    handles_errors,
    print_json,
    print_table,
    with_store,
    write_csv,
)
from apibox.cli.render import ledger_table
from apibox.models import Balance, User
from apibox.money import format_usd
from apibox.store.base import CreditResult
from apibox.views import balance_json, entry_json, iso

UserArg = Annotated[str, typer.Argument(help="The user's email or id.", show_default=False)]


def _print_balance(user: User, balance: Balance, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        print_json({**balance_json(user, balance), **(extra or {})})
    else:
        console.print(f"{user.email}: balance {format_usd(balance.balance)} USD, held {format_usd(balance.held)}, "
                      f"available {format_usd(balance.available)}")


def _print_credit(user: User, result: CreditResult, as_json: bool) -> None:
    extra = {"ledger_id": result.entry.id, "amount_usd": format_usd(result.entry.amount),
             "reference": result.entry.reference, "created": result.created}
    if not as_json:
        if result.created:
            console.print(f"{result.entry.kind.value}: {format_usd(result.entry.amount)} USD "
                          f"(ledger entry {result.entry.id})")
        else:
            console.print(f"Reference {result.entry.reference!r} was already credited (ledger entry "
                          f"{result.entry.id}); nothing changed.")
    _print_balance(user, result.balance, as_json, extra)


def topup(user: UserArg,
          amount: Annotated[str, typer.Argument(help="USD to credit, e.g. 10 or 10.50 (at most 6 decimals).")],
          note: Annotated[str, typer.Option("--note", help="Shown in the ledger.")] = "",
          reference: Annotated[str | None, typer.Option(
              "--reference", help="Your payment id; the same reference twice credits once.")] = None,
          config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Credit a user's prepaid balance."""
    async def action(store, _):
        found = await accounts.resolve_user(store, user)
        return found, await accounts.topup(store, user, amount, note=note, reference=reference)
    found, result = with_store(config, action)
    _print_credit(found, result, as_json)


def adjust(user: UserArg,
           amount: Annotated[str, typer.Argument(help="Signed USD, e.g. -2.50 or 1.", show_default=False)],
           note: Annotated[str, typer.Option("--note", help="Why (required).")] = "",
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Correct a balance up or down; it can never go below zero."""
    async def action(store, _):
        found = await accounts.resolve_user(store, user)
        return found, await accounts.adjust(store, user, amount, note=note)
    found, result = with_store(config, action)
    _print_credit(found, result, as_json)


def balance(user: UserArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show a user's balance, the amount held for requests in flight, and what is available."""
    found, current = with_store(config, lambda store, _: accounts.balance(store, user))
    _print_balance(found, current, as_json)


def ledger(user: UserArg,
           since: Annotated[str | None, typer.Option("--since", help="From a date or a duration ago (7d).")] = None,
           until: Annotated[str | None, typer.Option("--until", help="Up to (not including) a date or a duration "
                                                     "ago.")] = None,
           output: Annotated[str, typer.Option("--format", help="table, csv or json. For a period (--since/"
                                               "--until), table and csv add the opening and the closing "
                                               "balance; json stays the list of entries.")] = "table",
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """A user's statement: every top-up, charge and adjustment with the balance after it."""
    if output not in ("table", "csv", "json"):
        raise fail(f"--format must be table, csv or json, not {output!r}")
    found = with_store(config, lambda store, _: reports.statement(store, user, since, until))
    entries = found.entries
    if as_json or output == "json":
        print_json([entry_json(e) for e in entries])
    elif output == "csv":
        rows = [entry_json(e) for e in entries]
        columns = list(rows[0]) if rows else LEDGER_CSV_COLUMNS
        opening = [_balance_line(columns, "opening", found.since, found.opening)] if found.is_period else []
        closing = [_balance_line(columns, "closing", found.until or datetime.now(UTC), found.closing)
                   ] if found.is_period else []
        write_csv([columns, *opening, *([r[c] for c in columns] for r in rows), *closing])
    else:
        if found.is_period:
            console.print(f"{found.user.email}: opening balance {format_usd(found.opening or 0)} USD "
                          f"at {_when(found.since)}")
        if entries:
            print_table(ledger_table(entries))
        else:
            console.print(f"No ledger entries for {found.user.email}" + (" in the period." if found.is_period
                                                                        else "."))
        if found.is_period:
            console.print(f"{found.user.email}: closing balance {format_usd(found.closing or 0)} USD "
                          f"at {_when(found.until or datetime.now(UTC))}")


LEDGER_CSV_COLUMNS = ["id", "created_at", "kind", "amount_usd", "balance_after_usd", "note", "reference", "actor",
                      "usage_id"]


def _when(moment: datetime | None) -> str:
    return "the beginning" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _balance_line(columns: list[str], kind: str, moment: datetime | None, amount: int | None) -> list[str]:
    """A statement's opening or closing line in the csv's own columns."""
    values = {"created_at": iso(moment) or "", "kind": kind, "balance_after_usd": format_usd(amount or 0),
              "note": f"{kind} balance"}
    return [values.get(c, "") for c in columns]


def register(app: typer.Typer) -> None:
    # Amounts may be negative (adjust -2.50): let "-2.50" reach the argument instead of
    # being taken for an unknown option.
    signed = {"ignore_unknown_options": True, "allow_interspersed_args": True}
    for command in (topup, adjust, balance, ledger):
        settings = signed if command in (topup, adjust) else {}
        app.command(command.__name__, context_settings=settings)(handles_errors(command))
