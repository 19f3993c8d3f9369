"""Redis for the Redis tests: a private redis-server a test may kill, pause and restart, and small helpers.

Most tests share the session's server (conftest's ``redis_url``) and keep apart by a prefix of
their own. The outage tests need a server of their own: ``PrivateRedis`` runs one as a child
process on a fixed port, so it can come back where the gateway expects it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from apibox.redis_link import RedisLink
from apibox.settings import RedisSettings
from tests import services


def unique_prefix() -> str:
    """A key prefix no other test uses, so tests can share one Redis."""
    return f"t{uuid.uuid4().hex[:10]}"


def link_for(url: str, prefix: str, *, heartbeat: float = 10.0, retry: float = 1.0, timeout: float = 5.0,
             instruments: object | None = None) -> RedisLink:
    """A link with a generous call timeout: on a loaded CI machine a slow reply must not look like an outage.
    The tests of a hung Redis ask for the gateway's own 0.25 s."""
    return RedisLink(RedisSettings(url=url, prefix=prefix, timeout=timeout), heartbeat_seconds=heartbeat,
                     retry_seconds=retry, instruments=instruments)  # type: ignore[arg-type]


class PrivateRedis:
    """A redis-server child process in ``base`` on one port for its whole life (stop, pause, start again)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = services.free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(services.find_redis_server()), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.base), "--logfile", str(self.base / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """Gone at once, as a crash or a lost host (its data with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """Still accepting connections but answering nothing: a hung server."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
