"""The admin HTTP API: off without an admin key, refused without the right one, and with it
everything the CLI does for users, keys and money, each change in the admin log.

Bad input (amounts like ``abc``, ``-5``, ``1e999``, unknown users, SQL-shaped strings) is a
4xx that changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from typer.testing import CliRunner

from apibox import offloop, reports
from apibox.cli.main import app as cli_app
from apibox.gateway import admin as admin_routes
from apibox.store import sql_reports, sql_store
from tests import dbquery
from tests.cli_helpers import assert_one_line_error, database
from tests.conftest import Live, serving
from tests.fake_upstream import UPSTREAM_KEY, FakeUpstream
from tests.gateway_helpers import books, query, wait_for_usage
from tests.live_variants import ADMIN_KEY, CHAT, Variant, openai_error, request, server

SQL_SHAPED = ["1 OR 1=1", "1; DROP TABLE users", "' OR '1'='1", "x'); DELETE FROM ledger; --",
              "ann@example.com' --", "\"; UPDATE balances SET balance = 10**9; --"]
ROUTES = [("GET", "/admin/users"), ("POST", "/admin/users"), ("GET", "/admin/users/1"),
          ("PATCH", "/admin/users/1"), ("POST", "/admin/users/1/state"), ("GET", "/admin/users/1/balance"),
          ("GET", "/admin/users/1/ledger"), ("GET", "/admin/keys"), ("POST", "/admin/keys"),
          ("GET", "/admin/keys/1"), ("PATCH", "/admin/keys/1"), ("POST", "/admin/keys/1/revoke"),
          ("POST", "/admin/topups"), ("POST", "/admin/adjustments"), ("GET", "/admin/usage"), ("GET", "/admin/log"),
          ("POST", "/admin/reload")]


@pytest.fixture
def admin(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A live gateway with the admin API on."""
    with serving(Variant(tmp_path, database_url, fake, server(admin_key=ADMIN_KEY))) as running:
        yield running


async def api(live: Live, method: str, path: str, body: Any = None, *, key: str | None = ADMIN_KEY,
              expect: int | None = 200) -> Any:
    status, headers, raw = await request(live, method, path, key=key, json_body=body)
    assert headers["x-request-id"].startswith("req_")
    if expect is not None:
        assert status == expect, raw
    return json.loads(raw) if status < 400 else (status, openai_error(raw))


def snapshot(live: Live) -> tuple[Any, ...]:
    """Everything an admin call could change."""
    return (books(live),
            [tuple(r) for r in query(live, "SELECT * FROM users ORDER BY id")],
            [tuple(r) for r in query(live, "SELECT * FROM api_keys ORDER BY id")],
            query(live, "SELECT count(*) FROM admin_log")[0][0])


async def refused(live: Live, method: str, path: str, body: Any = None, *, status: int | tuple[int, ...] = 400,
                  key: str | None = ADMIN_KEY) -> dict[str, Any]:
    before = snapshot(live)
    got, error = await api(live, method, path, body, key=key, expect=None)
    assert got in (status if isinstance(status, tuple) else (status,)), (got, error)
    assert snapshot(live) == before
    return error


def admin_log(live: Live) -> list[dict[str, Any]]:
    return [dict(r) for r in query(live, "SELECT * FROM admin_log ORDER BY id")]


# -- on, off and the admin key ------------------------------------------------------------


async def test_the_admin_api_is_off_without_an_admin_key(live: Live) -> None:
    for method, path in ROUTES:
        before = snapshot(live)
        status, _, raw = await request(live, method, path, key=ADMIN_KEY, json_body={"email": "x@example.com"})
        assert status == 404, (method, path)
        assert "admin API is off" in openai_error(raw)["message"]
        assert snapshot(live) == before


@pytest.mark.parametrize("key", [None, "wrong", ADMIN_KEY + "x", ADMIN_KEY[:-1], ADMIN_KEY.upper()])
async def test_every_admin_route_refuses_without_the_right_key(admin: Live, key: str | None) -> None:
    for method, path in ROUTES:
        error = await refused(admin, method, path, {"email": "x@example.com", "user": "1", "amount": "5"},
                              status=401, key=key)
        assert error["code"] == "invalid_api_key"
        assert ADMIN_KEY not in json.dumps(error)


async def test_a_users_api_key_is_not_an_admin_key(admin: Live) -> None:
    user = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    new = await api(admin, "POST", "/admin/keys", {"user": user["id"]}, expect=201)
    await refused(admin, "GET", "/admin/users", status=401, key=new["key"])
    await refused(admin, "POST", "/admin/topups", {"user": user["id"], "amount": "5"}, status=401, key=new["key"])


# -- users --------------------------------------------------------------------------------


