"""The operator CLI for accounts and keys: `--help` everywhere, `apibox users ...`, `apibox keys ...`.

Every test drives the real typer app in-process (the ``cli`` fixture) against a real SQLite file.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from apibox.cli.main import app as cli_app
from apibox.keys import hash_key
from tests import dbquery
from tests.cli_helpers import assert_one_line_error, database, db_file, ok_json, tables


def user_id(cli: Any, email: str, *extra: str) -> int:
    return ok_json(cli("users", "create", email, *extra, "--json"))["id"]


def new_key(cli: Any, user: str, *options: str) -> dict[str, Any]:
    return ok_json(cli("keys", "create", user, *options, "--json"))


def leaks(secret: str, text: str) -> bool:
    """True when any 8 characters of the secret's random part (past the display prefix) appear in ``text``.

    Stronger than ``secret in text``: a table that cut the secret short would still be caught.
    """
    tail = secret[12:]
    return any(tail[i:i + 8] in text for i in range(len(tail) - 7))


# -- help ----------------------------------------------------------------------------------


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command in the real CLI tree, found by walking it."""
    paths: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(typer.main.get_command(cli_app), ())
    return paths


COMMAND_PATHS = _command_paths()


def test_the_command_tree_walk_finds_the_documented_commands() -> None:
    found = {" ".join(p) for p in COMMAND_PATHS}
    for expected in ("serve", "users create", "users close", "keys create", "keys revoke", "topup", "adjust",
                     "balance", "ledger", "usage report", "config check", "db migrate", "db check"):
        assert expected in found


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "apibox")
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli_app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    command: Any = typer.main.get_command(cli_app)
    for name in path:
        command = command.commands[name]
    summary = (command.help or command.short_help or "").strip()
    assert summary, f"`apibox {' '.join(path)}` has no help text"
    # The first line of the docstring is what the operator reads in --help.
    first_words = " ".join(summary.split()[:4])
    assert first_words in " ".join(result.output.split())
    # Command lists show the first paragraph with its line breaks kept (typer's rich mode): each
    # line must end a sentence, or the list breaks one in two.
    for line in summary.split("\n\n")[0].splitlines():
        assert line.rstrip().endswith("."), f"`apibox {' '.join(path)}`'s summary breaks mid-sentence: {line!r}"
    # Every option and argument explains itself too.
    for param in command.params:
        assert (getattr(param, "help", None) or "").strip(), f"`apibox {' '.join(path)}` {param.name} has no help"


@pytest.mark.parametrize("command", [["db", "check"], ["users", "list"], ["balance", "ann@example.com"],
                                     ["keys", "list"], ["usage", "report"], ["topup", "ann@example.com", "5"]])
def test_a_database_file_that_is_not_there_is_refused_not_made(tmp_path: Path, command: list[str]) -> None:
    """A mistyped path (a restore being checked, a command run in the wrong directory) must not
    become a new, empty database that `db check` finds sound."""
    config = tmp_path / "apibox.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path / 'restore-tset.db'}'}}\n")
    result = CliRunner().invoke(cli_app, [*command, "--config", str(config)])
    assert_one_line_error(result, f"there is no SQLite database at {tmp_path / 'restore-tset.db'}")
    assert not (tmp_path / "restore-tset.db").exists()
    made = CliRunner().invoke(cli_app, ["users", "create", "ann@example.com", "--config", str(config)])
    assert made.exit_code == 0 and (tmp_path / "restore-tset.db").is_file()  # the first user may start one


