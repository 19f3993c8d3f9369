"""Turning domain objects into tables for the terminal (their JSON shapes live in ``apibox.views``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.table import Table

from apibox.models import ApiKey, LedgerEntry, UserOverview
from apibox.money import format_usd

GAP = "   "  # between two columns: a cell's padding, the (blank) rule, the next cell's padding
HEADER, TITLE = Style(bold=True), Style(italic=True)


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


class PlainTable:
    """A table as rich draws one with ``box.SIMPLE_HEAD`` (a bold header over a rule, no borders), laid
    out here when it fits the console: rich measures, wraps and styles every cell (about 0.1 ms a
    cell, so a statement of 40,000 entries took 36 s to print). A table wider than the console goes
    to rich's ``Table`` after all, which folds the text columns; so does one with a character that is
    not plainly printable in a cell (a line break, a tab, an escape), which rich handles its way.
    Either way a cell prints as rich prints it from the CLI's consoles: no markup, no emoji."""

    def __init__(self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                 right: Iterable[str] = ()) -> None:
        self.title, self.columns, self.right = title, list(columns), set(right)
        self.rows = [["-" if cell is None else str(cell) for cell in row] for row in rows]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # a text column is at least as wide as its name has characters (up to 10), as rich's is given
        widths = [max(_width(column), 0 if column in self.right else min(len(column), 10)) for column in self.columns]
        printable = all(column.isprintable() for column in self.columns)
        for row in self.rows:
            for index, cell in enumerate(row):
                widths[index] = max(widths[index], _width(cell))
                printable = printable and cell.isprintable()
        inner = sum(widths) + len(GAP) * (len(widths) - 1)
        title = self.title or ""
        if not (printable and title.isprintable()) or min(widths) == 0 or _width(title) > inner + 2 \
                or inner + 2 > options.max_width:
            yield self._rich_table()
            return
        blank = " " * (inner + 2) + "\n"
        if self.title is not None:
            yield Segment(_pad(self.title, inner + 2, False), TITLE)
            yield Segment("\n")
        yield Segment(blank)
        yield Segment(" ")
        yield Segment(self._line(self.columns, widths), HEADER)
        yield Segment(" \n " + "─" * inner + " \n")
        for row in self.rows:  # a segment a line: the console splits its output into lines
            yield Segment(f" {self._line(row, widths)} \n")
        yield Segment(blank)

    def _line(self, cells: Sequence[str], widths: Sequence[int]) -> str:
        return GAP.join(_pad(cell, width, column in self.right)
                        for cell, width, column in zip(cells, widths, self.columns, strict=True))

    def _rich_table(self) -> Table:
        grid = Table(title=self.title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                     pad_edge=False)
        for column in self.columns:
            # Numbers never wrap (a folded amount misleads); text folds when the terminal is narrow.
            numeric = column in self.right
            grid.add_column(column, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold",
                            min_width=None if numeric else min(len(column), 10))
        for row in self.rows:
            grid.add_row(*row)
        return grid


def _width(text: str) -> int:
    return len(text) if text.isascii() else cell_len(text)


def _pad(text: str, width: int, right: bool) -> str:
    if right:  # as rich justifies to the right: trailing spaces go, the width they took stays
        text = text.rstrip()
        return " " * (width - _width(text)) + text
    return text + " " * (width - _width(text))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          right: Iterable[str] = ()) -> PlainTable:
    return PlainTable(title, columns, rows, right)


def users_table(overviews: list[UserOverview]) -> PlainTable:
    return table(None, ["id", "email", "name", "group", "state", "balance", "held", "keys"],
                 ([o.user.id, o.user.email, o.user.name, o.user.group, o.user.state.value,
                   format_usd(o.balance.balance), format_usd(o.balance.held), o.key_count] for o in overviews),
                 right=("id", "balance", "held", "keys"))


def keys_table(keys: list[ApiKey]) -> PlainTable:
    return table(None, ["id", "user", "name", "prefix", "status", "models", "budget", "spent", "expires"],
                 ([k.id, k.user_id, k.name, k.prefix, k.status, ",".join(k.models) or "all",
                   format_usd(k.budget) if k.budget is not None else "-", format_usd(k.spent),
                   when(k.expires_at)] for k in keys), right=("id", "user", "budget", "spent"))


def ledger_table(entries: list[LedgerEntry]) -> PlainTable:
    return table(None, ["id", "time (UTC)", "kind", "amount", "balance after", "note", "reference", "by"],
                 ([e.id, when(e.created_at), e.kind.value, format_usd(e.amount), format_usd(e.balance_after),
                   e.note, e.reference, e.actor] for e in entries), right=("id", "amount", "balance after"))
