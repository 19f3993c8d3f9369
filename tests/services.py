"""Throwaway PostgreSQL and Redis servers for the test suite, on loopback, in a temporary folder.

The test session (conftest's ``postgres_server`` and ``redis_url`` fixtures) uses the server at
``APIBOX_TEST_POSTGRES_URL`` / ``APIBOX_TEST_REDIS_URL`` when set, and otherwise starts its own
here and stops it at the end. ``.ci/run`` starts both once for the whole run with the same code:

    eval "$(python3 tests/services.py start DIR)"   # prints: export APIBOX_TEST_..._URL=...
    python3 tests/services.py stop DIR

Standard library only: ``.ci/run`` calls it before the virtualenv exists. PostgreSQL runs with
trust authentication on 127.0.0.1 and without durability (fsync, synchronous_commit and
full_page_writes off): it holds test data only. Its files live in memory when the tmpfs at /dev/shm
has room, and the suite then copies a database per test (hundreds of files each: on this VM's
disk a file's creation took 0.3 ms and a database's copy 200 ms, against 10 in memory; see
conftest's ``PostgresDatabase``). initdb refuses
to run as root, so as root the PostgreSQL programs run as the ``postgres`` OS user (the Debian
package creates it).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POSTGRES_ENV = "APIBOX_TEST_POSTGRES_URL"
REDIS_ENV = "APIBOX_TEST_REDIS_URL"
HINT = ("run .ci/run (it installs PostgreSQL and Redis when missing and starts them), or point {env} at a "
        "running server")
POSTGRES_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "max_parallel_workers_per_gather": "0",
    "log_min_messages": "warning",
    "max_wal_size": "'256MB'",  # bounds the memory the WAL takes when the files are in memory
}
MEMORY = Path("/dev/shm")
MEMORY_NEEDED = 4 * 1024 ** 3  # room for the cluster's files, its WAL included, with plenty to spare


class ServiceUnavailable(RuntimeError):
    """A server could not be found or started; the message says what to do."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path))


def find_postgres_bin() -> Path:
    """The directory holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if all(os.access(Path(candidate, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    raise ServiceUnavailable("PostgreSQL is not installed (no initdb/pg_ctl on PATH or under "
                             "/usr/lib/postgresql/*/bin): " + HINT.format(env=POSTGRES_ENV))


def find_redis_server() -> Path:
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/sbin/redis-server",
                      "/usr/local/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ServiceUnavailable("Redis is not installed (no redis-server on PATH): " + HINT.format(env=REDIS_ENV))


# -- PostgreSQL ------------------------------------------------------------------------------------


def in_memory(path: Path) -> bool:
    """Whether ``path`` (links followed) is on a tmpfs of this machine: the kind of the longest mount
    point above it in /proc/mounts, the later of two at one point (it hides the earlier); False
    where that cannot be told."""
    try:
        real = path.resolve(strict=True)
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    kind, longest = None, -1
    for point, point_kind in mounts:
        if real.is_relative_to(point) and len(point) >= longest:
            kind, longest = point_kind, len(point)
    return kind == "tmpfs"


def memory_folder(prefix: str) -> Path | None:
    """A new folder in memory (the tmpfs at /dev/shm) if it has room, else None."""
    try:
        stats = os.statvfs(MEMORY)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize < MEMORY_NEEDED:
        return None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=MEMORY))


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``base`` (data in ``base/data``, a link to a folder in memory when
    there is room), owned by ``owner``."""

    base: Path
    bindir: Path
    owner: str | None  # the OS user the programs run as (None: the current one)
    port: int = 0

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        user = {"user": self.owner, "group": pwd.getpwnam(self.owner).pw_gid, "extra_groups": []} if self.owner \
            else {}
        done = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              cwd=self.base, timeout=timeout, **user)  # type: ignore[call-overload]
        if done.returncode != 0:
            log = self.base / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceUnavailable(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}{tail}")

    def start(self) -> str:
        """initdb (once) and start on a free port; returns the URL of the ``postgres`` database."""
        if not self.data.exists():
            try:
                self._initdb()
            except BaseException:
                self._remove_memory_folder()
                raise
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "postgres.log"), "-w", "-t", "60",
                          "-o", f"-p {self.port}", "start")
                return self.url
            except ServiceUnavailable:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _initdb(self) -> None:
        self._prepare()
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# apibox tests: loopback only, no durability\n")
            conf.write("".join(f"{name} = {value}\n" for name, value in POSTGRES_SETTINGS.items()))
            conf.write(f"unix_socket_directories = '{self.base / 'run'}'\n")

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "run").mkdir(exist_ok=True)
        owned = [self.base, self.base / "run"]
        if self.data.is_symlink():  # to a folder in memory that is gone (the machine restarted)
            self.data.unlink()
        folder = memory_folder("apibox-pg-")
        if folder is not None:
            (folder / "data").mkdir(mode=0o700)
            self.data.symlink_to(folder / "data")
            owned += [folder, folder / "data"]
        if self.owner:
            entry = pwd.getpwnam(self.owner)
            self.base.chmod(0o755)  # the owner must reach its folders inside a root-only temporary folder
            for path in owned:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def stop(self) -> None:
        """Stop the server; files kept in memory are removed with it (the folder on disk is the caller's)."""
        pid_file = self.data / "postmaster.pid"
        try:
            if pid_file.exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            self._remove_memory_folder()

    def _remove_memory_folder(self) -> None:
        if self.data.is_symlink():
            shutil.rmtree(self.data.resolve().parent, ignore_errors=True)
            self.data.unlink()


