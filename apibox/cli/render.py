"""Turning domain objects into rich tables and into the JSON shapes scripts rely on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.table import Table

from apibox.models import ApiKey, Balance, LedgerEntry, User, UserOverview
from apibox.money import format_usd


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "name": user.name, "group": user.group, "state": user.state.value,
            "state_reason": user.state_reason, "created_at": iso(user.created_at)}


def balance_json(user: User, balance: Balance) -> dict[str, Any]:
    return {"user_id": user.id, "email": user.email, "balance_usd": format_usd(balance.balance),
            "held_usd": format_usd(balance.held), "available_usd": format_usd(balance.available)}


def key_json(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "user_id": key.user_id, "name": key.name, "prefix": key.prefix, "status": key.status,
            "models": list(key.models), "budget_usd": format_usd(key.budget) if key.budget is not None else None,
            "spent_usd": format_usd(key.spent), "expires_at": iso(key.expires_at), "rpm": key.rpm, "tpm": key.tpm,
            "concurrency": key.concurrency, "allow_ips": list(key.allow_ips), "created_at": iso(key.created_at),
            "last_used_at": iso(key.last_used_at), "revoked_at": iso(key.revoked_at)}


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    return {"id": entry.id, "created_at": iso(entry.created_at), "kind": entry.kind.value,
            "amount_usd": format_usd(entry.amount), "balance_after_usd": format_usd(entry.balance_after),
            "note": entry.note, "reference": entry.reference, "actor": entry.actor, "usage_id": entry.usage_id}


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          right: Iterable[str] = ()) -> Table:
    aligned = set(right)
    grid = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        # Numbers never wrap (a folded amount misleads); text folds when the terminal is narrow.
        numeric = column in aligned
        grid.add_column(column, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold",
                        min_width=None if numeric else min(len(column), 10))
    for row in rows:
        grid.add_row(*("-" if cell is None else str(cell) for cell in row))
    return grid


def users_table(overviews: list[UserOverview]) -> Table:
    return table(None, ["id", "email", "name", "group", "state", "balance", "held", "keys"],
                 ([o.user.id, o.user.email, o.user.name, o.user.group, o.user.state.value,
                   format_usd(o.balance.balance), format_usd(o.balance.held), o.key_count] for o in overviews),
                 right=("id", "balance", "held", "keys"))


def keys_table(keys: list[ApiKey]) -> Table:
    return table(None, ["id", "user", "name", "prefix", "status", "models", "budget", "spent", "expires"],
                 ([k.id, k.user_id, k.name, k.prefix, k.status, ",".join(k.models) or "all",
                   format_usd(k.budget) if k.budget is not None else "-", format_usd(k.spent),
                   when(k.expires_at)] for k in keys), right=("id", "user", "budget", "spent"))


def ledger_table(entries: list[LedgerEntry]) -> Table:
    return table(None, ["id", "time (UTC)", "kind", "amount", "balance after", "note", "reference", "by"],
                 ([e.id, when(e.created_at), e.kind.value, format_usd(e.amount), format_usd(e.balance_after),
                   e.note, e.reference, e.actor] for e in entries), right=("id", "amount", "balance after"))
