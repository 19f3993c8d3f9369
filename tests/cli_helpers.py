"""Helpers shared by the CLI tests (test_cli_*.py): reading a command's result and its database."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from apibox.cli import common
from apibox.config import load_settings
from tests import dbquery


def ok_json(result: Any) -> Any:
    """The command succeeded and printed exactly one JSON document on stdout."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result: Any, *fragments: str) -> str:
    """Exit code 1, nothing on stdout, one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}"
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


async def run(cli: Any, *args: str) -> Any:
    """The CLI calls asyncio.run, so async tests run it in a worker thread."""
    return await asyncio.to_thread(cli, *args)


def database(config_path: Path) -> str:
    """The URL of the database the test config points at (for tests/dbquery.py)."""
    return load_settings(str(config_path)).database.url


def db_file(config_path: Path) -> Path:
    """The SQLite file the test config (conftest's ``write_config``) points at, on the sqlite engine."""
    assert dbquery.engine(database(config_path)) == "sqlite", "a SQLite file, on the sqlite engine only"
    return config_path.parent / "apibox.db"


def tables(config_path: Path) -> set[str]:
    """The names of the tables in the test config's database."""
    return dbquery.tables(database(config_path))


class Terminal:
    """Stands in for the CLI's stderr as a terminal (progress bars are drawn only on one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._drawn = io.StringIO()
        monkeypatch.setattr(common, "err_console", Console(file=self._drawn, force_terminal=True, width=100))

    def text(self) -> str:
        """What was drawn, without colours and cursor moves."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self._drawn.getvalue())

    def clear(self) -> None:
        self._drawn.seek(0)
        self._drawn.truncate()


def bar_went(text: str, what: str) -> str:
    """``what``'s bar, drawn from 0 of a total to the total; returns the total."""
    found = re.search(rf"{re.escape(what)} +━+ +0/(\d+)\b.*{re.escape(what)} +━+ +\1/\1\b", text, re.S)
    assert found, text
    return found[1]
