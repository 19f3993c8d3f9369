"""SIGTERM during 50 streaming requests on a real `apibox serve` process: it stops accepting,
finishes the streams in flight, settles every one of them, and leaves books that `apibox db
check` accepts.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from apibox import accounts
from apibox.config import load_settings
from apibox.store import open_store
from tests.conftest import write_config
from tests.dbquery import query
from tests.serve_helpers import (
    MidStreams,
    Outcome,
    SlowWords,
    db_check,
    refused_connection,
    serve_process,
    slow_upstream,
    stream_chat,
)

STREAMS = 50


@pytest.fixture
def upstream() -> Iterator[str]:
    with slow_upstream() as url:
        yield url


async def _setup(config: Path) -> list[str]:
    db = await open_store(load_settings(str(config)).database.url)
    try:
        secrets = []
        for email in ("ann@example.com", "bob@example.com"):
            await accounts.create_user(db, email)
            await accounts.topup(db, email, "5")
            new = await accounts.create_key(db, email, accounts.KeyOptions(),
                                            known_models=load_settings(str(config)).model_index())
            secrets.append(new.secret)
        return secrets
    finally:
        await db.close()


async def _run(url: str, keys: list[str], process: subprocess.Popen[bytes]) -> tuple[list[Outcome], bool, int]:
    started = MidStreams(STREAMS)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = [asyncio.ensure_future(stream_chat(session, url, keys[n % 2], started)) for n in range(STREAMS)]
        await asyncio.wait_for(started.all.wait(), timeout=20)
        process.send_signal(signal.SIGTERM)
        refused = await refused_connection(url)
        in_flight = sum(not t.done() for t in tasks)  # still streaming after the listener closed
        outcomes = await asyncio.gather(*tasks)
    return outcomes, refused, in_flight


def test_sigterm_during_50_streams_settles_every_one(tmp_path: Path, database_url: str, upstream: str) -> None:
    config = write_config(tmp_path, database_url, upstream)
    keys = asyncio.run(_setup(config))
    with serve_process(config, tmp_path) as running:
        outcomes, refused, in_flight = asyncio.run(_run(running.url, keys, running.process))
        assert running.process.wait(timeout=30) == 0, running.log.read_text()
    text = running.log.read_text()

    # every request has exactly one usage row, charged once; nothing is left held
    rows = query(database_url, "SELECT request_id, status, cost FROM usage")
    assert sorted(r[0] for r in rows) == sorted(o.request_id for o in outcomes)
    assert {r[1] for r in rows} == {"ok"}  # every one finished within the drain
    assert query(database_url, "SELECT count(*) FROM holds") == [(0,)]
    assert query(database_url, "SELECT sum(held) FROM balances") == [(0,)]
    charged = query(database_url, "SELECT -sum(amount), count(*) FROM ledger WHERE kind = 'charge'")[0]
    assert charged == (sum(r[2] for r in rows), STREAMS)
    assert all(r[2] > 0 for r in rows)
    assert query(database_url, "SELECT sum(balance) FROM balances") == [(10_000_000 - charged[0],)]
    db_check(config, tmp_path)

    # it stopped accepting while the streams were still running, and finished every one of them
    assert refused, "a new connection was still accepted after SIGTERM"
    assert in_flight > 0
    assert [o.status for o in outcomes] == [200] * STREAMS
    assert all(o.done for o in outcomes), [o.events[-1:] for o in outcomes if not o.done]
    texts = {"".join(c["choices"][0]["delta"].get("content") or "" for c in o.events if c["choices"])
             for o in outcomes}
    assert texts == {"Héllo wörld, 你好 from the fake upstream."}
    assert {r[1] for r in rows} == {"ok"}

    # the log says nothing alarming and holds no secret
    assert "Traceback" not in text and "interrupted" not in text, text
    for key in keys:
        assert key not in text


DRAIN_SECONDS = 2


async def _cut_at_the_drain(url: str, keys: list[str], process: subprocess.Popen[bytes]) -> tuple[list[Outcome], float]:
    """Four streams at SIGTERM; the client of the fourth leaves during the drain, on its own."""
    started = MidStreams(4)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = [asyncio.ensure_future(stream_chat(session, url, keys[n % 2], started)) for n in range(4)]
        await asyncio.wait_for(started.all.wait(), timeout=20)
        signalled = asyncio.get_running_loop().time()
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        tasks[3].cancel()  # its connection closes
        outcomes = await asyncio.gather(*tasks[:3])
        return outcomes, asyncio.get_running_loop().time() - signalled


@pytest.mark.parametrize("workers", ["1", "2"])
def test_streams_longer_than_the_drain_are_cut_at_it_and_charged_what_they_delivered(
        tmp_path: Path, database_url: str, workers: str) -> None:
    """``server.shutdown_seconds`` bounds the drain, with one worker or several: streams still running
    then are cut and settled (the supervisor does not kill workers that keep to it), exit 0. Their
    rows say cut (the shutdown's doing); a client that left during the drain is client_gone."""
    with slow_upstream(SlowWords(word_delay=1.0)) as url:  # a stream of ~10 s
        config = write_config(tmp_path, database_url, url)
        config.write_text(config.read_text() + f"server: {{shutdown_seconds: {DRAIN_SECONDS}}}\n")
        keys = asyncio.run(_setup(config))
        with serve_process(config, tmp_path, "--workers", workers,
                           ready_text="with 2 workers" if workers == "2" else None) as running:
            outcomes, cut_after = asyncio.run(_cut_at_the_drain(running.url, keys, running.process))
            assert running.process.wait(timeout=30) == 0, running.log.read_text()
    assert DRAIN_SECONDS - 0.5 < cut_after < DRAIN_SECONDS + 3
    assert not any(o.done for o in outcomes)
    rows = query(database_url, "SELECT status, http_status, charged FROM usage")
    assert len(rows) == 4 and all(charged > 0 for _, _, charged in rows)
    assert sorted((status, http_status) for status, http_status, _ in rows) == [
        ("client_gone", 499), ("cut", 503), ("cut", 503), ("cut", 503)]
    assert query(database_url, "SELECT count(*) FROM holds") == [(0,)]
    db_check(config, tmp_path)
