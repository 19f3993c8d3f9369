"""`apibox serve --workers N`: several processes on one port and one database, on both engines.

A real `apibox serve --workers 2` process (a supervisor and two workers) in front of a fake
upstream in this process: both workers answer, one small balance loaded through both is
never overdrawn and its books balance, SIGTERM to the supervisor lets every stream on every
worker finish and be settled, a worker killed with SIGKILL is replaced, and no worker
outlives its supervisor. The supervisor's restart and give-up rules are checked on stand-in
workers that only say ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from typer.testing import CliRunner

from apibox.cli.main import app as cli_app
from apibox.gateway.workers import supervise
from tests.cli_helpers import assert_one_line_error
from tests.conftest import write_config
from tests.fake_upstream import FakeUpstream
from tests.serve_helpers import (
    MidStreams,
    Running,
    assert_books,
    db_check,
    make_keys,
    query,
    refused_connection,
    serve_process,
    slow_upstream,
    stream_chat,
    wait_for_line,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads load on Linux")

WORKERS = 2


@contextmanager
def serving(tmp_path: Path, config: Path, workers: int = WORKERS) -> Iterator[Running]:
    """`apibox serve --workers N` until the block ends; waits for its one "serving on" line."""
    with serve_process(config, tmp_path, "--workers", str(workers), ready_text=f"with {workers} workers") as running:
        yield running


async def worker_pids(url: str, expected: int = WORKERS, tries: int = 200) -> set[int]:
    """Probe /healthz on new connections until ``expected`` different workers have answered."""
    seen: set[int] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(tries):
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
                seen.add((await response.json())["pid"])
            if len(seen) == expected:
                return seen
    raise AssertionError(f"only workers {seen} answered {tries} new connections")


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def gone(pid: int) -> bool:
    """The process has exited and been reaped (no zombie, no orphan)."""
    return not Path(f"/proc/{pid}").exists()


async def on_one_connection(url: str, work) -> tuple[int, object]:  # type: ignore[no-untyped-def]
    """Ask /healthz, then run ``work(session)`` on the same kept-alive connection: which worker served it."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(f"{url}/healthz") as response:
            pid = (await response.json())["pid"]
        return pid, await work(session)


# -- the real thing --------------------------------------------------------------------------


def test_both_workers_answer_and_one_small_balance_is_never_overdrawn(tmp_path: Path, database_url: str) -> None:
    with slow_upstream(FakeUpstream(delay=0.2)) as upstream:
        config = write_config(tmp_path, database_url, upstream)
        [key] = asyncio.run(make_keys(config, {"ann@example.com": "0.004"}))  # about 40 answers
        with serving(tmp_path, config) as running:
            pids = asyncio.run(worker_pids(running.url))
            assert all(parent_of(pid) == running.process.pid for pid in pids)
            served = asyncio.run(_drain_balance(running.url, key))
            running.process.send_signal(signal.SIGTERM)
            assert running.process.wait(timeout=30) == 0, running.log.read_text()
    statuses = {status for _, status in served}
    assert statuses == {200, 402}, served
    assert {pid for pid, status in served if status == 200} == pids  # both workers took the money
    assert query(database_url, "SELECT count(*) FROM usage WHERE cost > 0") == [(sum(s == 200 for _, s in served),)]
    assert_books(database_url, 4_000)
    cheapest = query(database_url, "SELECT min(cost) FROM usage WHERE cost > 0")[0][0]
    assert query(database_url, "SELECT balance FROM balances")[0][0] < cheapest  # it was spent, not lost
    db_check(config, tmp_path)
    text = running.log.read_text()
    assert "Traceback" not in text and "interrupted" not in text, text
    assert key not in text


