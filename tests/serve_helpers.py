"""Helpers for the tests that run a real `apibox serve` process (test_shutdown, test_workers,
test_access_log): a slow fake upstream in its own thread, a free port, waiting for the server,
and streaming through it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from apibox.config import load_settings
from apibox.store import open_store
from tests import dbquery
from tests.conftest import fund
from tests.fake_upstream import FakeUpstream
from tests.gateway_helpers import sse_json


@dataclass
class SlowWords(FakeUpstream):
    """The fake upstream, pausing before each event it writes: a stream takes ~1.4 s."""

    word_delay: float = 0.1

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:  # type: ignore[override]
        await asyncio.sleep(self.word_delay)
        await FakeUpstream._write(response, data)


class UpstreamThread:
    """A fake upstream on its own event loop, outside the gateway's process."""

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


@contextmanager
def slow_upstream(fake: FakeUpstream | None = None) -> Iterator[str]:
    """The fake upstream (by default ``SlowWords``) running for the block; yields its URL."""
    running = UpstreamThread(fake or SlowWords())
    try:
        yield running.start()
    finally:
        running.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Running:
    """A real `apibox serve` process and where it listens and logs."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    config: Path


@contextmanager
def serve_process(config: Path, directory: Path, *options: str, ready_text: str | None = None) -> Iterator[Running]:
    """`apibox serve --config CONFIG --port FREE [options]` until the block ends (killed then if it is
    still running); stdout and stderr go to a log file in ``directory``; waits until it accepts
    connections (and, given ``ready_text``, until its log says so: ``with 2 workers``)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = directory / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "apibox", "serve", "--config", str(config), "--port",
                                    str(port), *options], stdout=out, stderr=subprocess.STDOUT, cwd=directory,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_until_serving(url, process, log)
            if ready_text is not None:
                wait_for_line(log, ready_text, process)
            yield Running(process, url, log, config)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        assert process.poll() is None, content
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the log:\n{log.read_text()}")


def wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the gateway at ``url`` accepts a connection (the process must not exit meanwhile)."""
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
    """One streamed chat completion as the client saw it."""

    request_id: str
    status: int
    events: list[dict]
    done: bool  # it ended with data: [DONE], not cut


class MidStreams:
    """Counts the streams that have got past their first word; ``all`` is set when ``expected`` have."""

    def __init__(self, expected: int) -> None:
        self.expected, self.count, self.all = expected, 0, asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.all.set()


async def stream_chat(session: aiohttp.ClientSession, url: str, key: str, mid_stream: Callable[[], None],
                      model: str = "gpt-fake") -> Outcome:
    """Stream one chat completion to its end (or its cut); ``mid_stream()`` once the first word arrived."""
    body = {"model": model, "messages": [{"role": "user", "content": "tell me"}], "stream": True,
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
                    mid_stream()
        except aiohttp.ClientPayloadError:
            cut = True  # the server closed the stream before its end
        events = sse_json(raw.rsplit(b"\n\n", 1)[0] + b"\n\n") if cut else sse_json(raw)
        return Outcome(response.headers["x-request-id"], response.status, events,
                       not cut and raw.rstrip().endswith(b"data: [DONE]"))


async def refused_connection(url: str) -> bool:
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


# -- accounts and books of a database a real process serves ------------------------------------


def db_check(config: Path, cwd: Path) -> None:
    check = subprocess.run([sys.executable, "-m", "apibox", "db", "check", "--config", str(config)],
                           capture_output=True, text=True, cwd=cwd, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


async def make_keys(config: Path, funds: dict[str, str]) -> list[str]:
    settings = load_settings(str(config))
    db = await open_store(settings.database.url)
    try:
        return [await fund(db, settings, email, usd) for email, usd in funds.items()]
    finally:
        await db.close()


def query(url: str, sql: str) -> list[tuple]:
    return [tuple(row) for row in dbquery.query(url, sql)]


def assert_books(url: str, topped_up: int) -> None:
    """Nothing held, never below zero, the charges in the ledger are the usage rows' charges."""
    assert query(url, "SELECT count(*) FROM holds") == [(0,)]
    assert query(url, "SELECT min(balance) FROM balances")[0][0] >= 0
    assert query(url, "SELECT sum(held) FROM balances") == [(0,)]
    charged = query(url, "SELECT coalesce(-sum(amount), 0) FROM ledger WHERE kind = 'charge'")[0][0]
    assert charged == query(url, "SELECT coalesce(sum(charged), 0) FROM usage")[0][0]
    assert query(url, "SELECT sum(balance) FROM balances") == [(topped_up - charged,)]


NEW_MODEL = """
  - name: gpt-new
    routes: [{provider: fake, model: fake-new-1}]
    price: {input: 100, output: 200}
    max_output_tokens: 1000
"""


def add_model(config: Path) -> None:
    """The config file with one more model, ``gpt-new`` (inserted into the ``models:`` list)."""
    text = config.read_text()
    config.write_text(text.replace("\nmodels:\n", "\nmodels:" + NEW_MODEL, 1))
