"""The CLI's tables (``cli.render.table``): laid out as rich lays out its ``SIMPLE_HEAD`` tables,
cell for cell, without rich's cost a cell; and user data prints as typed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from apibox.cli.render import PlainTable, table
from apibox.plaintext import escaped, first_control
from tests import dbquery
from tests.cli_helpers import database

# Mostly what tables hold (ASCII, wide CJK and full-width letters, accents also as combining marks,
# emoji, rich's markup and emoji codes), now and then a line break, a tab or an escape (written out
# in both tables) or a character that leaves the table to rich (a zero-width joiner, say).
PLAIN = st.text(st.sampled_from("abcxyz019 .,:-_[]/@" + "日本語" + "é" + "🙂" + "\u0301" + "Ａ" + "ß"), max_size=14)
ODD = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)
CELL = st.one_of(st.none(), st.integers(-10**9, 10**9), PLAIN, PLAIN, PLAIN, ODD)


def drawn(console: Console, renderable: Any) -> str:
    """What ``renderable`` prints: a ``PlainTable`` as the CLI prints one (``print_table``: not
    cropped by the console, since it crops itself), anything else as the console prints it."""
    with console.capture() as out:
        console.print(renderable, crop=not isinstance(renderable, PlainTable))
    return out.get()


def assert_drawn_as_rich_draws_it(data: st.DataObject, title: str | None, columns: list[str], rows: list[list[Any]],
                                  widths: range) -> None:
    """``table(...)`` and the rich ``Table`` it stands for draw the same text, with some of the columns
    right-justified, on a console of one of ``widths``."""
    right = data.draw(st.sets(st.sampled_from(columns)))
    console = Console(width=data.draw(st.sampled_from(widths)), highlight=False, markup=False, emoji=False,
                      color_system=None)
    plain = table(title, columns, rows, right)
    assert drawn(console, plain) == drawn(console, plain._rich_table())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_table_prints_exactly_as_rich_prints_it(data: st.DataObject) -> None:
    columns = data.draw(st.lists(PLAIN.filter(lambda c: c.strip() == c and c), min_size=1, max_size=5, unique=True))
    rows = data.draw(st.lists(st.lists(CELL, min_size=len(columns), max_size=len(columns)), max_size=6))
    assert_drawn_as_rich_draws_it(data, data.draw(st.none() | PLAIN.filter(bool)), columns, rows, range(8, 161))


ASCII = st.text(st.sampled_from("abcxyz019 .,:-_[]/@{}"), max_size=12)  # the one-format-a-row path


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_an_ascii_table_prints_exactly_as_rich_prints_it(data: st.DataObject) -> None:
    columns = data.draw(st.lists(ASCII.filter(lambda c: c.strip() == c and c), min_size=1, max_size=6, unique=True))
    rows = data.draw(st.lists(st.lists(st.one_of(st.none(), st.integers(-10**9, 10**9), ASCII),
                                       min_size=len(columns), max_size=len(columns)), max_size=8))
    assert_drawn_as_rich_draws_it(data, None, columns, rows, range(8, 161))


WORDY = st.text(st.sampled_from("abcdefgh  0123-.:日é"), max_size=40)  # notes and names, to wrap on narrow consoles


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_table_wider_than_the_console_wraps_exactly_as_rich_wraps_it(data: st.DataObject) -> None:
    columns = data.draw(st.lists(st.text(st.sampled_from("abcdefghij ()"), min_size=1, max_size=14).filter(
        lambda c: c.strip() == c and c), min_size=2, max_size=8, unique=True))
    rows = data.draw(st.lists(st.lists(st.one_of(st.none(), WORDY, st.integers(-10**6, 10**6)),
                                       min_size=len(columns), max_size=len(columns)), max_size=5))
    assert_drawn_as_rich_draws_it(data, None, columns, rows, range(20, 131))


def test_a_table_is_laid_out_without_rich_table_whether_it_fits_or_wraps(monkeypatch: Any) -> None:
    def refuse(self: PlainTable) -> None:
        raise AssertionError("handed to rich's Table")
    monkeypatch.setattr(PlainTable, "_rich_table", refuse)
    rows = [[1, "first"], [22, ":smile: [b]x[/b]"]]
    wide = Console(width=80, highlight=False, markup=False, emoji=False, color_system=None)
    assert drawn(wide, table(None, ["id", "note"], rows, right=("id",))).splitlines()[1:5] == [
        " id   note             ", " ───────────────────── ", "  1   first            ", " 22   :smile: [b]x[/b] "]
    narrow = Console(width=16, highlight=False, markup=False, emoji=False, color_system=None)
    assert drawn(narrow, table(None, ["id", "note"], rows, right=("id",))).splitlines()[1:6] == [
        " id   note      ", " ────────────── ", "  1   first     ", " 22   :smile:   ", "      [b]x[/b]  "]


def test_user_data_prints_as_typed_in_a_statement(cli: Any) -> None:
    assert cli("users", "create", "ann@example.com", "--name", ":rocket: Ann").exit_code == 0
    assert cli("topup", "ann@example.com", "5", "--note", ":smile: [bold]paid[/bold]").exit_code == 0
    statement = cli("ledger", "ann@example.com")
    assert statement.exit_code == 0 and ":smile: [bold]paid[/bold]" in statement.stdout
    assert ":rocket: Ann" in cli("users", "list").stdout
    # a zero-width joiner sends the table to rich, whose emoji codes the CLI's consoles turn off
    assert cli("adjust", "ann@example.com", "1", "--note", ":tada:\u200dbonus").exit_code == 0
    statement = cli("ledger", "ann@example.com")
    assert ":smile: [bold]paid[/bold]" in statement.stdout and ":tada:\u200dbonus" in statement.stdout


def test_control_characters_a_database_holds_are_written_out_not_sent(cli: Any, config_path: Path) -> None:
    """The accounts refuse them, but a database written by other means may hold some."""
    assert cli("users", "create", "ann@example.com").exit_code == 0
    dbquery.execute(database(config_path), "UPDATE users SET name = ?", ("Ann\x1b[2J\tB\nC\x9b",))
    for command in (("users", "list"), ("users", "show", "ann@example.com")):
        shown = cli(*command).stdout
        assert "Ann\\x1b[2J\\tB\\nC\\x9b" in shown and "\x1b" not in shown and "\t" not in shown


@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",))))
def test_escaped_text_has_no_control_characters_and_plain_text_is_unchanged(text: str) -> None:
    shown = escaped(text)
    assert first_control(shown) is None
    if first_control(text) is None:
        assert shown == text
    assert len(shown) >= len(text)