async def test_users_create_list_show_update(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "Ann@Example.com", "name": "Ann", "group": "vip"},
                    expect=201)
    assert (ann["email"], ann["name"], ann["group"], ann["state"]) == ("ann@example.com", "Ann", "vip", "active")
    await refused(admin, "POST", "/admin/users", {"email": "ANN@example.com"}, status=409)  # one account per person
    bob = await api(admin, "POST", "/admin/users", {"email": "bob@example.com"}, expect=201)
    listed = await api(admin, "GET", "/admin/users")
    assert [u["email"] for u in listed] == ["ann@example.com", "bob@example.com"]
    assert listed[0]["balance_usd"] == "0.000000" and listed[0]["keys"] == 0
    shown = await api(admin, "GET", f"/admin/users/{ann['id']}")
    assert shown["email"] == "ann@example.com" and shown["keys"] == []
    assert (await api(admin, "GET", "/admin/users/bob@example.com"))["id"] == bob["id"]
    updated = await api(admin, "PATCH", f"/admin/users/{ann['id']}", {"name": "Ann B.", "group": "default"})
    assert (updated["name"], updated["group"]) == ("Ann B.", "default")
    await refused(admin, "PATCH", f"/admin/users/{ann['id']}", {"group": "no spaces allowed"})
    await refused(admin, "PATCH", f"/admin/users/{ann['id']}", {"name": 7})
    await refused(admin, "GET", "/admin/users/nobody@example.com", status=404)
    await refused(admin, "POST", "/admin/users", {"email": "not-an-email"})
    await refused(admin, "POST", "/admin/users", {"name": "no email"})


def next_link(headers: Any) -> str | None:
    """The path of a ``Link: <...>; rel="next"`` header, if there is one."""
    found = re.fullmatch(r'<([^>]+)>; rel="next"', headers.get("Link", ""))
    return found.group(1) if found else None


async def follow_pages(live: Live, path: str) -> list[Any]:
    """Each page of a listing, by its links, from ``path``."""
    pages: list[Any] = []
    next_path: str | None = path
    while next_path is not None:
        status, headers, raw = await request(live, "GET", next_path, key=ADMIN_KEY)
        assert status == 200, raw
        pages.append(json.loads(raw))
        next_path = next_link(headers)
    return pages


async def test_listings_come_in_pages_that_link_to_the_next(admin: Live) -> None:
    users = [await api(admin, "POST", "/admin/users", {"email": f"u{i}@example.com"}, expect=201) for i in range(7)]
    first = users[0]["id"]
    keys = [await api(admin, "POST", "/admin/keys", {"user": first}, expect=201) for _ in range(3)]
    await api(admin, "POST", "/admin/keys", {"user": users[1]["id"]}, expect=201)
    for amount in ("1", "2", "3"):
        await api(admin, "POST", "/admin/topups", {"user": first, "amount": amount}, expect=201)

    pages = await follow_pages(admin, "/admin/users?limit=3")
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [u["id"] for page in pages for u in page] == [u["id"] for u in users]
    assert [[k["id"] for k in page] for page in await follow_pages(admin, "/admin/keys?user=u0@example.com&limit=2")
            ] == [[keys[0]["id"], keys[1]["id"]], [keys[2]["id"]]]
    ledger = await follow_pages(admin, f"/admin/users/{first}/ledger?limit=2")
    assert [[e["amount_usd"] for e in page["entries"]] for page in ledger] == [["1.000000", "2.000000"],
                                                                              ["3.000000"]]
    assert all(page["balance_usd"] == "6.000000" for page in ledger)
    # a page that fills its limit links on, though nothing follows: the next one is empty
    assert await follow_pages(admin, "/admin/users?limit=7") == [await api(admin, "GET", "/admin/users"), []]
    everyone = await request(admin, "GET", "/admin/users", key=ADMIN_KEY)
    assert "Link" not in everyone[1]  # no limit: every user, as before pages


async def test_users_are_listed_by_state_group_and_balance_with_pages_that_keep_the_filter(admin: Live) -> None:
    emails = [f"u{i}@example.com" for i in range(5)]
    for index, email in enumerate(emails):
        user = await api(admin, "POST", "/admin/users", {"email": email, "group": "vip" if index % 2 else "default"},
                         expect=201)
        if index:
            await api(admin, "POST", "/admin/topups", {"user": user["id"], "amount": str(index)}, expect=201)
    await api(admin, "POST", "/admin/users/u3@example.com/state", {"state": "banned"})
    listed = await api(admin, "GET", "/admin/users?below=2.5")
    assert [u["email"] for u in listed] == emails[:3]
    assert [u["email"] for u in await api(admin, "GET", "/admin/users?group=vip&state=active")] == ["u1@example.com"]
    pages = await follow_pages(admin, "/admin/users?group=vip&limit=1")
    assert [[u["email"] for u in page] for page in pages] == [["u1@example.com"], ["u3@example.com"], []]
    for asked, param in (("state=gone", "state"), ("below=lots", "below"), ("below=-1", "below"),
                         ("group=a%20b", "group")):
        assert (await refused(admin, "GET", f"/admin/users?{asked}"))["param"] == param


