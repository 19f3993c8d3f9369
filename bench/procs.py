"""Processes the benchmark starts: each in its own session, pinned, measured, stopped by group id.

Nothing is ever stopped by name. Every child is started with ``start_new_session`` so it
leads its own process group (pgid == pid); ``stop`` signals exactly that group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def start(cmd: list[str], *, cpus: str | None, log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    full = (["taskset", "-c", cpus] if cpus else []) + cmd
    environ = dict(os.environ)
    environ.update(env or {})
    with open(log, "ab") as out:
        return subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=environ,
                                cwd=str(cwd) if cwd else None, start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL what is left.

    Returns the leader's exit code (None if it had to be killed and did not report one).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # whatever is left in the group (workers, a stuck leader) is killed
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    return proc.returncode


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields after "pid (comm) "


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in the group."""
    ticks = 0
    for pid in group_pids(pgid):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of ``root`` and its descendants (a database server's backends): of the
    live ones, and of those that ended (their parents reaped them, which adds their time to the
    parent's cutime and cstime), so backends coming and going do not make the figure jump."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        todo += children.get(pid, [])
    return ticks / CLK_TCK


def group_rss_mb(pgid: int) -> float:
    kb = 0
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
        except OSError:
            continue
    return kb / 1024


def machine_busy_seconds() -> float:
    """Busy CPU time of the whole machine, all cores (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def pin_group(pgid: int, cpus: str) -> None:
    for pid in group_pids(pgid):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
