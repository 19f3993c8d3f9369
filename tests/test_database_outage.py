"""PostgreSQL going away under a live gateway, and coming back.

The gateway reaches its database through a TCP proxy the test can cut (every connection dropped,
new ones closed as they come) and restore, as a server restart or a lost network does. While the
database cannot be reached, new requests are refused with 503 ``database_unavailable`` and a
``Retry-After`` (one line in the log, never a traceback a request); a request whose upstream has
answered waits for its settlement, tried again every second, and is answered and charged once
the database is back, its hold released: the books balance after each test. A connection lost
after the database committed a settlement, before its reply came, leaves that settlement's result;
what is not the database going away (a closed store, a statement timing out) is not told as it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from apibox.errors import StoreUnavailable
from apibox.store import open_store, postgres
from apibox.store.postgres import PostgresStore
from tests import dbquery
from tests.conftest import Live, ServerThread, serving
from tests.fake_upstream import WORDS, FakeUpstream
from tests.gateway_helpers import account, balance, charges, usage_rows, wait_for_usage
from tests.live_variants import request
from tests.test_store import funded, record

pytestmark = pytest.mark.postgresql_only
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "Hi"}]}


class CuttableProxy:
    """A TCP proxy to ``target`` in a thread of its own; ``cut`` drops every connection and
    closes new ones at once until ``restore``; ``lose_replies`` drops what the server sends (a reply
    on its way when the connection is lost) until ``restore``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.up = True
        self.replying = True
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self.loop).result(timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer, replies=True))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool = False) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if replies and not self.replying:
                    continue
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self.writers.discard(writer)

    def _set(self, up: bool) -> None:
        self.up = up
        if not up:
            for writer in list(self.writers):
                writer.transport.abort()

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self._set, False)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(self._set, True)
        self.replying = True

    def lose_replies(self) -> None:
        self.replying = False

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            self._set(False)
            pipes = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def proxy(database_url: str) -> Iterator[CuttableProxy]:
    parts = urlsplit(database_url)
    running = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield running
    running.restore()
    running.close()


def at_port(database_url: str, port: int) -> str:
    """``database_url`` with the server at 127.0.0.1:``port`` (the proxy's, say)."""
    parts = urlsplit(database_url)
    netloc = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{port}"))


@pytest.fixture
def live(tmp_path: Path, database_url: str, fake: FakeUpstream, proxy: CuttableProxy) -> Iterator[Live]:
    """The live gateway on the test's database, reached through the proxy."""
    with serving(ServerThread(tmp_path, at_port(database_url, proxy.port), fake)) as running:
        yield running


async def test_while_the_database_is_away_requests_get_503_and_one_line_each(
        live: Live, live_store: Any, proxy: CuttableProxy, caplog: pytest.LogCaptureFixture) -> None:
    who = await account(live_store, live, "ann@example.com", "1")
    status, _, _ = await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT)
    assert status == 200
    caplog.set_level(logging.WARNING)
    proxy.cut()
    await asyncio.sleep(1.1)  # past the key cache's second: the key is read from the database again
    for _ in range(3):
        status, headers, raw = await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT)
        assert status == 503, raw
        assert b"database_unavailable" in raw and headers["Retry-After"] == "1"
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text
    proxy.restore()
    for _ in range(50):  # the pool's connections come back as they are asked for
        status, _, _ = await request(live, "POST", "/v1/chat/completions", key=who.key, json_body=CHAT)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    assert len(await wait_for_usage(live, who.user_id, 2)) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_settlement_waits_for_the_database_and_the_answer_goes_out_charged(
        live: Live, live_store: Any, proxy: CuttableProxy, stream: bool) -> None:
    """The upstream answers while the database is away: the answer waits for the settlement,
    which is written once the database is back; the hold does not outlive it."""
    who = await account(live_store, live, "ann@example.com", "1")
    live.fake.delay = 0.6
    asking = asyncio.create_task(request(live, "POST", "/v1/chat/completions", key=who.key,
                                         json_body={**CHAT, "stream": stream}))
    await asyncio.sleep(0.3)  # held, and waiting for the upstream
    proxy.cut()
    await asyncio.sleep(1.5)  # the upstream has answered; its settlement cannot be written
    assert not asking.done()
    proxy.restore()
    status, _, raw = await asyncio.wait_for(asking, timeout=10)
    assert status == 200
    assert all(word.encode() in raw for word in WORDS)  # the whole answer
    [row] = await wait_for_usage(live, who.user_id, 1)
    assert row["status"] == "ok" and row["charged"] > 0
    assert charges(live, who.user_id) == [row["charged"]]
    assert balance(live, who.user_id) == (1_000_000 - row["charged"], 0)  # nothing left held
    assert usage_rows(live, who.user_id) == [row]