async def _drain_balance(url: str, key: str) -> list[tuple[int, int]]:
    """Rounds of 24 concurrent requests, each on its own connection, until every one is refused.
    Small answers (5 tokens), so that many holds fit in the balance at once and race for it."""
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    async def ask(session: aiohttp.ClientSession) -> int:
        async with session.post(f"{url}/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as response:
            await response.read()
            return response.status

    served: list[tuple[int, int]] = []
    for _ in range(20):
        round_ = await asyncio.gather(*(on_one_connection(url, ask) for _ in range(24)))
        served += round_  # type: ignore[arg-type]
        if all(status == 402 for _, status in round_):
            return served
    raise AssertionError(f"the balance never ran out: {served}")


def test_sigterm_to_the_supervisor_settles_the_streams_on_every_worker(tmp_path: Path, database_url: str) -> None:
    streams = 20
    with slow_upstream() as upstream:
        config = write_config(tmp_path, database_url, upstream)
        keys = asyncio.run(make_keys(config, {"ann@example.com": "5", "bob@example.com": "5"}))
        with serving(tmp_path, config) as running:
            pids = asyncio.run(worker_pids(running.url))
            outcomes, refused = asyncio.run(_streams_then_sigterm(running, keys, streams))
            assert running.process.wait(timeout=30) == 0, running.log.read_text()
    assert refused, "a new connection was still accepted after SIGTERM"
    assert {pid for pid, _ in outcomes} == pids  # streams were in flight on both workers
    assert all(gone(pid) for pid in pids), "a worker outlived its supervisor"
    assert [o.status for _, o in outcomes] == [200] * streams
    assert all(o.done for _, o in outcomes), [o.events[-1:] for _, o in outcomes if not o.done]
    rows = query(database_url, "SELECT request_id, status FROM usage")
    assert sorted(r[0] for r in rows) == sorted(o.request_id for _, o in outcomes)
    assert {r[1] for r in rows} == {"ok"}
    assert_books(database_url, 10_000_000)
    db_check(config, tmp_path)
    text = running.log.read_text()
    assert "Traceback" not in text and "interrupted" not in text, text
    assert text.count("stopping 2 workers (SIGTERM)") == 1


async def _streams_then_sigterm(running: Running, keys: list[str], streams: int):  # type: ignore[no-untyped-def]
    started = MidStreams(streams)

    def chat(n: int):  # type: ignore[no-untyped-def]
        return lambda session: stream_chat(session, running.url, keys[n % 2], started)

    tasks = [asyncio.ensure_future(on_one_connection(running.url, chat(n))) for n in range(streams)]
    await asyncio.wait_for(started.all.wait(), timeout=20)
    running.process.send_signal(signal.SIGTERM)
    refused = await refused_connection(running.url)
    assert sum(not t.done() for t in tasks) > 0  # still streaming after the listeners closed
    return await asyncio.gather(*tasks), refused


def test_a_killed_worker_is_replaced_and_service_goes_on(tmp_path: Path, database_url: str) -> None:
    with slow_upstream(FakeUpstream()) as upstream:
        config = write_config(tmp_path, database_url, upstream)
        [key] = asyncio.run(make_keys(config, {"ann@example.com": "1"}))
        with serving(tmp_path, config) as running:
            before = asyncio.run(worker_pids(running.url))
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            text = wait_for_line(running.log, "restarted (pid", running.process)
            after = asyncio.run(worker_pids(running.url))
            assert victim not in after and len(after & before) == 1
            assert all(parent_of(pid) == running.process.pid for pid in after)
            statuses = asyncio.run(_chat_many(running.url, key, 20))
            assert statuses == [200] * 20
            running.process.send_signal(signal.SIGTERM)
            assert running.process.wait(timeout=30) == 0, running.log.read_text()
    assert f"(pid {victim}) was killed by SIGKILL; restarting it in 0.5 s" in text, text
    assert all(gone(pid) for pid in after)
    assert query(database_url, "SELECT count(*) FROM usage WHERE status = 'ok'") == [(20,)]
    assert_books(database_url, 1_000_000)
    db_check(config, tmp_path)


async def _chat_many(url: str, key: str, count: int) -> list[int]:
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}

    async def ask(session: aiohttp.ClientSession) -> int:
        async with session.post(f"{url}/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        return list(await asyncio.gather(*(ask(session) for _ in range(count))))


def test_the_supervisor_leaves_no_worker_behind_when_it_is_killed(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/apibox.db")  # about processes: one engine is enough
    with serving(tmp_path, config) as running:
        pids = asyncio.run(worker_pids(running.url))
        running.process.kill()  # SIGKILL: no chance to pass anything on
        running.process.wait()
        deadline = time.monotonic() + 10
        while not all(gone(pid) or _zombie(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert all(gone(pid) or _zombie(pid) for pid in pids), "a worker outlived its supervisor"
    assert "the supervisor is gone; stopping this worker" in running.log.read_text()
    db_check(config, tmp_path)


def _zombie(pid: int) -> bool:
    """Exited, waiting for a reaper: an orphan's reaper (the container's pid 1) may never come."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


# -- the command line ------------------------------------------------------------------------


def serve_command(*args: str):  # type: ignore[no-untyped-def]
    """`apibox serve ARGS` in this process, on the built-in defaults (refused before it listens)."""
    return CliRunner().invoke(cli_app, ["serve", *args])


def test_workers_must_be_one_or_more() -> None:
    for bad in ("0", "-3"):
        assert_one_line_error(serve_command("--workers", bad), f"--workers must be 1 or more, got {bad}")


def test_workers_refuse_a_port_already_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(serve_command("--workers", "2", "--port", str(port)), f"port {port} is already in use")
    assert_one_line_error(serve_command("--workers", "2", "--port", "0"), "--workers needs a fixed port")


def test_one_process_refuses_a_port_it_cannot_listen_on_in_one_line(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "apibox", "serve", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: " in done.stderr and "in use" in done.stderr
    done = serve("--host", "999.1.1.1", "--port", "0")
    assert done.returncode == 1 and "Traceback" not in done.stderr and "cannot listen on 999.1.1.1:0" in done.stderr
    done = serve("--port", "99999")
    assert done.returncode == 2 and "99999 is not in the range 0<=x<=65535" in done.stderr


# -- the supervisor's rules, on stand-in workers ---------------------------------------------

STAND_IN = """
import socket, sys, time
channel = socket.socket(fileno=int(sys.argv[1]))
if sys.argv[2] == "crash":
    channel.sendall(b"ready\\n")
    time.sleep(0.2)
sys.exit(3)
"""


def stand_in(mode: str):  # type: ignore[no-untyped-def]
    return lambda fd: [sys.executable, "-c", STAND_IN, str(fd), mode]


async def test_instant_crashes_are_retried_then_given_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "apibox.workers")
    ready: list[bool] = []
    code = await asyncio.wait_for(supervise(stand_in("crash"), 2, database_url=f"sqlite:///{tmp_path}/a.db",
                                            ready=lambda: ready.append(True), restart_delay=0.01), 30)
    assert code == 1
    assert ready == [True]  # both were ready once, so the service was announced
    restarts = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
    assert len(restarts) >= 4 and all("exited with code 3" in line for line in restarts)
    assert any("times in a row" in r.getMessage() and "giving up" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "a.db").exists()  # the migrations were applied before any worker started


async def test_a_worker_that_never_gets_ready_stops_the_start(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ready: list[bool] = []
    code = await asyncio.wait_for(supervise(stand_in("never-ready"), 2, database_url=f"sqlite:///{tmp_path}/a.db",
                                            ready=lambda: ready.append(True), restart_delay=0.01), 30)
    assert code == 1 and ready == []
    assert any("before it was serving; stopping" in r.getMessage() for r in caplog.records)
    assert not any("restarting" in r.getMessage() for r in caplog.records)