@pytest.mark.parametrize(("query", "param"), [("limit=0", "limit"), ("limit=many", "limit"), ("after=-1", "after"),
                                              ("limit=99999999999999999999", "limit"), ("after=²", "after")])
async def test_a_bad_page_is_refused_and_a_wrong_key_still_comes_first(admin: Live, query: str, param: str) -> None:
    for path in ("/admin/users", "/admin/keys", "/admin/users/1/ledger"):
        await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=None)
        error = await refused(admin, "GET", f"{path}?{query}")
        assert error["param"] == param and param in error["message"]
        await refused(admin, "GET", f"{path}?{query}", status=401, key="wrong")


async def test_text_with_control_characters_is_refused_and_changes_nothing(admin: Live) -> None:
    """What an admin token writes, the operator's CLI prints: an escape in it must never get there."""
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com", "name": "Ann"}, expect=201)
    escape = "\x1b]52;c;cHduZWQ=\x07"  # would write to the operator's clipboard
    error = await refused(admin, "POST", "/admin/users", {"email": "bob@example.com", "name": escape})
    assert error["param"] == "name" and "control characters" in error["message"]
    await refused(admin, "POST", "/admin/users", {"email": "bob\x1b[8m@example.com"})
    await refused(admin, "PATCH", f"/admin/users/{ann['id']}", {"name": "two\nlines"})
    await refused(admin, "POST", f"/admin/users/{ann['id']}/state", {"state": "suspended", "reason": escape})
    await refused(admin, "POST", "/admin/keys", {"user": ann["id"], "name": escape})
    await refused(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "1", "note": escape})
    await refused(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "1", "reference": escape})
    await refused(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "1", "note": escape})
    assert (await api(admin, "GET", f"/admin/users/{ann['id']}"))["name"] == "Ann"


async def test_account_states(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    new = await api(admin, "POST", "/admin/keys", {"user": "ann@example.com"}, expect=201)
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "3"}, expect=201)
    path = f"/admin/users/{ann['id']}/state"
    for state in ("suspended", "active", "banned", "active"):
        changed = await api(admin, "POST", path, {"state": state, "reason": f"now {state}"})
        assert (changed["state"], changed["state_reason"]) == (state, f"now {state}")
    await refused(admin, "POST", path, {"state": "deleted"})
    await refused(admin, "POST", path, {"state": None})
    closed = await api(admin, "POST", path, {"state": "closed", "reason": "asked to leave"})
    assert closed["state"] == "closed"
    assert (await api(admin, "GET", f"/admin/keys/{new['id']}"))["status"] == "revoked"  # closing revokes keys
    assert (await api(admin, "GET", f"/admin/users/{ann['id']}/balance"))["balance_usd"] == "3.000000"  # kept
    await refused(admin, "POST", path, {"state": "active"})  # a closed account cannot be reopened
    await refused(admin, "POST", "/admin/keys", {"user": ann["id"]})  # and gets no new keys


# -- keys ---------------------------------------------------------------------------------