async def test_a_settlement_whose_reply_was_lost_answers_with_what_the_database_wrote(
        database_url: str, proxy: CuttableProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database commits a settlement and the connection is lost before its reply arrives: tried
    again, the settlement finds its hold gone, and answers with the usage row and the charge the
    first attempt wrote (not "already settled", an error for a request that was charged)."""
    monkeypatch.setattr(postgres, "SETTLE_RETRY_SECONDS", 0.05)
    store = await PostgresStore.open(at_port(database_url, proxy.port), pool_size=1)
    try:
        user, key = await funded(store, 10_000)
        first = await store.hold(user.id, key.id, 1_000, "first", "m")
        hold = await store.hold(user.id, key.id, 1_000, "lost", "m")
        assert first is not None and hold is not None
        # the pool's one connection has the settlement prepared: the next one goes in one message,
        # and the server's one reply is all there is to lose
        await store.settle(first, record(first, 100))
        proxy.lose_replies()
        settling = asyncio.ensure_future(store.settle(hold, record(hold, 300)))
        for _ in range(100):  # committed: the usage row is there, seen on a connection of its own
            if dbquery.query(database_url, "SELECT count(*) FROM usage WHERE request_id = 'lost'")[0][0]:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the settlement was never committed")
        assert not settling.done()  # its reply never came
        proxy.cut()
        await asyncio.sleep(0.2)
        proxy.restore()
        written = await asyncio.wait_for(settling, timeout=10)
        assert dbquery.query(database_url, "SELECT id, charged FROM usage WHERE request_id = 'lost'") == [
            (written.id, 300)]
        assert written.charged == 300
        assert dbquery.query(database_url, "SELECT amount FROM ledger WHERE kind = 'charge' ORDER BY id") == [
            (-100,), (-300,)]  # charged once
        balance_row = await store.get_balance(user.id)
        assert (balance_row.balance, balance_row.held) == (10_000 - 400, 0)
        assert await store.audit() == []
    finally:
        await store.close()


@pytest.mark.parametrize("while_reading", [False, True], ids=["idle", "while reading"])
async def test_a_connection_cut_is_the_database_away(database_url: str, proxy: CuttableProxy,
                                                     while_reading: bool) -> None:
    """A connection lost while idle (the next one is refused: ConnectionError) or in the middle of
    a statement (ConnectionDoesNotExistError, SQLSTATE 08003) is StoreUnavailable."""
    store = await PostgresStore.open(at_port(database_url, proxy.port), pool_size=1)
    try:
        await store.ping()
        if while_reading:
            reading = asyncio.ensure_future(store._read("SELECT pg_sleep(0.5)"))
            await asyncio.sleep(0.2)
            proxy.cut()
        else:
            proxy.cut()
            await asyncio.sleep(0.1)  # the pool has seen its connection go
            reading = asyncio.ensure_future(store.ping())
        with pytest.raises(StoreUnavailable):
            await reading
    finally:
        await store.close()


async def test_a_connection_that_cannot_be_made_in_time_is_the_database_away(database_url: str) -> None:
    """Connecting timing out (a server that accepts and never answers) is StoreUnavailable."""
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()
    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    url = at_port(database_url, silent.sockets[0].getsockname()[1])
    store = PostgresStore(await asyncpg.create_pool(url, min_size=0, timeout=0.2))
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


@pytest.mark.parametrize(("timeout", "away"), [({"command_timeout": 0.1}, True),
                                               ({"server_settings": {"statement_timeout": "100"}}, False)],
                         ids=["command_timeout", "statement_timeout"])
async def test_a_statement_without_an_answer_is_the_database_away_and_one_cancelled_is_not(
        database_url: str, timeout: dict[str, Any], away: bool) -> None:
    """No answer within command_timeout (60 s in the gateway; apibox's statements take under a
    millisecond) is a network that drops what it carries: StoreUnavailable, so that a settlement is
    tried again. A statement the server cancelled (statement_timeout: query_canceled, 57014) is the
    database answering: an error of its own."""
    store = PostgresStore(await asyncpg.create_pool(database_url, min_size=0, max_size=1, **timeout))
    try:
        with pytest.raises(StoreUnavailable if away else asyncpg.QueryCanceledError):
            await store._read("SELECT pg_sleep(1)")
        await store.ping()  # the database was there all along
    finally:
        await store.close()


async def test_a_closed_store_fails_at_once_not_as_the_database_away(database_url: str) -> None:
    """A closed store's pool refuses work (asyncpg's InterfaceError): that is not the database away.
    A settlement after closing fails at once rather than being tried again every second for ever,
    and a read is not told to come back shortly."""
    store = await open_store(database_url)
    user, key = await funded(store, 10_000)
    hold = await store.hold(user.id, key.id, 1_000, "late", "m")
    assert hold is not None
    await store.close()
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await asyncio.wait_for(store.settle(hold, record(hold, 100)), timeout=5)
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await store.get_user(user.id)