def test_the_cli_starts_without_the_server_stack(tmp_path: Path) -> None:
    """Only `serve` imports aiohttp and the gateway (a third of a second of every command's start)."""
    probe = ("import sys\n"
             "from apibox.cli.main import app\n"
             "for command in (['config', 'check'], ['db', 'migrate'], ['users', 'list'], ['usage', 'report'],\n"
             "                ['db', 'check']):\n"
             "    try:\n"
             "        app(command)\n"
             "    except SystemExit as done:\n"
             "        assert done.code == 0, (command, done.code)\n"
             "print(sorted(m for m in sys.modules if m.startswith(('aiohttp', 'apibox.gateway'))))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_short_help_flag_works() -> None:
    result = CliRunner().invoke(cli_app, ["-h"])
    assert result.exit_code == 0
    assert "users" in result.output and "topup" in result.output


# -- users -----------------------------------------------------------------------------------


def test_users_create_prints_the_new_user(cli: Any) -> None:
    created = ok_json(cli("users", "create", "Ann@Example.COM", "--name", "Ann Lee", "--group", "vip", "--json"))
    assert created["email"] == "ann@example.com"
    assert created["name"] == "Ann Lee"
    assert created["group"] == "vip"
    assert created["state"] == "active"
    text = cli("users", "create", "bob@example.com")
    assert text.exit_code == 0, text.output
    assert "bob@example.com" in text.stdout


def test_json_output_keeps_a_non_ascii_name_as_typed(cli: Any) -> None:
    result = cli("users", "create", "zoe@example.com", "--name", "Zoë Åberg 张", "--json")
    assert ok_json(result)["name"] == "Zoë Åberg 张"
    assert '"name": "Zoë Åberg 张"' in result.stdout  # UTF-8, not \u escapes


def test_users_create_rejects_an_email_that_differs_only_in_case(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    assert_one_line_error(cli("users", "create", "ANN@example.com"), "already exists")
    assert_one_line_error(cli("users", "create", "  Ann@Example.Com "), "already exists")
    assert len(ok_json(cli("users", "list", "--json"))) == 1


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two words@x.org", "", "ann\x1b[2J@example.com"])
def test_users_create_rejects_what_is_not_an_email(cli: Any, email: str) -> None:
    assert_one_line_error(cli("users", "create", email), "not an email")
    assert ok_json(cli("users", "list", "--json")) == []


@pytest.mark.parametrize("text", ["Ann\x1b]0;pwned\x07", "Ann\nSmith", "tab\there", "del\x7f", "c1\x9b31m",
                                  "line\u2028break"])
def test_text_with_a_control_character_is_refused_everywhere(cli: Any, text: str) -> None:
    """An escape in a name or note would reach the operator's terminal when a table prints it."""
    assert_one_line_error(cli("users", "create", "ann@example.com", "--name", text), "control characters")
    assert ok_json(cli("users", "list", "--json")) == []
    assert cli("users", "create", "ann@example.com", "--name", "Ann").exit_code == 0
    assert_one_line_error(cli("users", "update", "ann@example.com", "--name", text), "control characters")
    assert_one_line_error(cli("keys", "create", "ann@example.com", "--name", text), "control characters")
    assert_one_line_error(cli("topup", "ann@example.com", "5", "--note", text), "control characters")
    assert_one_line_error(cli("topup", "ann@example.com", "5", "--reference", text), "control characters")
    assert_one_line_error(cli("users", "suspend", "ann@example.com", "--reason", text), "control characters")
    assert ok_json(cli("users", "show", "ann@example.com", "--json"))["name"] == "Ann"
    assert ok_json(cli("keys", "list", "--json")) == [] and ok_json(cli("ledger", "ann@example.com", "--json")) == []


def test_users_create_rejects_a_bad_group_name(cli: Any) -> None:
    assert_one_line_error(cli("users", "create", "ann@example.com", "--group", "v i p"), "group")
    assert ok_json(cli("users", "list", "--json")) == []


def test_users_list_shows_balance_state_and_key_count(cli: Any) -> None:
    assert "No users yet" in cli("users", "list").stdout
    ann = user_id(cli, "ann@example.com")
    user_id(cli, "bob@example.com")
    new_key(cli, "ann@example.com")
    new_key(cli, "ann@example.com")
    assert cli("topup", str(ann), "3.25").exit_code == 0
    rows = ok_json(cli("users", "list", "--json"))
    assert [r["email"] for r in rows] == ["ann@example.com", "bob@example.com"]
    assert rows[0]["keys"] == 2 and rows[1]["keys"] == 0
    assert rows[0]["balance_usd"] == "3.250000" and rows[1]["balance_usd"] == "0.000000"
    assert rows[0]["state"] == "active"
    table = cli("users", "list")
    assert table.exit_code == 0
    assert "ann@example.com" in table.stdout and "3.250000" in table.stdout


def test_users_and_keys_list_in_pages_and_say_how_to_get_the_next(cli: Any) -> None:
    ids = [user_id(cli, f"u{i}@example.com") for i in range(5)]
    first = ok_json(cli("users", "list", "--limit", "2", "--json"))
    assert [u["id"] for u in first] == ids[:2]
    table = cli("users", "list", "--limit", "2")
    assert "u1@example.com" in table.stdout and "u2@example.com" not in table.stdout
    assert f"apibox users list --after {ids[1]} --limit 2" in table.stderr  # stdout stays the table
    last = cli("users", "list", "--after", str(ids[3]), "--limit", "2")
    assert "u4@example.com" in last.stdout and last.stderr == ""  # not a full page: nothing follows
    assert "No users after that id" in cli("users", "list", "--after", str(ids[4])).stdout
    keys = [new_key(cli, "u0@example.com")["id"] for _ in range(3)]
    page = cli("keys", "list", "--user", "u0@example.com", "--after", str(keys[0]), "--limit", "1", "--json")
    assert [k["id"] for k in json.loads(page.stdout)] == [keys[1]]
    assert f"apibox keys list --user u0@example.com --after {keys[1]} --limit 1" in page.stderr
    assert_one_line_error(cli("users", "list", "--limit", "0"), "limit", "from 1 to")
    assert_one_line_error(cli("keys", "list", "--after", "-3"), "after", "from 0 to")


def test_users_list_by_state_group_and_balance(cli: Any) -> None:
    for email, group in (("ann@example.com", "default"), ("bob@example.com", "vip"), ("cat@example.com", "vip")):
        user_id(cli, email, "--group", group)
    assert cli("topup", "ann@example.com", "5").exit_code == 0
    assert cli("users", "suspend", "cat@example.com", "--reason", "late").exit_code == 0
    assert [u["email"] for u in ok_json(cli("users", "list", "--below", "1", "--json"))] == [
        "bob@example.com", "cat@example.com"]
    assert [u["email"] for u in ok_json(cli("users", "list", "--state", "suspended", "--json"))] == ["cat@example.com"]
    assert [u["email"] for u in ok_json(cli("users", "list", "--group", "vip", "--state", "active", "--json"))] == [
        "bob@example.com"]
    page = cli("users", "list", "--group", "vip", "--limit", "1")
    assert "apibox users list --group vip --after 2 --limit 1" in page.stderr
    assert "No such users" in cli("users", "list", "--below", "0").stdout
    assert_one_line_error(cli("users", "list", "--state", "gone"), "state")
    assert_one_line_error(cli("users", "list", "--below", "lots"), "below")


def test_users_show_by_email_any_case_or_by_id(cli: Any) -> None:
    ann = user_id(cli, "ann@example.com", "--name", "Ann")
    key = new_key(cli, "ann@example.com")
    by_email = ok_json(cli("users", "show", "ANN@EXAMPLE.COM", "--json"))
    by_id = ok_json(cli("users", "show", str(ann), "--json"))
    assert by_email == by_id
    assert by_email["id"] == ann and by_email["name"] == "Ann"
    assert by_email["available_usd"] == "0.000000"
    assert [k["id"] for k in by_email["keys"]] == [key["id"]]
    text = cli("users", "show", "ann@example.com")
    assert text.exit_code == 0 and "ann@example.com" in text.stdout and "Ann" in text.stdout


def test_users_update_changes_name_and_group_only(cli: Any) -> None:
    user_id(cli, "ann@example.com", "--name", "Ann", "--group", "trial")
    updated = ok_json(cli("users", "update", "ann@example.com", "--name", "Ann B.", "--json"))
    assert updated["name"] == "Ann B." and updated["group"] == "trial"
    updated = ok_json(cli("users", "update", "ann@example.com", "--group", "vip", "--json"))
    assert updated["name"] == "Ann B." and updated["group"] == "vip"
    assert_one_line_error(cli("users", "update", "ann@example.com", "--group", "bad group!"), "group")
    assert ok_json(cli("users", "show", "ann@example.com", "--json"))["group"] == "vip"


def test_users_state_changes_round_trip(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    suspended = ok_json(cli("users", "suspend", "ann@example.com", "--reason", "unpaid invoice", "--json"))
    assert suspended["state"] == "suspended" and suspended["state_reason"] == "unpaid invoice"
    assert ok_json(cli("users", "activate", "ann@example.com", "--json"))["state"] == "active"
    assert ok_json(cli("users", "ban", "ann@example.com", "--reason", "abuse", "--json"))["state"] == "banned"
    assert ok_json(cli("users", "show", "ann@example.com", "--json"))["state"] == "banned"
    assert ok_json(cli("users", "activate", "ann@example.com", "--json"))["state"] == "active"


def test_users_close_revokes_keys_and_keeps_the_balance(cli: Any) -> None:
    ann = user_id(cli, "ann@example.com")
    first, second = new_key(cli, "ann@example.com"), new_key(cli, "ann@example.com")
    bob = user_id(cli, "bob@example.com")
    bobs = new_key(cli, "bob@example.com")
    assert cli("topup", "ann@example.com", "12.5").exit_code == 0
    closed = ok_json(cli("users", "close", "ann@example.com", "--reason", "asked to", "--json"))
    assert closed["state"] == "closed"
    keys = {k["id"]: k for k in ok_json(cli("keys", "list", "--json"))}
    assert keys[first["id"]]["status"] == "revoked" and keys[first["id"]]["revoked_at"]
    assert keys[second["id"]]["status"] == "revoked"
    assert keys[bobs["id"]]["status"] == "active"  # other users' keys are untouched
    balance = ok_json(cli("balance", str(ann), "--json"))
    assert balance["balance_usd"] == "12.500000"
    assert ok_json(cli("users", "show", str(bob), "--json"))["state"] == "active"
    # A closed account gets no new keys.
    assert_one_line_error(cli("keys", "create", "ann@example.com"), "closed")
    assert len(ok_json(cli("keys", "list", "--user", "ann@example.com", "--json"))) == 2


@pytest.mark.parametrize("verb", ["activate", "suspend", "ban"])
def test_a_closed_user_cannot_be_reopened(cli: Any, verb: str) -> None:
    user_id(cli, "ann@example.com")
    assert cli("users", "close", "ann@example.com").exit_code == 0
    assert_one_line_error(cli("users", verb, "ann@example.com"), "closed")
    assert ok_json(cli("users", "show", "ann@example.com", "--json"))["state"] == "closed"


@pytest.mark.parametrize("args", [
    ("users", "show", "nobody@example.com"),
    ("users", "show", "999"),
    ("users", "update", "nobody@example.com", "--name", "x"),
    ("users", "suspend", "nobody@example.com"),
    ("users", "activate", "42"),
    ("users", "ban", "nobody@example.com"),
    ("users", "close", "nobody@example.com"),
    ("keys", "create", "nobody@example.com"),
    ("keys", "list", "--user", "nobody@example.com"),
    ("topup", "nobody@example.com", "5"),
    ("adjust", "nobody@example.com", "5", "--note", "x"),
    ("balance", "nobody@example.com"),
    ("ledger", "nobody@example.com"),
    ("usage", "report", "--user", "nobody@example.com"),
], ids=lambda a: " ".join(a[:2]))
def test_an_unknown_user_is_one_line_on_stderr_and_exit_1(cli: Any, args: tuple[str, ...]) -> None:
    user_id(cli, "someone@example.com")
    line = assert_one_line_error(cli(*args), "no user")
    assert "users list" in line  # it says what to do


# -- keys ------------------------------------------------------------------------------------


def test_keys_create_prints_the_secret_once_and_never_again(cli: Any) -> None:
    ann = user_id(cli, "ann@example.com")
    created = new_key(cli, "ann@example.com", "--name", "laptop")
    secret = created["key"]
    assert re.fullmatch(r"sk-ab-[A-Za-z0-9_\-]{40,}", secret)
    assert created["user_id"] == ann and created["name"] == "laptop" and created["status"] == "active"
    assert secret.startswith(created["prefix"].removesuffix("..."))
    outputs = {
        "keys list": cli("keys", "list"), "keys list --json": cli("keys", "list", "--json"),
        "keys list --user": cli("keys", "list", "--user", "ann@example.com", "--json"),
        "keys show": cli("keys", "show", str(created["id"])),
        "keys show --json": cli("keys", "show", str(created["id"]), "--json"),
        "users show": cli("users", "show", "ann@example.com"),
        "users show --json": cli("users", "show", "ann@example.com", "--json"),
        "users list --json": cli("users", "list", "--json"),
        "keys revoke --json": cli("keys", "revoke", str(created["id"]), "--json"),
        "keys revoke": cli("keys", "revoke", str(created["id"])),
        "keys show after revoke": cli("keys", "show", str(created["id"]), "--json"),
    }
    for name, result in outputs.items():
        assert result.exit_code == 0, (name, result.output)
        assert secret not in result.output, name
        assert not leaks(secret, result.output), name
    # The self-check of `leaks`: the creation output does contain it.
    assert leaks(secret, json.dumps(created))
    assert "key" not in json.loads(outputs["keys show --json"].stdout)


def test_keys_create_text_output_shows_the_secret_once(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    result = cli("keys", "create", "ann@example.com")
    assert result.exit_code == 0, result.output
    secrets = re.findall(r"sk-ab-[A-Za-z0-9_\-]{40,}", result.stdout)
    assert len(secrets) == 1
    assert "shown only now" in result.stdout


def test_keys_revoke_marks_the_key_revoked(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    key = new_key(cli, "ann@example.com")
    other = new_key(cli, "ann@example.com")
    revoked = ok_json(cli("keys", "revoke", str(key["id"]), "--json"))
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    statuses = {k["id"]: k["status"] for k in ok_json(cli("keys", "list", "--json"))}
    assert statuses == {key["id"]: "revoked", other["id"]: "active"}
    # Revoking again is harmless and keeps the first revocation time.
    again = ok_json(cli("keys", "revoke", str(key["id"]), "--json"))
    assert again["revoked_at"] == revoked["revoked_at"]


@pytest.mark.parametrize("ref", ["999", "abc", "1; DROP TABLE api_keys"])
def test_keys_show_and_revoke_unknown_key(cli: Any, ref: str) -> None:
    user_id(cli, "ann@example.com")
    new_key(cli, "ann@example.com")
    assert_one_line_error(cli("keys", "show", ref), "no key")
    assert_one_line_error(cli("keys", "revoke", ref), "no key")
    assert ok_json(cli("keys", "list", "--json"))[0]["status"] == "active"


def test_keys_list_filters_by_user(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    user_id(cli, "bob@example.com")
    a = new_key(cli, "ann@example.com")
    b = new_key(cli, "bob@example.com")
    assert [k["id"] for k in ok_json(cli("keys", "list", "--user", "bob@example.com", "--json"))] == [b["id"]]
    assert [k["id"] for k in ok_json(cli("keys", "list", "--json"))] == [a["id"], b["id"]]
    table = cli("keys", "list", "--user", "ann@example.com").stdout
    assert a["prefix"] in table and b["prefix"] not in table


def test_keys_update_changes_what_is_given_and_words_take_settings_away(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    key = new_key(cli, "ann@example.com", "--rpm", "5", "--budget", "3", "--allow-ip", "10.0.0.0/8")
    changed = ok_json(cli("keys", "update", str(key["id"]), "--models", "demo", "--tpm", "900", "--json"))
    assert (changed["models"], changed["tpm"], changed["rpm"], changed["budget_usd"], changed["allow_ips"]) == (
        ["demo"], 900, 5, "3.000000", ["10.0.0.0/8"])
    cleared = ok_json(cli("keys", "update", str(key["id"]), "--rpm", "default", "--budget", "none", "--models",
                          "all", "--allow-ip", "any", "--expires", "never", "--name", "renamed", "--json"))
    assert (cleared["rpm"], cleared["budget_usd"], cleared["models"], cleared["allow_ips"], cleared["name"]) == (
        None, None, [], [], "renamed")
    assert cleared["prefix"] == key["prefix"]  # the same key, the same secret
    table = cli("keys", "update", str(key["id"]), "--expires", "30d").stdout
    assert "renamed" in table and "expires" in table
    assert_one_line_error(cli("keys", "update", str(key["id"])), "nothing to change")
    assert_one_line_error(cli("keys", "update", str(key["id"]), "--rpm", "lots"), "rpm")
    assert_one_line_error(cli("keys", "update", str(key["id"]), "--models", "nope"), "unknown model")
    assert_one_line_error(cli("keys", "update", "999", "--rpm", "3"), "no key")
    assert cli("keys", "revoke", str(key["id"])).exit_code == 0
    assert_one_line_error(cli("keys", "update", str(key["id"]), "--rpm", "3"), "revoked")


def test_keys_create_models_scope(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    assert new_key(cli, "ann@example.com", "--models", "demo,gpt-fake")["models"] == ["demo", "gpt-fake"]
    assert new_key(cli, "ann@example.com", "--models", "demo", "--models", "embed-fake")["models"] == [
        "demo", "embed-fake"]
    assert new_key(cli, "ann@example.com")["models"] == []  # all models


@pytest.mark.parametrize("models", ["gpt-9", "demo,gpt-9", "DEMO"])
def test_keys_create_rejects_an_unknown_model(cli: Any, models: str) -> None:
    user_id(cli, "ann@example.com")
    assert_one_line_error(cli("keys", "create", "ann@example.com", "--models", models), "unknown model")
    assert ok_json(cli("keys", "list", "--json")) == []


def test_keys_create_expires_in_a_duration(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    before = datetime.now(UTC)
    key = new_key(cli, "ann@example.com", "--expires", "30d")
    after = datetime.now(UTC)
    expires = datetime.fromisoformat(key["expires_at"])
    assert before + timedelta(days=30) - timedelta(seconds=1) <= expires <= after + timedelta(days=30)


def test_keys_create_expires_on_a_date(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    key = new_key(cli, "ann@example.com", "--expires", "2099-12-31")
    assert datetime.fromisoformat(key["expires_at"]) == datetime(2099, 12, 31, tzinfo=UTC)
    key = new_key(cli, "ann@example.com", "--expires", "2099-06-01T12:30:00Z")
    assert datetime.fromisoformat(key["expires_at"]) == datetime(2099, 6, 1, 12, 30, tzinfo=UTC)


@pytest.mark.parametrize(("expires", "says"), [
    ("2001-01-01", "not in the future"), ("0d", "not in the future"), ("someday", "not a date"),
    ("30x", "not a date"),
    # Beyond what a datetime holds: once refused with a traceback, or stored and then unreadable.
    ("999999w", "too far"), ("9999-12-31T23:59:59-05:00", "too far"),
])
def test_keys_create_rejects_a_past_or_bad_expiry(cli: Any, expires: str, says: str) -> None:
    user_id(cli, "ann@example.com")
    assert_one_line_error(cli("keys", "create", "ann@example.com", "--expires", expires), says)
    assert ok_json(cli("keys", "list", "--json")) == []
    assert ok_json(cli("users", "show", "ann@example.com", "--json"))["keys"] == []


@pytest.mark.parametrize("last", ["9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999Z"])
def test_keys_create_accepts_the_last_representable_moment(cli: Any, last: str) -> None:
    user_id(cli, "ann@example.com")
    key = new_key(cli, "ann@example.com", "--expires", last)
    assert key["expires_at"].startswith("9999-12-31T23:59:59")
    assert [k["id"] for k in ok_json(cli("keys", "list", "--json"))] == [key["id"]]
    assert ok_json(cli("keys", "show", str(key["id"]), "--json"))["expires_at"] == key["expires_at"]
    assert ok_json(cli("keys", "revoke", str(key["id"]), "--json"))["revoked_at"]


def test_keys_create_budget(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    key = new_key(cli, "ann@example.com", "--budget", "2.5")
    assert key["budget_usd"] == "2.500000" and key["spent_usd"] == "0.000000"
    assert ok_json(cli("keys", "show", str(key["id"]), "--json"))["budget_usd"] == "2.500000"
    assert new_key(cli, "ann@example.com")["budget_usd"] is None


@pytest.mark.parametrize("budget", ["-1", "0", "abc", "0.0000001", "nan", "1e999"])
def test_keys_create_rejects_a_bad_budget(cli: Any, budget: str) -> None:
    user_id(cli, "ann@example.com")
    assert_one_line_error(cli("keys", "create", "ann@example.com", f"--budget={budget}"))
    assert ok_json(cli("keys", "list", "--json")) == []


def test_keys_create_limits_and_allowed_ips(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    key = new_key(cli, "ann@example.com", "--rpm", "60", "--tpm", "10000", "--concurrency", "2",
                  "--allow-ip", "10.0.0.0/8", "--allow-ip", "192.168.1.7", "--allow-ip", "2001:db8::/32")
    assert (key["rpm"], key["tpm"], key["concurrency"]) == (60, 10000, 2)
    assert key["allow_ips"] == ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]
    assert ok_json(cli("keys", "show", str(key["id"]), "--json"))["allow_ips"] == key["allow_ips"]
    shown = cli("keys", "show", str(key["id"])).stdout
    assert " rpm           60 " in shown and " concurrency   2 " in shown
    plain = cli("keys", "show", str(new_key(cli, "ann@example.com")["id"])).stdout  # the config's defaults apply
    assert " rpm           default " in plain and " budget        no limit " in plain


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "300.1.1.1", "not-an-ip", "10.0.0.0/8; DROP TABLE api_keys"])
def test_keys_create_rejects_a_bad_cidr(cli: Any, cidr: str) -> None:
    user_id(cli, "ann@example.com")
    assert_one_line_error(cli("keys", "create", "ann@example.com", "--allow-ip", cidr), "not an IP")
    assert ok_json(cli("keys", "list", "--json")) == []


@pytest.mark.parametrize("option", ["--rpm", "--tpm", "--concurrency"])
def test_keys_create_rejects_a_zero_limit(cli: Any, option: str) -> None:
    user_id(cli, "ann@example.com")
    assert_one_line_error(cli("keys", "create", "ann@example.com", option, "0"), "from 1 to")
    assert ok_json(cli("keys", "list", "--json")) == []


def test_no_table_holds_a_plaintext_secret(cli: Any, config_path: Path) -> None:
    """Every engine: every row of every table has the keys' hashes and not the secrets, not even their random part
    (the SQLite files, WAL included, are checked byte for byte below)."""
    user_id(cli, "ann@example.com")
    secrets = [new_key(cli, "ann@example.com", "--name", f"k{i}")["key"] for i in range(3)]
    cli("keys", "revoke", "1")
    url = database(config_path)
    stored = repr([dbquery.query(url, f"SELECT * FROM {table}") for table in sorted(tables(config_path))])
    for secret in secrets:
        assert hash_key(secret) in stored
        assert secret not in stored and secret[12:] not in stored and secret[12:28] not in stored


@pytest.mark.sqlite_only  # the bytes of SQLite's files, its WAL file included
def test_the_database_files_never_hold_a_plaintext_secret(cli: Any, config_path: Path) -> None:
    user_id(cli, "ann@example.com")
    # A second connection held open keeps the -wal file alive (the last one to close removes it),
    # so the new keys' rows are still in the WAL when the files are read.
    keeper = sqlite3.connect(db_file(config_path))
    try:
        keeper.execute("SELECT count(*) FROM users").fetchone()
        secrets = [new_key(cli, "ann@example.com", "--name", f"k{i}")["key"] for i in range(3)]
        cli("keys", "revoke", "1")
        cli("keys", "list")
        wal = db_file(config_path).with_name("apibox.db-wal")
        assert wal.exists()
        files = [p for p in config_path.parent.iterdir() if p.name.startswith("apibox.db")]
        raw = b"".join(p.read_bytes() for p in files)
        for secret in secrets:
            # The check can see what is stored: the hash is there ...
            assert hash_key(secret).encode() in raw
            # ... and the secret is not, not even its random part.
            assert secret.encode() not in raw
            assert secret[12:].encode() not in raw
            assert secret[12:28].encode() not in raw
    finally:
        keeper.close()
    # Also after the WAL is folded into the main file.
    with sqlite3.connect(db_file(config_path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = db_file(config_path).read_bytes()
    for secret in secrets:
        assert hash_key(secret).encode() in raw
        assert secret[12:28].encode() not in raw


def test_a_long_error_stays_on_one_line(cli: Any) -> None:
    email = "a" * 150 + "@" + "b" * 150 + ".example.com"
    line = assert_one_line_error(cli("users", "show", email), "no user")
    assert email in line


def test_what_changes_nothing_is_refused_or_left_out_of_the_admin_log(cli: Any, config_path: Path) -> None:
    def logged() -> list[str]:
        return [r[0] for r in dbquery.query(database(config_path), "SELECT action FROM admin_log ORDER BY id")]

    user_id(cli, "ann@example.com")
    assert_one_line_error(cli("users", "update", "ann@example.com"), "nothing to change")
    key = new_key(cli, "ann@example.com")
    for _ in range(2):
        assert cli("keys", "revoke", str(key["id"])).exit_code == 0
        assert cli("users", "suspend", "ann@example.com", "--reason", "audit").exit_code == 0
    assert cli("users", "suspend", "ann@example.com", "--reason", "unpaid").exit_code == 0  # a new reason is a change
    assert logged() == ["user.create", "key.create", "key.revoke", "user.suspended", "user.suspended"]


def test_list_options_take_each_item_once_and_refuse_naming_nothing(cli: Any) -> None:
    user_id(cli, "ann@example.com")
    key = new_key(cli, "ann@example.com", "--models", "demo,,demo", "--allow-ip", "10.0.0.1", "--allow-ip", "10.0.0.1")
    assert (key["models"], key["allow_ips"]) == (["demo"], ["10.0.0.1"])
    for option in ("--models", "--allow-ip"):
        assert_one_line_error(cli("keys", "create", "ann@example.com", option, ""), f"{option} names nothing")
        assert_one_line_error(cli("keys", "update", str(key["id"]), option, " , "), f"{option} names nothing")
    assert ok_json(cli("keys", "show", str(key["id"]), "--json"))["models"] == ["demo"]  # left as it was


def test_a_database_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    config = tmp_path / "apibox.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path / 'gone' / 'apibox.db'}'}}\n")
    result = CliRunner().invoke(cli_app, ["db", "migrate", "--config", str(config)])
    assert_one_line_error(result, f"unable to open database file (there is no directory {tmp_path / 'gone'})")


def test_a_new_database_file_is_readable_by_its_owner_alone(tmp_path: Path) -> None:
    for name, mode in (("new.db", None), ("kept.db", 0o640)):
        path = tmp_path / name
        if mode is not None:  # an operator's own choice for a file that is there stays
            path.touch()
            path.chmod(mode)
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"database: {{url: 'sqlite:///{path}'}}\n")
        assert CliRunner().invoke(cli_app, ["db", "migrate", "--config", str(config)]).exit_code == 0
        assert path.stat().st_mode & 0o777 == (mode or 0o600)
