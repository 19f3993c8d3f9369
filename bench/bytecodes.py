"""Bytecodes per request, by function: where a request's Python work goes, counted rather than sampled.

py-spy samples, so two runs of it disagree by more than most changes to one function; callgrind
(``bench.instructions``) counts exactly, but cannot say which Python function ran. This counts
the bytecodes each Python function executes (``sys.settrace`` with opcode events) in the
forwarder and in apibox, one request at a time, and lists the functions by how many more apibox
runs. Only the event loop's thread is traced, and C code (SQLite, orjson, the HTTP parsers)
runs no bytecodes: it is in bench.instructions' figures, not in these.

    python -m bench.bytecodes --scenarios sse --requests 200 --top 30

Run from the repository root: each target starts as ``python -m bench.bytecodes --serve FILE --
<its command>``, which traces nothing until SIGUSR1 and writes its counts at SIGUSR2, so the
warm-up is not counted. Traced, a request is some 20 times slower.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from bench import instructions
from bench.harness import reference_dir

REPO = Path(__file__).resolve().parent.parent
_INSTALLED = re.compile(r"^.*/site-packages/|^.*/lib/python3\.\d+/")
DUMP_WAIT_SECONDS = 30


class Tracer:
    """Counts the bytecodes (and the calls and resumptions) of every function the thread runs, between
    ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.bytecodes: Counter[CodeType] = Counter()
        self.calls: Counter[CodeType] = Counter()
        self.generated: dict[CodeType, str] = {}  # code made at run time (a dataclass's __init__): its class

    def start(self) -> None:
        self.bytecodes.clear()
        self.calls.clear()
        self.generated.clear()
        sys.settrace(self._call)

    def stop(self) -> None:
        sys.settrace(None)

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        self.calls[code] += 1
        if code.co_filename == "<string>" and code not in self.generated:
            # every dataclass's __init__ is `<string>:2:__create_fn__.<locals>.__init__`: tell them apart
            owner = frame.f_locals.get("self")
            self.generated[code] = f"{type(owner).__qualname__}." if owner is not None else ""
        return self._opcode

    def _opcode(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.bytecodes[frame.f_code] += 1
        return self._opcode

    def lines(self) -> list[str]:
        """``bytecodes<TAB>calls<TAB>file:line:function``, most bytecodes first."""
        return [f"{n}\t{self.calls[code]}\t{code.co_filename}:{code.co_firstlineno}:"
                f"{self.generated.get(code, '')}{code.co_qualname}" for code, n in self.bytecodes.most_common()]


def serve(dump: Path, argv: list[str]) -> None:
    """Run ``argv`` (a script, or ``-m module``) in this interpreter, traced from SIGUSR1 to SIGUSR2."""
    tracer = Tracer()

    def write(*_: Any) -> None:
        tracer.stop()
        part = dump.with_name(dump.name + ".part")  # renamed when whole: the reader waits for the name
        part.write_text("".join(line + "\n" for line in tracer.lines()))
        part.replace(dump)

    signal.signal(signal.SIGUSR1, lambda *_: tracer.start())
    signal.signal(signal.SIGUSR2, write)
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


@dataclass
class Profile:
    target: str
    scenario: str
    requests: int
    bytecodes: dict[str, int]  # by function (file:line:name)

    def per_request(self, function: str) -> float:
        return self.bytecodes.get(function, 0) / self.requests

    @property
    def total(self) -> float:
        return sum(self.bytecodes.values()) / self.requests


def read_dump(path: Path) -> dict[str, int]:
    """A dump's bytecodes by function, with the paths of installed packages shortened."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        bytecodes, _, function = line.split("\t", 2)
        counts[_short(function)] += int(bytecodes)
    return dict(counts)


def _short(function: str) -> str:
    """A function's place, relative to its package's folder, the standard library's or the repository."""
    return _INSTALLED.sub("", function, count=1).removeprefix(f"{REPO}/")


def count(target: str, scenario: str, cmd: list[str], ready_url: str, url: str, headers: dict[str, str],
          stream: bool, args: argparse.Namespace, out: Path) -> Profile:
    """Start ``cmd`` traced, warm it up, count ``args.requests`` requests."""
    dump = out / f"{target}-{scenario}.bytecodes"
    traced = [cmd[0], "-m", "bench.bytecodes", "--serve", str(dump), "--", *cmd[1:]]

    def begin(pid: int) -> None:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)  # the handler runs at the target's next bytecode; the loop wakes for it

    def end(pid: int) -> None:
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + DUMP_WAIT_SECONDS
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    instructions.counted_run(traced, out / f"{target}-{scenario}.log", ready_url, url, headers, stream, args,
                             begin, end, ready_seconds=60, cwd=REPO)
    if not dump.exists():
        raise RuntimeError(f"{target} wrote no counts; see {out / f'{target}-{scenario}.log'}")
    return Profile(target, scenario, args.requests, read_dump(dump))


def report(bare: Profile, apibox: Profile, top: int) -> str:
    """The functions apibox runs most bytecodes in beyond the forwarder, per request."""
    lines = [f"{apibox.scenario}: {apibox.total:,.0f} bytecodes a request in apibox, {bare.total:,.0f} in the "
             f"forwarder", "", "| more | apibox | forwarder | function |", "|---|---|---|---|"]
    functions = set(apibox.bytecodes) | set(bare.bytecodes)
    extra = sorted(functions, key=lambda f: bare.per_request(f) - apibox.per_request(f))
    for function in extra[:top]:
        mine, theirs = apibox.per_request(function), bare.per_request(function)
        lines.append(f"| {mine - theirs:,.0f} | {mine:,.0f} | {theirs:,.0f} | {function} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve(Path(argv[1]), argv[argv.index("--") + 1:])
        return 0
    ap = instructions.parser("bench.bytecodes", __doc__)
    ap.add_argument("--top", type=int, default=40, help="functions listed per scenario")
    args = ap.parse_args(argv)
    problem = instructions.unknown_scenarios(args.scenarios)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    ref, _ = reference_dir(args.shared)
    with tempfile.TemporaryDirectory(prefix="apibox-bytecodes-") as tmp:
        for name in args.scenarios.split(","):
            bare, apibox = instructions.measure_scenario(name, args, ref, Path(tmp), count)
            print(report(bare, apibox, args.top), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
