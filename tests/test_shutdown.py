"""SIGTERM during 50 streaming requests on a real `apibox serve` process: it stops accepting,
finishes the streams in flight, settles every one of them, and leaves books that `apibox db
check` accepts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from apibox import accounts
from apibox.config import load_settings
from apibox.store import open_store
from tests.conftest import write_config
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import sse_json

STREAMS = 50


@dataclass
class SlowWords(FakeUpstream):
    """The fake upstream, pausing before each event it writes: a stream takes ~1.4 s."""

    word_delay: float = 0.1

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:  # type: ignore[override]
        await asyncio.sleep(self.word_delay)
        await FakeUpstream._write(response, data)


class UpstreamThread:
    """The slow fake upstream on its own event loop, outside the gateway's process."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    def start(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    async def _start(self) -> str:
        self.runner = web.AppRunner(self.fake.app(), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def upstream() -> Iterator[str]:
    running = UpstreamThread(SlowWords())
    try:
        yield running.start()
    finally:
        running.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with socket.create_connection((url.split(":")[1].strip("/"), int(url.rsplit(":", 1)[1])), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"apibox serve did not start:\n{log.read_text()}")


@dataclass
class Outcome:
    request_id: str
    status: int
    events: list[dict]
    done: bool


async def _stream(session: aiohttp.ClientSession, url: str, key: str, started: asyncio.Event,
                  counter: list[int]) -> Outcome:
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "tell me"}], "stream": True,
            "max_tokens": 50}
    async with session.post(f"{url}/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as response:
        raw = b""
        seen_content = cut = False
        try:
            async for chunk in response.content.iter_any():
                raw += chunk
                if not seen_content and raw.count(b"data:") >= 2:  # the role and the first word: mid-stream
                    seen_content = True
                    counter[0] += 1
                    if counter[0] == STREAMS:
                        started.set()
        except aiohttp.ClientPayloadError:
            cut = True  # the server closed the stream before its end
        events = sse_json(raw.rsplit(b"\n\n", 1)[0] + b"\n\n") if cut else sse_json(raw)
        return Outcome(response.headers["x-request-id"], response.status, events,
                       not cut and raw.rstrip().endswith(b"data: [DONE]"))


async def _refused_connection(url: str) -> bool:
    """True once a new connection to the gateway is refused (it has stopped accepting)."""
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return True
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.02)
    return False


async def _run(url: str, keys: list[str], process: subprocess.Popen[bytes]) -> tuple[list[Outcome], bool, int]:
    started, counter = asyncio.Event(), [0]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = [asyncio.ensure_future(_stream(session, url, keys[n % 2], started, counter)) for n in range(STREAMS)]
        await asyncio.wait_for(started.wait(), timeout=20)
        process.send_signal(signal.SIGTERM)
        refused = await _refused_connection(url)
        in_flight = sum(not t.done() for t in tasks)  # still streaming after the listener closed
        outcomes = await asyncio.gather(*tasks)
    return outcomes, refused, in_flight


def _query(db_path: Path, sql: str) -> list[tuple]:
    import sqlite3
    from contextlib import closing
    with closing(sqlite3.connect(db_path)) as db:
        return list(db.execute(sql))


def test_sigterm_during_50_streams_settles_every_one(tmp_path: Path, upstream: str) -> None:
    config = write_config(tmp_path, upstream)
    keys = asyncio.run(_setup(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "apibox", "serve", "--config", str(config),
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_until_serving(url, process, log)
            outcomes, refused, in_flight = asyncio.run(_run(url, keys, process))
            assert process.wait(timeout=30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()

    # every request has exactly one usage row, charged once; nothing is left held
    db = tmp_path / "apibox.db"
    rows = _query(db, "SELECT request_id, status, cost FROM usage")
    assert sorted(r[0] for r in rows) == sorted(o.request_id for o in outcomes)
    assert {r[1] for r in rows} <= {"ok", "cut", "client_gone"}
    assert _query(db, "SELECT count(*) FROM holds") == [(0,)]
    assert _query(db, "SELECT sum(held) FROM balances") == [(0,)]
    charged = _query(db, "SELECT -sum(amount), count(*) FROM ledger WHERE kind = 'charge'")[0]
    assert charged == (sum(r[2] for r in rows), STREAMS)
    assert all(r[2] > 0 for r in rows)
    assert _query(db, "SELECT sum(balance) FROM balances") == [(10_000_000 - charged[0],)]
    check = subprocess.run([sys.executable, "-m", "apibox", "db", "check", "--config", str(config)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

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
