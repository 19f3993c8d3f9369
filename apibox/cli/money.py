"""`apibox topup / adjust / balance / ledger`: the money commands."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer

from apibox import accounts
from apibox.cli.common import ConfigOption, JsonOption, console, fail, handles_errors, print_json, with_store
from apibox.cli.render import ledger_table
from apibox.models import Balance, User
from apibox.money import format_usd
from apibox.store.base import CreditResult
from apibox.timeparse import TimeParseError, parse_since
from apibox.views import balance_json, entry_json

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
           output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """A user's statement: every top-up, charge and adjustment with the balance after it."""
    if output not in ("table", "csv", "json"):
        raise fail(f"--format must be table, csv or json, not {output!r}")
    try:
        start = parse_since(since, datetime.now(UTC)) if since else None
    except TimeParseError as exc:
        raise fail(str(exc)) from None
    found, entries = with_store(config, lambda store, _: accounts.ledger(store, user, start))
    if as_json or output == "json":
        print_json([entry_json(e) for e in entries])
    elif output == "csv":
        writer = csv.writer(sys.stdout)
        rows = [entry_json(e) for e in entries]
        writer.writerow(rows[0].keys() if rows else ["id"])
        writer.writerows(r.values() for r in rows)
    elif not entries:
        console.print(f"No ledger entries for {found.email}.")
    else:
        console.print(ledger_table(entries))


def register(app: typer.Typer) -> None:
    # Amounts may be negative (adjust -2.50): let "-2.50" reach the argument instead of
    # being taken for an unknown option.
    signed = {"ignore_unknown_options": True, "allow_interspersed_args": True}
    for command in (topup, adjust, balance, ledger):
        settings = signed if command in (topup, adjust) else {}
        app.command(command.__name__, context_settings=settings)(handles_errors(command))
