"""bench/bytecodes.py: the tracer's counts, their dump and the table that compares the two targets."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import bytecodes
from bench.bytecodes import Profile, Tracer


def _three_adds() -> int:
    total = 0
    for step in range(3):
        total += step
    return total


def test_the_tracer_counts_only_between_start_and_stop() -> None:
    tracer = Tracer()
    _three_adds()  # before start: not counted
    tracer.start()
    _three_adds()
    _three_adds()
    tracer.stop()
    _three_adds()  # after stop: not counted
    counted = {code.co_name: n for code, n in tracer.bytecodes.items()}
    calls = {code.co_name: n for code, n in tracer.calls.items()}
    assert calls["_three_adds"] == 2
    assert counted["_three_adds"] % 2 == 0 and counted["_three_adds"] >= 2 * 10  # the same work twice
    line = next(line for line in tracer.lines() if line.endswith(":_three_adds"))
    assert line.split("\t")[:2] == [str(counted["_three_adds"]), "2"]


def test_a_served_script_is_traced_from_the_first_signal_to_the_second(tmp_path: Path) -> None:
    script = tmp_path / "target.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        def tick():
            return sum(range(5))
        assert sys.argv[1:] == ["--flag", "x"]
        print("ready", flush=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tick()
            time.sleep(0.01)
    """))
    dump = tmp_path / "counts"
    with subprocess.Popen([sys.executable, "-m", "bench.bytecodes", "--serve", str(dump), "--", str(script),
                           "--flag", "x"], cwd=bytecodes.REPO, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(0.2)
            assert not dump.exists()  # nothing is written before the second signal
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)  # a hundred ticks traced, or some on a machine that stalls for half a second
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not dump.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            proc.kill()
    counts = bytecodes.read_dump(dump)
    ticks = [function for function in counts if function.endswith(":tick")]
    assert len(ticks) == 1 and counts[ticks[0]] > 0
    assert ticks[0].startswith(str(script)) and ":3:tick" in ticks[0]


@pytest.mark.parametrize(("place", "short"), [
    ("/x/.venv/lib/python3.11/site-packages/aiohttp/streams.py:539:StreamReader.feed",
     "aiohttp/streams.py:539:StreamReader.feed"),
    ("/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/events.py:78:Handle._run",
     "asyncio/events.py:78:Handle._run"),
    (f"{bytecodes.REPO}/apibox/sse.py:45:SSEDecoder.feed_data", "apibox/sse.py:45:SSEDecoder.feed_data"),
    ("<string>:2:__create_fn__.<locals>.__init__", "<string>:2:__create_fn__.<locals>.__init__"),
])
def test_places_are_shortened_to_their_package(place: str, short: str, tmp_path: Path) -> None:
    dump = tmp_path / "counts"
    dump.write_text(f"7\t1\t{place}\n5\t2\t{place}\n")  # the same function under two code objects: summed
    assert bytecodes.read_dump(dump) == {short: 12}


def test_the_table_lists_what_apibox_runs_beyond_the_forwarder_per_request() -> None:
    bare = Profile("bare", "sse", 10, {"shared": 1_000, "only-bare": 500})
    apibox = Profile("apibox", "sse", 10, {"shared": 1_500, "mine": 3_000, "small": 10})
    lines = bytecodes.report(bare, apibox, top=3).splitlines()
    assert lines[0] == "sse: 451 bytecodes a request in apibox, 150 in the forwarder"
    assert lines[4:] == ["| 300 | 300 | 0 | mine |", "| 50 | 150 | 100 | shared |", "| 1 | 1 | 0 | small |"]