async def test_a_created_keys_secret_is_returned_once_and_works(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    await api(admin, "POST", "/admin/topups", {"user": "ann@example.com", "amount": "1"}, expect=201)
    new = await api(admin, "POST", "/admin/keys", {
        "user": "ann@example.com", "name": "ci", "models": ["gpt-fake"], "rpm": 10, "tpm": 10000,
        "concurrency": 2, "budget": "0.5", "expires": "30d", "allow_ips": ["127.0.0.1/32"]}, expect=201)
    secret = new["key"]
    assert new["prefix"].endswith("...") and secret.startswith(new["prefix"][:-3])
    assert (new["user_id"], new["name"], new["models"], new["rpm"], new["tpm"], new["concurrency"]) == (
        ann["id"], "ci", ["gpt-fake"], 10, 10000, 2)
    assert (new["budget_usd"], new["allow_ips"], new["status"]) == ("0.500000", ["127.0.0.1/32"], "active")
    status, _, _ = await request(admin, "POST", "/v1/chat/completions", key=secret, json_body=CHAT)
    assert status == 200
    # never again: not from show, list, the user's detail, nor the admin log
    for path in (f"/admin/keys/{new['id']}", "/admin/keys", "/admin/keys?user=ann@example.com",
                 f"/admin/users/{ann['id']}", "/admin/log"):
        text = json.dumps(await api(admin, "GET", path))
        assert secret not in text and secret[len(new["prefix"]) - 3:] not in text, path
    assert secret not in json.dumps([tuple(r) for r in query(admin, "SELECT * FROM api_keys")])
    listed = await api(admin, "GET", "/admin/keys?user=ann@example.com")
    assert [k["id"] for k in listed] == [new["id"]]
    assert "key" not in listed[0]
    revoked = await api(admin, "POST", f"/admin/keys/{new['id']}/revoke")
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    for _ in range(60):  # the server's key cache lets a revoked key through for at most a second
        status, _, _ = await request(admin, "POST", "/v1/chat/completions", key=secret, json_body=CHAT)
        if status == 401:
            break
        await asyncio.sleep(0.05)
    assert status == 401


async def test_bad_key_options_are_refused(admin: Live) -> None:
    await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    for body in ({"user": "ann@example.com", "models": ["no-such-model"]},
                 {"user": "ann@example.com", "models": "gpt-fake"},
                 {"user": "ann@example.com", "models": [1]},
                 {"user": "ann@example.com", "rpm": 0},
                 {"user": "ann@example.com", "rpm": "10"},
                 {"user": "ann@example.com", "concurrency": 10**30},  # more than the database can hold
                 {"user": "ann@example.com", "tpm": True},
                 {"user": "ann@example.com", "budget": "abc"},
                 {"user": "ann@example.com", "budget": "-1"},
                 {"user": "ann@example.com", "expires": "yesterday"},
                 {"user": "ann@example.com", "expires": "2000-01-01"},
                 {"user": "ann@example.com", "allow_ips": ["300.1.2.3"]},
                 {"name": "no user"}):
        await refused(admin, "POST", "/admin/keys", body)
    await refused(admin, "POST", "/admin/keys", {"user": "nobody@example.com"}, status=404)
    await refused(admin, "GET", "/admin/keys/999", status=404)
    await refused(admin, "POST", "/admin/keys/999/revoke", status=404)
    await refused(admin, "GET", "/admin/keys?user=nobody@example.com", status=404)


# -- money --------------------------------------------------------------------------------


async def test_topups_are_idempotent_by_reference(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    first = await api(admin, "POST", "/admin/topups",
                      {"user": "ann@example.com", "amount": "10.50", "reference": "stripe-1", "note": "card"},
                      expect=201)
    assert (first["balance_usd"], first["amount_usd"], first["created"]) == ("10.500000", "10.500000", True)
    again = await api(admin, "POST", "/admin/topups",
                      {"user": "ann@example.com", "amount": "10.50", "reference": "stripe-1"}, expect=200)
    assert (again["created"], again["ledger_id"], again["balance_usd"]) == (False, first["ledger_id"], "10.500000")
    await refused(admin, "POST", "/admin/topups",  # the same reference for another amount is a conflict
                  {"user": "ann@example.com", "amount": "11", "reference": "stripe-1"}, status=409)
    numeric = await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": 0.25}, expect=201)
    assert numeric["balance_usd"] == "10.750000"
    statement = await api(admin, "GET", f"/admin/users/{ann['id']}/ledger")
    assert [(e["kind"], e["amount_usd"], e["reference"]) for e in statement["entries"]] == [
        ("topup", "10.500000", "stripe-1"), ("topup", "0.250000", None)]
    assert statement["balance_usd"] == "10.750000"


async def test_adjustments_are_signed_need_a_note_and_cannot_go_below_zero(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "5"}, expect=201)
    down = await api(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "-1.5", "note": "refund"},
                     expect=201)
    assert down["balance_usd"] == "3.500000" and down["amount_usd"] == "-1.500000"
    up = await api(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "0.5", "note": "goodwill"},
                   expect=201)
    assert up["balance_usd"] == "4.000000"
    error = await refused(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "-4.000001",
                                                                 "note": "too much"}, status=(400, 409))
    assert "below zero" in error["message"] or "balance" in error["message"]
    await refused(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "-1"})  # no note
    await refused(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "-1", "note": "  "})
    balance = await api(admin, "GET", f"/admin/users/{ann['id']}/balance")
    assert (balance["balance_usd"], balance["held_usd"], balance["available_usd"]) == (
        "4.000000", "0.000000", "4.000000")


BAD_AMOUNTS: list[Any] = ["abc", "-5", "1e999", "NaN", "Infinity", "0", "0.0000001", "", " ", "10 USD", "1e3x",
                          "99999999999999", True, None, [], {"usd": 1}, -5, 0]


