"""Turning domain objects into tables for the terminal (their JSON shapes live in ``apibox.views``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from itertools import chain, repeat
from typing import Any

from rich import box
from rich._ratio import ratio_reduce
from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from apibox.models import ApiKey, LedgerEntry, UserOverview
from apibox.money import format_usd
from apibox.plaintext import escaped

GAP = "   "  # between two columns: a cell's padding, the (blank) rule, the next cell's padding
HEADER, TITLE = Style(bold=True), Style(italic=True)


def when(moment: datetime | None) -> str:
    """``2026-11-27 13:06:44``, or ``-`` for no moment (``isoformat`` takes half ``strftime``'s time,
    which a 40,000-entry statement pays once an entry)."""
    return moment.isoformat(" ", "seconds")[:19] if moment else "-"


class PlainTable:
    """A table as rich draws one with ``box.SIMPLE_HEAD`` (a bold header over a rule, no borders), laid
    out here: rich measures, wraps and styles every cell (about 0.1 ms a cell, so a statement of
    40,000 entries took 36 s to print). The widths are rich's: each column as wide as its widest
    cell, a text column at least as wide as its name has characters (up to 10); when that is wider
    than the console, the text columns give up width (rich's ``Table._collapse_widths``), then every
    column if need be (rich's ``ratio_reduce``), and a cell too long for its column is wrapped, or a
    number cut, by rich's own ``Text.wrap``. What that does not cover goes to rich's ``Table`` after
    all: a cell with a character that is not plainly printable (a zero-width joiner, say), a
    column with no room or nothing to show, a title wider than the table, a table still too wide
    with other than ASCII in it (the console's cropping could differ). A test holds the two to the
    same text. Either way a cell prints as rich prints it from the CLI's consoles: no markup, no
    emoji, and its control characters (a line break, a tab, an escape) written out, not sent."""

    def __init__(self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                 right: Iterable[str] = ()) -> None:
        self.title = None if title is None else _shown(title)
        self.columns, self.right = list(columns), set(right)
        self.rows = [["-" if cell is None else str(cell) for cell in row] for row in rows]
        self.printable = all(map(str.isprintable, chain(self.columns, chain.from_iterable(self.rows))))
        if not self.printable:  # control characters written out; anything else unprintable leaves it to rich
            self.rows = [[_shown(cell) for cell in row] for row in self.rows]
            self.printable = all(map(str.isprintable, chain(self.columns, chain.from_iterable(self.rows))))
        self.flush_right = [column in self.right for column in self.columns]
        # By column, the header's cell first: whether all is ASCII (a character a cell), the widest,
        # and whether a cell ends in a space (which rich drops from a right-justified one).
        by_column = list(zip(self.columns, *self.rows, strict=True))
        self.ascii = [all(map(str.isascii, cells)) for cells in by_column]
        self.longest = [max(map(len if ascii else _width, cells))
                        for ascii, cells in zip(self.ascii, by_column, strict=True)]
        self.trailing_space = [any(map(str.endswith, cells, repeat(" "))) for cells in by_column]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The table's lines, each at most ``options.max_width`` wide: cropped here when they would be
        wider, as the console crops what it prints, so that it can be printed with ``crop=False``
        (``cli.common.print_table``), which spares the console measuring every line again."""
        widths = self._widths(options.max_width)
        inner = sum(widths) + len(GAP) * (len(widths) - 1) if widths else 0
        title = self.title or ""
        if not widths or not title.isprintable() or _width(title) > inner + 2:
            yield from _cropped(console.render(self._rich_table(), options), options.max_width)
        elif inner + 2 <= options.max_width:
            yield from self._drawn(console, widths, inner)
        else:
            yield from _cropped(self._drawn(console, widths, inner), options.max_width)

    def _drawn(self, console: Console, widths: list[int], inner: int) -> Iterator[Segment]:
        """The table laid out in ``widths``: a segment a line, or a few (the header's are bold)."""
        blank = " " * (inner + 2) + "\n"
        if self.title is not None:
            yield Segment(_pad(self.title, inner + 2, False), TITLE)
            yield Segment("\n")
        yield Segment(blank)
        for line in self._lines(console, self.columns, widths, bottom=True):
            yield Segment(" ")
            yield Segment(line, HEADER)
            yield Segment(" \n")
        yield Segment(" " + "─" * inner + " \n")
        line = self._line_format(widths)
        if line is not None:  # every cell fits its column, and is ASCII: one format a row
            for row in self.rows:
                yield Segment(line.format(*row))
        else:
            for row in self.rows:
                for text in self._lines(console, row, widths):
                    yield Segment(f" {text} \n")
        yield Segment(blank)

    def _line_format(self, widths: Sequence[int]) -> str | None:
        """A row's line as one ``str.format`` pattern, when every cell fits its column unwrapped and
        pads as str's own justification pads it (ASCII, and no trailing space in a right-justified
        cell, which rich drops); else None."""
        if not all(self.ascii) or any(longest > width for longest, width in zip(self.longest, widths, strict=True)):
            return None
        if any(flush and trailing for flush, trailing in zip(self.flush_right, self.trailing_space, strict=True)):
            return None
        fields = (f"{{:{'>' if flush else '<'}{width}}}" for flush, width in zip(self.flush_right, widths, strict=True))
        return " " + GAP.join(fields) + " \n"

    def _widths(self, max_width: int) -> list[int] | None:
        """Each column's width inside its padding, as rich's ``Table`` works them out for
        ``max_width``; None where this table leaves the layout to rich."""
        if not self.printable:
            return None
        count = len(self.columns)
        pads = [(index > 0) + (index < count - 1) for index in range(count)]  # pad_edge=False
        longest = self.longest
        least = [self._least(column) for column in self.columns]
        widths = [max(longest[index], least[index]) for index in range(count)]
        room = max_width - (count - 1) - 2  # the edges and the (blank) rules between columns
        if sum(widths) + sum(pads) <= room:
            return widths if min(widths) > 0 else None
        # Too wide: rich's way, measured with padding. Each column at most the room, then the text
        # columns shrink, then every column is measured again within its new width.
        if room - max(pads) < 1 or min(longest) == 0:  # no room at all, or a column of nothing to see
            return None
        padded = [max(min(longest[i] + pads[i], room), least[i] + pads[i]) or 1 for i in range(count)]
        padded = Table._collapse_widths(padded, [not flush for flush in self.flush_right], room)
        if sum(padded) > room:  # still too wide: every column gives up some, numbers too (and are cut)
            padded = ratio_reduce(sum(padded) - room, [1] * count, padded, padded)
        if any(padded[i] - pads[i] < 1 for i in range(count)):  # a column with no room for text at all
            return None
        widths = [max(min(longest[i] + pads[i], padded[i]), least[i] + pads[i]) - pads[i] for i in range(count)]
        if min(widths) < 1:
            return None
        if sum(widths) + sum(pads) > room and not all(self.ascii):
            return None  # still too wide, as rich's is, so the console crops it: rich's way, unless all ASCII
        return widths

    def _lines(self, console: Console, cells: Sequence[str], widths: Sequence[int], bottom: bool = False) -> list[str]:
        """One row's lines: each cell padded to its column, or wrapped by rich when longer; a shorter
        cell at the top of the row, or at the bottom (``bottom``: the header's, as rich's)."""
        wrapped = []
        for cell, width, right in zip(cells, widths, self.flush_right, strict=True):
            if _width(cell) <= width:
                wrapped.append([_pad(cell, width, right)])
            else:  # rich justifies the lines it wraps; a number too long for its column is cut
                lines = Text(cell).wrap(console, width, justify="right" if right else "left", overflow="fold",
                                        no_wrap=right)
                wrapped.append([set_cell_size(line.plain, width) for line in lines])
        height = max(len(lines) for lines in wrapped)
        for index, width in enumerate(widths):
            blank = [" " * width] * (height - len(wrapped[index]))
            wrapped[index] = blank + wrapped[index] if bottom else wrapped[index] + blank
        return [GAP.join(lines[row] for lines in wrapped) for row in range(height)]

    def _rich_table(self) -> Table:
        grid = Table(title=self.title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                     pad_edge=False)
        for column in self.columns:
            # Numbers never wrap (a folded amount misleads); text folds when the terminal is narrow.
            numeric = column in self.right
            grid.add_column(column, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold",
                            min_width=self._least(column) or None)
        for row in self.rows:
            grid.add_row(*row)
        return grid

    def _least(self, column: str) -> int:
        """A column's least width: a text column's, so that its name does not fold into pieces (at most
        10, in characters, as rich's ``min_width`` counts them); none for a number's, which never folds."""
        return 0 if column in self.right else min(len(column), 10)


def _cropped(segments: Iterable[Segment], width: int) -> Iterator[Segment]:
    """``segments`` with each line cut to ``width`` cells, as ``Console.print`` cuts them."""
    for line in Segment.split_and_crop_lines(segments, width, pad=False):
        yield from line


def _shown(text: str) -> str:
    """A cell as it may reach the terminal: control characters written out (``apibox.plaintext``)."""
    return text if text.isprintable() else escaped(text)


def _width(text: str) -> int:
    return len(text) if text.isascii() else cell_len(text)


def _pad(text: str, width: int, right: bool) -> str:
    if right:  # as rich justifies to the right: trailing spaces go, the width they took stays
        text = text.rstrip()
    if text.isascii():  # a character a cell: str's own padding
        return text.rjust(width) if right else text.ljust(width)
    room = " " * (width - cell_len(text))
    return room + text if right else text + room


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