def postgres(base: Path) -> Postgres:
    """The cluster in ``base`` (not started); as root, run by the ``postgres`` OS user."""
    bindir = find_postgres_bin()
    owner = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceUnavailable("initdb refuses to run as root and there is no 'postgres' OS user to run it "
                                     "as: " + HINT.format(env=POSTGRES_ENV)) from None
        owner = "postgres"
    return Postgres(base, bindir, owner)


# -- Redis -----------------------------------------------------------------------------------------


@dataclass
class Redis:
    """A redis-server in ``base``: no persistence, loopback only, daemonized (pid in ``base/redis.pid``)."""

    base: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid_file(self) -> Path:
        return self.base / "redis.pid"

    def start(self) -> str:
        binary = find_redis_server()
        self.base.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            subprocess.run([str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(self.base), "--daemonize", "yes",
                            "--pidfile", str(self.pid_file), "--logfile", str(self.base / "redis.log")],
                           check=True, capture_output=True, timeout=30)
            if self._wait_ready():
                (self.base / "redis.port").write_text(str(self.port))
                return self.url
            self.stop()
            if attempt == 2:
                log = self.base / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise ServiceUnavailable(f"redis-server did not start: {tail}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if not self.base.exists():
            return
        deadline = time.monotonic() + 5
        while not self.pid_file.exists() and time.monotonic() < deadline:  # daemonizing writes it a bit later
            time.sleep(0.05)
        if not self.pid_file.exists():
            return
        pid = int(self.pid_file.read_text().strip())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


# -- for the test session --------------------------------------------------------------------------


class Started:
    """A server this process started in a temporary folder: ``url``, then ``stop()`` removes it all."""

    def __init__(self, server: Postgres | Redis, base: Path) -> None:
        self.server, self.base = server, base
        self.url = server.start()

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _start(prefix: str, make: Callable[[Path], Any]) -> Started:
    """A server made by ``make(folder)`` in a new temporary folder (removed if it fails to start)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return Started(make(base), base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def start_postgres() -> Started:
    return _start("apibox-pg-", postgres)


def start_redis() -> Started:
    return _start("apibox-redis-", Redis)


# -- for .ci/run -----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python3 tests/services.py start|stop DIR", file=sys.stderr)
        return 2
    command, base = argv[0], Path(argv[1]).resolve()
    if command == "start":
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(base.stat().st_mode | 0o011)  # the postgres OS user must reach its folder inside
        pg = postgres(base / "postgres")
        pg_url = pg.start()
        try:
            redis_url = Redis(base / "redis").start()
        except BaseException:
            pg.stop()
            raise
        print(f"export {POSTGRES_ENV}={pg_url}")
        print(f"export {REDIS_ENV}={redis_url}")
        return 0
    failures = []
    try:
        Redis(base / "redis").stop()
    except Exception as error:  # stop PostgreSQL anyway
        failures.append(f"redis: {error}")
    if (base / "postgres" / "data").exists() or (base / "postgres" / "data").is_symlink():
        try:
            postgres(base / "postgres").stop()
        except Exception as error:
            failures.append(f"postgres: {error}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ServiceUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