async def test_bad_amounts_are_refused_and_change_nothing(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    for amount in BAD_AMOUNTS:
        for path, extra in (("/admin/topups", {}), ("/admin/adjustments", {"note": "x"})):
            if path == "/admin/adjustments" and amount in ("-5", -5):
                continue  # a negative adjustment is valid in itself (it is refused below: no balance)
            await refused(admin, "POST", path, {"user": ann["id"], "amount": amount, **extra})
    await refused(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "-5", "note": "x"},
                  status=(400, 409))
    # numbers JSON cannot hold, sent as Python's json writes them
    for raw in (b'{"user": 1, "amount": 1e999}', b'{"user": 1, "amount": NaN}', b'{"user": 1, "amount": -Infinity}'):
        before = snapshot(admin)
        status, _, body = await request(admin, "POST", "/admin/topups", key=ADMIN_KEY, data=raw)
        assert status == 400, body
        openai_error(body)
        assert snapshot(admin) == before
    assert (await api(admin, "GET", f"/admin/users/{ann['id']}/balance"))["balance_usd"] == "0.000000"


async def test_unknown_users_and_malformed_bodies_are_4xx_and_change_nothing(admin: Live) -> None:
    await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    for ref in ("nobody@example.com", "999", "0", "-1", "ann", "99999999999999999999999999", "²", "١٢"):
        await refused(admin, "POST", "/admin/topups", {"user": ref, "amount": "1"}, status=404)
    for path in ("/admin/users/999", "/admin/users/999/balance", "/admin/users/999/ledger",
                 "/admin/users/99999999999999999999999999", "/admin/users/%C2%B2",
                 "/admin/keys/99999999999999999999999999", "/admin/keys/%C2%B2"):
        await refused(admin, "GET", path, status=404)
    for method, path in (("POST", "/admin/users"), ("POST", "/admin/topups"), ("POST", "/admin/keys"),
                         ("POST", "/admin/adjustments"), ("PATCH", "/admin/users/1"),
                         ("POST", "/admin/users/1/state")):
        for raw in (b"", b"{", b"[]", b'"text"', b"null", b"\xff\xfe"):
            before = snapshot(admin)
            status, _, body = await request(admin, method, path, key=ADMIN_KEY, data=raw)
            assert status == 400, (method, path, raw, body)
            openai_error(body)
            assert snapshot(admin) == before
    for asked, param in (("by=colour", "by"), ("by=day,day", "by"), ("since=last-tuesday", "since"),
                         ("until=soon", "until")):
        assert (await refused(admin, "GET", f"/admin/usage?{asked}"))["param"] == param
    assert (await refused(admin, "GET", "/admin/users/1/ledger?since=soon"))["param"] == "since"
    assert (await refused(admin, "GET", "/admin/log?limit=many"))["param"] == "limit"
    await refused(admin, "GET", "/admin/usage?user=nobody@example.com", status=404)


async def test_sql_shaped_input_is_data_not_sql(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "2"}, expect=201)
    for text in SQL_SHAPED:
        await refused(admin, "POST", "/admin/topups", {"user": text, "amount": "1"}, status=(400, 404))
        await refused(admin, "GET", f"/admin/keys/{text}", status=404)
        await refused(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": text})
        await refused(admin, "GET", f"/admin/usage?user={quote(text)}", status=(400, 404))
        await refused(admin, "GET", f"/admin/users/{quote(text)}/ledger", status=404)
        assert (await api(admin, "GET", f"/admin/usage?model={quote(text)}"))["rows"] == []
    # stored literally where the text is valid data
    note = SQL_SHAPED[3]
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "1", "note": note,
                                               "reference": SQL_SHAPED[2]}, expect=201)
    odd = await api(admin, "POST", "/admin/users", {"email": "x'--@example.com", "name": SQL_SHAPED[1]},
                    expect=201)
    assert (await api(admin, "GET", f"/admin/users/{odd['id']}"))["name"] == SQL_SHAPED[1]
    statement = await api(admin, "GET", f"/admin/users/{ann['id']}/ledger")
    assert statement["entries"][-1]["note"] == note and statement["balance_usd"] == "3.000000"
    assert len(await api(admin, "GET", "/admin/users")) == 2
    assert query(admin, "SELECT count(*) FROM ledger")[0][0] == 2


# -- balances, ledger, usage, the admin log -----------------------------------------------------


