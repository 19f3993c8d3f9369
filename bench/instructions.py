"""Instructions per request, counted by callgrind: a measure that does not drift with the machine.

Throughput on a shared VM moves by 10-40% from one minute to the next, more than most changes
to the hot path. The instructions a gateway executes for one request do not: callgrind counts
them (user space only, every thread of the process; the kernel is not counted), and two runs of
the same code agree to 0.1% (non-streamed) or 1-2% (streams, whose reads split where the
timing puts them). It answers "did this change make a request cheaper, and by how much",
against the forwarder measured the same way, one request at a time (no group commits, no
batching: the cost of a request alone).

    python -m bench.instructions                            # json, sse and paced (chunks 2 ms apart)
    python -m bench.instructions --scenarios json --requests 200
    python -m bench.instructions --scenarios sse,padded     # padded: OpenAI's obfuscation in every chunk

Needs valgrind (`apt-get install valgrind`). A target runs about 50 times slower under it, so
the defaults (30 warm-up requests, then 100 counted) take a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

from bench import apibox_target, procs
from bench.harness import chat_request, mock_command, reference_dir, wait_http


@dataclass(frozen=True)
class Scenario:
    stream: bool
    chunk_delay_ms: float = 0.0
    padded: bool = False  # chunks carry OpenAI's "obfuscation" padding (this directory's mock only)


SCENARIOS = {"json": Scenario(False), "sse": Scenario(True), "paced": Scenario(True, 2.0),
             "padded": Scenario(True, padded=True)}
T = TypeVar("T")


@dataclass
class Count:
    target: str
    scenario: str
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def callgrind_totals(path: Path) -> int:
    """The ``totals:`` line of a callgrind output file: every instruction counted while instrumenting."""
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"{path} has no totals line (was anything counted?)")


async def send(url: str, headers: dict[str, str], stream: bool, count: int) -> None:
    """``count`` requests one after another on one connection; any answer but 200 is an error."""
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(url, json=chat_request(stream), headers=headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}: {body[:200]!r}")


def callgrind_control(*args: str, pid: int) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def count(target: str, scenario: str, cmd: list[str], ready_url: str, url: str, headers: dict[str, str],
          stream: bool, args: argparse.Namespace, out: Path) -> Count:
    """Start ``cmd`` under callgrind with counting off, warm it up, count ``args.requests`` requests."""
    stem = out / f"{target}-{scenario}-{time.monotonic_ns()}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={stem}.%p.cg"]

    def begin(pid: int) -> None:
        callgrind_control("--zero", pid=pid)
        callgrind_control("--instr=on", pid=pid)

    def end(pid: int) -> None:
        callgrind_control("--instr=off", pid=pid)
        callgrind_control("--dump", pid=pid)
    pid = counted_run([*valgrind, *cmd], Path(f"{stem}.log"), ready_url, url, headers, stream, args, begin, end,
                      ready_seconds=300, grace=60)
    dumps = sorted(out.glob(f"{stem.name}.{pid}.cg.*"))  # the --dump above (not the final one at exit)
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {target}; see {stem}.log")
    return Count(target, scenario, args.requests, callgrind_totals(dumps[0]))


def counted_run(cmd: list[str], log: Path, ready_url: str, url: str, headers: dict[str, str], stream: bool,
                args: argparse.Namespace, begin: Callable[[int], None], end: Callable[[int], None], *,
                ready_seconds: float, grace: float = 10, cwd: Path | None = None) -> int:
    """Start ``cmd`` on ``args.proxy_cpus``, send it ``args.warmup`` requests, then ``args.requests``
    between ``begin(pid)`` and ``end(pid)``, and stop it: the measuring window of this module and
    bench.bytecodes. Returns the pid."""
    proc = procs.start(cmd, cpus=args.proxy_cpus, log=log, cwd=cwd)
    try:
        wait_http(ready_url, proc, ready_seconds)
        asyncio.run(send(url, headers, stream, args.warmup))
        begin(proc.pid)
        asyncio.run(send(url, headers, stream, args.requests))
        end(proc.pid)
    finally:
        procs.stop(proc, grace=grace)
    return proc.pid


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser("bench.instructions", __doc__).parse_args(argv)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options of a one-request-at-a-time measure (this one, and bench.bytecodes)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    ap.add_argument("--scenarios", default="json,sse,paced", help=f"comma list of {', '.join(SCENARIOS)}")
    ap.add_argument("--requests", type=int, default=100, help="requests counted per cell")
    ap.add_argument("--warmup", type=int, default=30, help="requests before counting starts")
    ap.add_argument("--proxy-cpus", default="0", help="taskset CPU list of the target ('' = unpinned)")
    ap.add_argument("--load-cpus", default="1", help="taskset CPU list of the mock upstream")
    ap.add_argument("--port-base", type=int, default=18300, help="upstream on it, the targets +1")
    ap.add_argument("--shared", default=None, help="directory with the reference mock_upstream.py and bare_proxy.py")
    return ap


def unknown_scenarios(scenarios: str) -> str | None:
    """What is wrong with a comma list of scenarios, if anything."""
    unknown = set(scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        return f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}"
    return None


def measure_scenario(name: str, args: argparse.Namespace, ref: Path, out: Path,
                     counter: Callable[..., T]) -> list[T]:
    """``counter``'s measure of the forwarder and of apibox, each under the same upstream."""
    scenario = SCENARIOS[name]
    stream = scenario.stream
    upstream_port, port = args.port_base, args.port_base + 1
    upstream = procs.start([*mock_command(ref, scenario.padded), "--port", str(upstream_port), "--chunks", "20",
                            "--chunk-delay-ms", str(scenario.chunk_delay_ms)], cpus=args.load_cpus,
                           log=out / f"upstream-{name}.log")
    counts: list[T] = []
    try:
        wait_http(f"http://127.0.0.1:{upstream_port}/health", upstream, 30)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        bare = [sys.executable, str(ref / "bare_proxy.py"), "--port", str(port),
                "--upstream", f"http://127.0.0.1:{upstream_port}"]
        counts.append(counter("bare", name, bare, f"http://127.0.0.1:{port}/health", url, {}, stream, args, out))
        setup = apibox_target.prepare(out / f"apibox-{name}", f"http://127.0.0.1:{upstream_port}/v1", port)
        counts.append(counter("apibox", name, setup.serve_cmd(), f"http://127.0.0.1:{port}/healthz", url,
                            {"Authorization": f"Bearer {setup.key}"}, stream, args, out))
    finally:
        procs.stop(upstream)
    return counts


def report(counts: list[Count]) -> str:
    lines = ["| scenario | bare | apibox | apibox / bare |", "|---|---|---|---|"]
    for scenario in dict.fromkeys(c.scenario for c in counts):
        by = {c.target: c.per_request for c in counts if c.scenario == scenario}
        lines.append(f"| {scenario} | {by['bare']:,.0f} | {by['apibox']:,.0f} | {by['apibox'] / by['bare']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = unknown_scenarios(args.scenarios)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    ref, _ = reference_dir(args.shared)
    with tempfile.TemporaryDirectory(prefix="apibox-instructions-") as tmp:
        counts = [c for name in args.scenarios.split(",") for c in measure_scenario(name, args, ref, Path(tmp), count)]
    print("Instructions per request, one request at a time (callgrind; user space, every thread):")
    print(report(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
