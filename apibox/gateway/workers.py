"""`apibox serve --workers N`: one supervisor process and N gateway processes on one port.

The supervisor applies pending migrations once, then starts each worker as a fresh process of
the same interpreter (``command(fd)``, built by the CLI: ``python -m apibox serve ...
--worker-fd FD``). Subprocesses rather than ``multiprocessing``: a worker is exactly the
program an operator runs, it reads the config and its ``${VAR}`` secrets itself (nothing is
pickled across), and signals, exit codes and logs behave as for any process. Every worker
binds the same address with SO_REUSEPORT, so the kernel spreads new connections over them;
the supervisor itself never accepts a connection.

Each worker holds one end of a socket pair with the supervisor: it writes ``ready`` once it
listens, and if the supervisor disappears (even by SIGKILL) it reads end-of-file and stops
gracefully, so no worker outlives its supervisor.

SIGINT and SIGTERM are passed on to every worker, and the supervisor waits while each one
finishes and settles its requests in flight. SIGHUP is passed on too: each worker reloads
its config file. A worker that exits on its own is restarted
after a short delay that doubles while it keeps dying within seconds of its start; after
``MAX_INSTANT_CRASHES`` such deaths in a row the supervisor stops everything and exits 1
(a process manager can then restart the whole service).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apibox.errors import ApiboxError
from apibox.store import open_store

log = logging.getLogger("apibox.workers")

INSTANT_SECONDS = 5.0  # a worker that dies sooner than this after its start crashed "at once"
MAX_INSTANT_CRASHES = 5  # ... this many times in a row, and the supervisor gives up
RESTART_DELAY = 0.5  # seconds before the first restart; doubles per instant crash, up to MAX_RESTART_DELAY
MAX_RESTART_DELAY = 8.0
# The longest wait for the workers after a stop signal, beyond server.shutdown_seconds (their drain):
# for the settlements of the requests cut then, and the store's closing.
STOP_GRACE = 30.0
READY = b"ready\n"


class WorkerError(ApiboxError):
    """The workers could not be started."""


@dataclass
class Worker:
    slot: int
    process: asyncio.subprocess.Process
    channel: socket.socket  # the supervisor's end of the socket pair
    started: float


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already listens on.

    With SO_REUSEPORT, a second apibox started by the same user on the same port would not
    fail: it would silently take a share of the connections. A plain bind (SO_REUSEADDR only,
    which still fails against a listener) finds that out first.
    """
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise WorkerError(f"cannot resolve the listen address {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise WorkerError(f"{address[0]} port {port} is already in use") from None
                raise WorkerError(f"cannot listen on {address[0]} port {port}: {exc.strerror}") from None


async def apply_migrations(database_url: str) -> None:
    """Bring the schema up to date once, before any worker opens the database."""
    store = await open_store(database_url, migrate=True)
    await store.close()


async def supervise(command: Callable[[int], Sequence[str]], workers: int, *, database_url: str,
                    ready: Callable[[], None] | None = None, restart_delay: float = RESTART_DELAY,
                    drain_seconds: float = 30.0) -> int:
    """Run ``workers`` worker processes until SIGINT or SIGTERM; return the exit code (0: a clean stop)."""
    await apply_migrations(database_url)
    return await Supervisor(command, workers, restart_delay=restart_delay,
                            stop_grace=drain_seconds + STOP_GRACE).run(ready)


class Supervisor:
    def __init__(self, command: Callable[[int], Sequence[str]], workers: int, *, restart_delay: float,
                 stop_grace: float) -> None:
        self.command = command
        self.count = workers
        self.restart_delay = restart_delay
        self.stop_grace = stop_grace
        self.running: dict[int, Worker] = {}
        self.stopping = asyncio.Event()
        self.failed = False
        self.signal = signal.SIGTERM
        self.started_once: set[int] = set()
        self.all_ready = asyncio.Event()

    async def run(self, ready: Callable[[], None] | None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        slots = [asyncio.ensure_future(self._slot(slot)) for slot in range(self.count)]
        try:
            waiting = asyncio.ensure_future(self.all_ready.wait())
            stopping = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            stopping.cancel()
            if self.all_ready.is_set() and not self.stopping.is_set() and ready is not None:
                ready()
            await self.stopping.wait()
            _, pending = await asyncio.wait(slots, timeout=self.stop_grace)
            if pending:
                self.failed = True
                log.error("%d workers did not stop within %.0f s; killing them", len(pending), self.stop_grace)
                self._kill_all()
                await asyncio.wait(pending, timeout=5)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in slots:
                task.cancel()
            self._kill_all()  # only if something above went wrong: a clean stop leaves none running
        return 1 if self.failed else 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop every worker gracefully (the signal is passed on) and restart none."""
        if not self.stopping.is_set():
            log.info("stopping %d workers (%s)", len(self.running), signal.Signals(sig).name)
        self.signal = sig
        self.stopping.set()
        for worker in list(self.running.values()):
            self._send(worker, sig)

    def reload(self) -> None:
        """SIGHUP: every worker reloads the config file (``gateway/reload.py``)."""
        log.info("asking %d workers to reload the config", len(self.running))
        for worker in list(self.running.values()):
            self._send(worker, signal.SIGHUP)

    def _give_up(self, message: str, *args: object) -> None:
        log.error(message, *args)
        self.failed = True
        self.stop(signal.SIGTERM)

    @staticmethod
    def _send(worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(sig)

    def _kill_all(self) -> None:
        for worker in list(self.running.values()):
            if worker.process.returncode is None:
                self._send(worker, signal.SIGKILL)

    async def _start(self, slot: int) -> Worker:
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(*self.command(child.fileno()), pass_fds=(child.fileno(),))
        finally:
            child.close()
        parent.setblocking(False)
        worker = self.running[slot] = Worker(slot, process, parent, time.monotonic())
        if self.stopping.is_set():  # a stop signal arrived while it was being started
            self._send(worker, self.signal)
        return worker

    async def _ready(self, worker: Worker) -> bool:
        """Wait for the worker's ``ready``; False when it exits first."""
        loop = asyncio.get_running_loop()
        received = b""
        while not received.endswith(b"\n"):
            try:
                chunk = await loop.sock_recv(worker.channel, 64)
            except OSError:
                return False
            if not chunk:
                return False
            received += chunk
        return received == READY

    async def _slot(self, slot: int) -> None:
        """Keep one worker running in ``slot`` until the supervisor stops."""
        try:
            await self._keep(slot)
        except Exception as exc:  # e.g. no process could be started at all (too many open files)
            self._give_up("worker %d: %s: %s; stopping", slot, type(exc).__name__, exc)

    async def _keep(self, slot: int) -> None:
        crashes = 0
        while True:
            worker = await self._start(slot)
            try:
                is_ready = await self._ready(worker)
                if is_ready:
                    if slot in self.started_once:
                        log.info("worker %d restarted (pid %d)", slot, worker.process.pid)
                    self.started_once.add(slot)
                    if len(self.started_once) == self.count:
                        self.all_ready.set()
                code = await worker.process.wait()
            finally:
                worker.channel.close()
                if self.running.get(slot) is worker:
                    del self.running[slot]
            if self.stopping.is_set():
                # killed by the very signal passed on: it was still starting, with nothing in flight
                if code not in (0, -self.signal):
                    self.failed = True
                    log.error("worker %d (pid %d) %s while stopping", slot, worker.process.pid, _exit(code))
                return
            if slot not in self.started_once:  # its first start failed: the config, the port, the database...
                self._give_up("worker %d (pid %d) %s before it was serving; stopping", slot, worker.process.pid,
                              _exit(code))
                return
            instant = not is_ready or time.monotonic() - worker.started < INSTANT_SECONDS
            crashes = crashes + 1 if instant else 0
            if crashes >= MAX_INSTANT_CRASHES:
                self._give_up("worker %d %s %d times in a row within %.0f s of its start; giving up",
                              slot, _exit(code), crashes, INSTANT_SECONDS)
                return
            delay = min(self.restart_delay * 2 ** max(crashes - 1, 0), MAX_RESTART_DELAY)
            log.warning("worker %d (pid %d) %s; restarting it in %.1f s", slot, worker.process.pid, _exit(code),
                        delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
            if self.stopping.is_set():
                return


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# -- in the worker ---------------------------------------------------------------------------


def worker_ready(fd: int) -> Callable[[str], None]:
    """The worker's ``ready`` callback: tell the supervisor over ``fd``, then watch for it to go away.

    Called on the worker's event loop once it listens. If the supervisor's end closes (it
    exited or was killed), the worker sends itself SIGTERM: the same graceful stop as always.
    """
    return _Lifeline(fd).ready


class _Lifeline:
    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # a process the worker starts must not keep the supervisor's line open
        self.channel = socket.socket(fileno=fd)

    def ready(self, url: str) -> None:
        try:
            self.channel.sendall(READY)
        except OSError:  # the supervisor is already gone
            self._stop()
            return
        self.channel.setblocking(False)
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            if self.channel.recv(64):
                return  # the supervisor sends nothing today; ignore anything it might
        except BlockingIOError:
            return
        except OSError:
            pass
        asyncio.get_running_loop().remove_reader(self.channel.fileno())
        self._stop()

    @staticmethod
    def _stop() -> None:
        log.warning("the supervisor is gone; stopping this worker")
        os.kill(os.getpid(), signal.SIGTERM)