async def test_balance_ledger_and_usage_report_after_a_request(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "1"}, expect=201)
    new = await api(admin, "POST", "/admin/keys", {"user": ann["id"]}, expect=201)
    status, _, _ = await request(admin, "POST", "/v1/chat/completions", key=new["key"], json_body=CHAT)
    assert status == 200
    (row,) = await wait_for_usage(admin, ann["id"], 1)
    balance = await api(admin, "GET", f"/admin/users/{ann['id']}/balance")
    assert balance["balance_usd"] == f"0.{1_000_000 - row['cost']:06d}"
    statement = await api(admin, "GET", f"/admin/users/{ann['id']}/ledger?since=1d")
    assert [e["kind"] for e in statement["entries"]] == ["topup", "charge"]
    assert statement["entries"][1]["amount_usd"] == f"-0.{row['cost']:06d}"
    assert (await api(admin, "GET", f"/admin/users/{ann['id']}/ledger?since=1d&until=1h"))["entries"] == []
    assert (await refused(admin, "GET", f"/admin/users/{ann['id']}/ledger?since=1h&until=1d"))["param"] == "until"
    report = await api(admin, "GET", "/admin/usage?by=model,user")
    timing = {k: report["rows"][0][k] for k in ("avg_latency_ms", "p50_latency_ms", "p95_latency_ms", "p50_ttft_ms")}
    assert report["rows"] == [{"model": "gpt-fake", "user": "ann@example.com", "requests": 1, "errors": 0,
                               "error_rate": 0.0, "prompt_tokens": row["prompt_tokens"],
                               "completion_tokens": row["completion_tokens"], "cached_tokens": 0,
                               "cache_write_tokens": 0, "reasoning_tokens": 0,
                               "cost_usd": f"0.{row['cost']:06d}", **timing}]
    assert timing["p50_latency_ms"] == timing["p95_latency_ms"] == row["latency_ms"]
    assert {k: v for k, v in report["total"].items() if k not in ("model", "user")} == {
        k: v for k, v in report["rows"][0].items() if k not in ("model", "user")}
    by_hour = await api(admin, "GET", "/admin/usage?by=hour,provider")
    assert [(r["provider"], r["requests"]) for r in by_hour["rows"]] == [("fake", 1)]
    assert by_hour["rows"][0]["hour"].endswith(":00")
    by_key = await api(admin, "GET", f"/admin/usage?by=key&key={new['id']}&model=gpt-fake&user=ann@example.com")
    assert [r["requests"] for r in by_key["rows"]] == [1]
    assert (await api(admin, "GET", "/admin/usage?model=demo"))["rows"] == []


async def test_a_keys_settings_change_in_place_and_a_running_gateway_applies_them(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "1"}, expect=201)
    new = await api(admin, "POST", "/admin/keys", {"user": ann["id"], "name": "ci", "rpm": 5, "budget": "0.5",
                                                   "expires": "30d", "allow_ips": ["127.0.0.1/32"]}, expect=201)
    path, secret = f"/admin/keys/{new['id']}", new["key"]
    assert (await request(admin, "POST", "/v1/chat/completions", key=secret, json_body=CHAT))[0] == 200

    narrowed = await api(admin, "PATCH", path, {"models": ["demo"], "budget": 2, "name": "ci-2"})
    assert (narrowed["models"], narrowed["budget_usd"], narrowed["name"]) == (["demo"], "2.000000", "ci-2")
    assert (narrowed["rpm"], narrowed["allow_ips"], narrowed["expires_at"]) == (5, ["127.0.0.1/32"], new["expires_at"])
    assert narrowed["spent_usd"] == (await api(admin, "GET", path))["spent_usd"] != "0.000000"  # spend stays
    status, _, raw = await request(admin, "POST", "/v1/chat/completions", key=secret, json_body=CHAT)
    assert status == 403 and openai_error(raw)["code"] == "model_not_allowed"  # at once, same secret

    opened = await api(admin, "PATCH", path, {"models": None, "budget": None, "rpm": None, "expires": None,
                                              "allow_ips": []})
    assert (opened["models"], opened["budget_usd"], opened["rpm"], opened["expires_at"], opened["allow_ips"]) == (
        [], None, None, None, [])
    assert (await request(admin, "POST", "/v1/chat/completions", key=secret, json_body=CHAT))[0] == 200
    [logged] = [a for a in admin_log(admin) if a["action"] == "key.update"][:1]
    assert logged["target"] == f"key:{new['id']}" and secret not in json.dumps(logged)

    for body, param in (({"rpm": 0}, "rpm"), ({"rpm": "5"}, "rpm"), ({"budget": "-1"}, "budget"),
                        ({"expires": "yesterday"}, "expires"), ({"models": ["nope"]}, "models"),
                        ({"models": [1]}, "models"), ({"allow_ips": ["not-an-ip"]}, "allow_ips"),
                        ({"name": "two\nlines"}, "name"), ({}, None), ({"user": 2}, None)):
        error = await refused(admin, "PATCH", path, body)
        assert error["param"] == param, (body, error)
    await refused(admin, "PATCH", "/admin/keys/999", {"rpm": 3}, status=404)
    await api(admin, "POST", f"{path}/revoke")
    assert "revoked" in (await refused(admin, "PATCH", path, {"rpm": 3}))["message"]


