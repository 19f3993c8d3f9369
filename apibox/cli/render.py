"""Turning domain objects into rich tables (their JSON shapes live in ``apibox.views``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.table import Table

from apibox.models import ApiKey, LedgerEntry, UserOverview
from apibox.money import format_usd


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


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