def threads_running(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """The threads ``module.name`` runs on from now on, one entry a call."""
    threads: list[int] = []
    real = getattr(module, name)

    def recorded(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args)
    monkeypatch.setattr(module, name, recorded)
    return threads


# each listing, and for each its rows turned into objects and its items into JSON
LONG_LISTINGS = {"/admin/users": [(sql_store, "_user"), (admin_routes, "user_json")],
                 "/admin/keys": [(sql_store, "_key"), (admin_routes, "key_json")],
                 "/admin/users/{user}/ledger": [(sql_store, "_entry"), (admin_routes, "entry_json")],
                 "/admin/usage?by=user,model": [(sql_reports, "_label"), (reports, "row_json")]}


@pytest.mark.parametrize("many", [False, True], ids=["few", "many"])
async def test_long_listings_and_reports_are_made_off_the_event_loop(admin: Live, monkeypatch, many: bool) -> None:
    """Listings and reports of thousands of items were seconds of Python that every stream on the
    loop waited for: from ``OFF_LOOP_ITEMS`` items on they are made in a worker thread, the same."""
    users = []
    for email in ("ann@example.com", "bob@example.com"):
        user = await api(admin, "POST", "/admin/users", {"email": email}, expect=201)
        await api(admin, "POST", "/admin/topups", {"user": user["id"], "amount": "1"}, expect=201)
        key = await api(admin, "POST", "/admin/keys", {"user": user["id"]}, expect=201)
        assert (await request(admin, "POST", "/v1/chat/completions", key=key["key"], json_body=CHAT))[0] == 200
        await wait_for_usage(admin, user["id"], 1)
        users.append(user)
    paths = [path.replace("{user}", str(users[0]["id"])) for path in LONG_LISTINGS]
    answers = [await api(admin, "GET", path) for path in paths]
    loop_thread = await admin.in_gateway_thread(threading.get_ident)
    if many:  # two users, keys, entries and groups each: "many" from two on (else a thousand)
        monkeypatch.setattr(offloop, "OFF_LOOP_ITEMS", 2)
    for path, listing, answer in zip(paths, LONG_LISTINGS.values(), answers, strict=True):
        threads = [threads_running(monkeypatch, module, name) for module, name in listing]
        assert await api(admin, "GET", path) == answer
        for ran_on in threads:
            assert ran_on and (loop_thread not in ran_on) == many, path


async def test_every_change_is_in_the_admin_log_with_its_actor(admin: Live) -> None:
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    new = await api(admin, "POST", "/admin/keys", {"user": ann["id"]}, expect=201)
    await api(admin, "PATCH", f"/admin/users/{ann['id']}", {"name": "Ann"})
    await api(admin, "POST", f"/admin/users/{ann['id']}/state", {"state": "suspended"})
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "2"}, expect=201)
    await api(admin, "POST", "/admin/adjustments", {"user": ann["id"], "amount": "-1", "note": "fix"}, expect=201)
    await api(admin, "POST", f"/admin/keys/{new['id']}/revoke")
    # reads write nothing
    for path in ("/admin/users", f"/admin/users/{ann['id']}", "/admin/keys", "/admin/usage", "/admin/log"):
        await api(admin, "GET", path)
    # the same change from the CLI is logged as the CLI's
    result = await asyncio.to_thread(CliRunner().invoke, cli_app,
                                     ["users", "activate", "ann@example.com", "--config", str(admin.config_path)])
    assert result.exit_code == 0, result.output

    rows = admin_log(admin)
    assert [(r["actor"], r["action"]) for r in rows] == [
        ("admin-api:127.0.0.1", "user.create"), ("admin-api:127.0.0.1", "key.create"),
        ("admin-api:127.0.0.1", "user.update"), ("admin-api:127.0.0.1", "user.suspended"),
        ("admin-api:127.0.0.1", "balance.topup"), ("admin-api:127.0.0.1", "balance.adjust"),
        ("admin-api:127.0.0.1", "key.revoke"), ("cli", "user.active")]
    update = rows[2]
    assert json.loads(update["before"])["name"] == "" and json.loads(update["after"])["name"] == "Ann"
    assert json.loads(rows[6]["before"])["status"] == "active"
    assert json.loads(rows[6]["after"])["status"] == "revoked"
    assert all(r["target"] in (f"user:{ann['id']}", f"key:{new['id']}") for r in rows)
    assert new["key"] not in json.dumps(rows)
    # the API shows the same log, newest first or oldest first, with every field
    listed = await api(admin, "GET", "/admin/log?limit=3")
    assert len(listed) == 3
    newest_first = await api(admin, "GET", "/admin/log")
    assert {e["actor"] for e in newest_first} == {"admin-api:127.0.0.1", "cli"}
    assert [e["id"] for e in newest_first] == sorted((e["id"] for e in newest_first), reverse=True)
    pages = await follow_pages(admin, "/admin/log?limit=3")  # older and older, by the links
    assert [e["id"] for page in pages for e in page] == [e["id"] for e in newest_first]
    assert all(len(page) == 3 for page in pages[:-1]) and len(pages[-1]) < 3
    for asked in ("limit=0", "before=0", "before=x"):
        await refused(admin, "GET", f"/admin/log?{asked}")
    assert "from 1 to 1000" in (await refused(admin, "GET", "/admin/log?limit=1001"))["message"]
    assert len(await api(admin, "GET", "/admin/log?limit=1000")) == len(newest_first)
    # and money moved by the API is attributed in the ledger too
    actors = {r["actor"] for r in query(admin, "SELECT actor FROM ledger")}
    assert actors == {"admin-api:127.0.0.1"}


# -- the CLI shares the core: the same refusals there ---------------------------------------------


@pytest.mark.parametrize("args", [("users", "show", "99999999999999999999999"), ("users", "show", "²"),
                                  ("topup", "99999999999999999999999", "5"), ("keys", "show", "²"),
                                  ("keys", "revoke", "99999999999999999999999"),
                                  ("usage", "report", "--key", "99999999999999999999999")])
def test_ids_beyond_the_database_are_not_found_in_the_cli_too(cli, config_path: Path, args: tuple[str, ...]) -> None:
    assert cli("users", "create", "ann@example.com").exit_code == 0

    def everything() -> list[tuple[Any, ...]]:
        return [tuple(r) for table in ("users", "api_keys", "ledger", "balances", "admin_log")
                for r in dbquery.query(database(config_path), f"SELECT * FROM {table} ORDER BY 1")]
    before = everything()
    assert_one_line_error(cli(*args), "no ")
    assert everything() == before


def test_a_limit_too_large_for_the_database_is_refused_by_the_cli(cli) -> None:
    assert cli("users", "create", "ann@example.com").exit_code == 0
    assert_one_line_error(cli("keys", "create", "ann@example.com", "--rpm", str(2**63)), "rpm")


# -- secrets stay out of the log ----------------------------------------------------------------


async def test_secrets_never_reach_the_log(admin: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ann = await api(admin, "POST", "/admin/users", {"email": "ann@example.com"}, expect=201)
    await api(admin, "POST", "/admin/topups", {"user": ann["id"], "amount": "1"}, expect=201)
    new = await api(admin, "POST", "/admin/keys", {"user": ann["id"]}, expect=201)
    secret = new["key"]
    guessed = secret[:-4] + "AAAA"
    assert (await request(admin, "POST", "/v1/chat/completions", key=secret, json_body=CHAT))[0] == 200
    assert (await request(admin, "POST", "/v1/chat/completions", key=guessed, json_body=CHAT))[0] == 401
    await refused(admin, "GET", "/admin/users", status=401, key=ADMIN_KEY[:-1] + "Z")
    admin.fake.mode = "echo_key"  # the upstream fails and echoes its own key
    assert (await request(admin, "POST", "/v1/chat/completions", key=secret, json_body=CHAT))[0] >= 500
    admin.fake.mode = "ok"
    async with aiohttp.ClientSession() as session, session.post(  # a client that leaves mid-stream
            f"{admin.url}/v1/chat/completions", json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {secret}"}) as response:
        await response.content.readany()
    await api(admin, "POST", f"/admin/keys/{new['id']}/revoke")
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "failed" in logged  # the upstream failure was logged: the check below is not vacuous
    for secret_text in (secret, guessed, ADMIN_KEY, ADMIN_KEY[:-1] + "Z", UPSTREAM_KEY):
        assert secret_text not in logged


async def test_guessing_the_admin_key_locks_the_address_out(admin: Live) -> None:
    limit = admin.settings.server.failed_auth_per_minute
    for _ in range(limit):
        await refused(admin, "GET", "/admin/users", status=401, key="guess")
    status, _ = await api(admin, "GET", "/admin/users", expect=429)  # even the right key, for now
    assert status == 429


def test_the_reference_documents_every_admin_route_and_no_other() -> None:
    """docs/ADMIN_API.md has a heading for each route the gateway serves under /admin."""
    app = web.Application()
    admin_routes.add_routes(app)
    served = {f"{route.method} {route.resource.canonical}" for route in app.router.routes()
              if route.method != "HEAD"}
    reference = (Path(__file__).parent.parent / "docs" / "ADMIN_API.md").read_text()
    documented = set(re.findall(r"^### `([A-Z]+ /admin[^`]*)`", reference, flags=re.MULTILINE))
    assert documented == served
