"""The SQLite writer on the event loop's thread: group commits, lock waits that never block the
loop, and checkpoints that keep the WAL from growing without end."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from apibox.store import sqlite_writer
from apibox.store.sqlite import PRAGMAS
from apibox.store.sqlite_writer import SqliteWriter
from tests.garbage import collected_garbage
from tests.waiting import eventually


@pytest.fixture
async def writer(tmp_path: Path):
    path = str(tmp_path / "w.db")
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)")
    setup.close()
    opened = SqliteWriter(path, PRAGMAS)
    await opened.open()
    yield opened
    await opened.close()


def insert(value: str):
    return lambda db: db.execute("INSERT INTO t (v) VALUES (?) RETURNING id", (value,)).fetchall()[0][0]


def waits_for_checkpoints(writer: SqliteWriter, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many times, from now on, the writer's commits waited for a checkpoint (started one alone)."""
    waits = 0
    start = writer._checkpointer.start

    def counting(**kwargs: bool) -> None:
        nonlocal waits
        waits += kwargs.get("alone", False)
        start(**kwargs)
    monkeypatch.setattr(writer._checkpointer, "start", counting)
    return lambda: waits


async def checkpoint(checkpointer: sqlite_writer.Checkpointer, *, alone: bool = False) -> None:
    """One checkpoint on the checkpointer's thread, awaited."""
    checkpointer.start(alone=alone)
    assert checkpointer._running is not None
    await asyncio.wrap_future(checkpointer._running)


def reading_from_now_on(path: str) -> sqlite3.Connection:
    """A reader whose snapshot is the database as it is now, kept until it commits (a long report)."""
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()  # a read transaction starts at its first read
    return reader


def values(path: str) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return [row[0] for row in con.execute("SELECT v FROM t ORDER BY id")]
    finally:
        con.close()


def group_sizes(writer: SqliteWriter) -> list[int]:
    """The size of each group the writer commits from now on, in order."""
    sizes: list[int] = []
    real = writer._commit_group

    def recording(bodies):
        sizes.append(len(bodies))
        return real(bodies)
    writer._commit_group = recording
    return sizes


async def test_transactions_arriving_together_commit_in_one_group_each_all_or_nothing(writer, tmp_path) -> None:
    groups = group_sizes(writer)

    def half_then_fail(db: sqlite3.Cursor) -> None:
        db.execute("INSERT INTO t (v) VALUES ('half')")
        db.execute("INSERT INTO t (v) VALUES ('a0')")  # UNIQUE: this transaction fails whole

    tasks = [asyncio.ensure_future(writer.transaction(insert(f"a{i}"))) for i in range(20)]
    failing = asyncio.ensure_future(writer.transaction(half_then_fail))
    ids = await asyncio.gather(*tasks)
    with pytest.raises(sqlite3.IntegrityError):
        await failing
    assert groups == [21]
    assert sorted(ids) == list(range(1, 21))
    assert values(str(tmp_path / "w.db")) == [f"a{i}" for i in range(20)]  # nothing of 'half'


async def one_then_one_a_pass_behind(writer: SqliteWriter, name: str) -> None:
    """Two transactions, the second queued in the pass the first one's group commit is waiting for,
    behind it (as the requests woken by that pass's I/O are)."""
    first = asyncio.ensure_future(writer.transaction(insert(f"{name}0")))
    await asyncio.sleep(0)  # the first queues its transaction; the group's pass is scheduled
    second = asyncio.ensure_future(writer.transaction(insert(f"{name}1")))  # runs after that pass begins
    await asyncio.gather(first, second)


async def test_when_busy_a_group_waits_a_second_pass_for_the_transactions_queued_behind_it(writer, tmp_path) -> None:
    groups = group_sizes(writer)
    await asyncio.gather(*(writer.transaction(insert(f"c{i}")) for i in range(3)))  # busy: a group of three
    await one_then_one_a_pass_behind(writer, "d")
    assert groups == [3, 2]
    assert values(str(tmp_path / "w.db")) == ["c0", "c1", "c2", "d0", "d1"]


async def test_one_at_a_time_a_lone_transaction_is_committed_at_the_first_pass(writer, tmp_path) -> None:
    groups = group_sizes(writer)
    await writer.transaction(insert("e"))  # a lone group: nothing else is happening
    await one_then_one_a_pass_behind(writer, "f")
    assert groups == [1, 1, 1]  # the first went without waiting for the second
    assert values(str(tmp_path / "w.db")) == ["e", "f0", "f1"]


async def test_a_group_in_which_nothing_fails_runs_without_savepoints(writer, tmp_path) -> None:
    statements: list[str] = []
    writer._cursor().connection.set_trace_callback(statements.append)
    await asyncio.gather(*(writer.transaction(insert(f"b{i}")) for i in range(5)))
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    assert not [sql for sql in statements if "SAVEPOINT" in sql or "RELEASE" in sql]
    assert values(str(tmp_path / "w.db")) == [f"b{i}" for i in range(5)]


async def test_a_failing_transaction_is_undone_alone_whatever_its_place_in_the_group(writer, tmp_path) -> None:
    def fail_after_insert(db: sqlite3.Cursor) -> None:
        db.execute("INSERT INTO t (v) VALUES ('undone')")
        raise ValueError("refused")

    first = asyncio.ensure_future(writer.transaction(fail_after_insert))
    rest = [asyncio.ensure_future(writer.transaction(insert(f"c{i}"))) for i in range(3)]
    last = asyncio.ensure_future(writer.transaction(fail_after_insert))
    assert await asyncio.gather(*rest) == [1, 2, 3]
    for failed in (first, last):
        with pytest.raises(ValueError, match="refused"):
            await failed
    assert values(str(tmp_path / "w.db")) == ["c0", "c1", "c2"]


async def test_a_lone_transaction_is_committed_without_waiting_for_company(writer, tmp_path) -> None:
    assert await asyncio.wait_for(writer.transaction(insert("alone")), 1) == 1
    assert values(str(tmp_path / "w.db")) == ["alone"]


async def committed_before_the_next_pass(writer: SqliteWriter, value: str) -> bool:
    """Whether a transaction was committed (and its caller answered) before a callback scheduled
    just before it ran, i.e. before the loop's next pass."""
    order: list[str] = []
    asyncio.get_running_loop().call_soon(order.append, "next pass")
    await writer.transaction(insert(value))
    order.append("committed")
    return order[0] == "committed"


async def test_a_transaction_with_nothing_else_in_flight_is_committed_at_once(writer, tmp_path) -> None:
    groups = group_sizes(writer)
    assert not await committed_before_the_next_pass(writer, "waits")  # by default it waits a pass for company
    writer.alone = lambda: True
    assert await committed_before_the_next_pass(writer, "at once")
    assert groups == [1, 1]
    assert values(str(tmp_path / "w.db")) == ["waits", "at once"]


async def test_a_transaction_committed_at_once_fails_alone_and_leaves_nothing(writer, tmp_path) -> None:
    writer.alone = lambda: True

    def half_then_fail(db: sqlite3.Cursor) -> None:
        db.execute("INSERT INTO t (v) VALUES ('half')")
        raise ValueError("refused")
    with pytest.raises(ValueError, match="refused"):
        await writer.transaction(half_then_fail)
    assert await writer.transaction(insert("next")) == 1  # 'half' was rolled back: its id is free again
    assert values(str(tmp_path / "w.db")) == ["next"]


async def test_with_others_queued_a_transaction_joins_their_group_even_when_alone(writer, tmp_path) -> None:
    groups = group_sizes(writer)
    answers = iter([False, True])  # the first waits for company; the second finds it queued
    writer.alone = lambda: next(answers)
    await asyncio.gather(writer.transaction(insert("g0")), writer.transaction(insert("g1")))
    assert groups == [2]
    assert values(str(tmp_path / "w.db")) == ["g0", "g1"]


async def test_a_transaction_that_would_commit_at_once_waits_for_a_lock_held_elsewhere(writer, tmp_path) -> None:
    path = str(tmp_path / "w.db")
    writer.alone = lambda: True
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t (v) VALUES ('other')")
    release = threading.Timer(0.2, lambda: other.execute("COMMIT"))
    release.start()
    try:
        await writer.transaction(insert("ours"))
    finally:
        release.join()
        other.close()
    assert values(path) == ["other", "ours"]


async def test_a_write_lock_held_elsewhere_is_waited_for_while_the_loop_keeps_serving(writer, tmp_path) -> None:
    path = str(tmp_path / "w.db")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t (v) VALUES ('other')")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
    beat = asyncio.ensure_future(ticker())
    release.start()
    try:
        started = asyncio.get_running_loop().time()
        await writer.transaction(insert("ours"))
        waited = asyncio.get_running_loop().time() - started
    finally:
        beat.cancel()
        release.join()
        other.close()
    assert waited >= 0.25  # it did wait for the other connection's COMMIT...
    assert ticks >= 15  # ...and the loop ran other work meanwhile (a blocked loop would tick ~0 times)
    assert values(path) == ["other", "ours"]


async def test_a_lock_never_released_fails_the_group_and_writes_nothing(writer, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_writer, "LOCK_WAIT_SECONDS", 0.2)
    path = str(tmp_path / "w.db")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await writer.transaction(insert("never"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert values(path) == []
    assert await writer.transaction(insert("later")) == 1  # the writer works again once the lock is free


async def test_checkpoints_keep_the_wal_from_growing_without_end(writer, tmp_path, monkeypatch) -> None:
    """Commits go on during checkpoints, so the WAL winds back only after one that ran with no commit
    meanwhile; once a checkpoint has left CHECKPOINT_WAIT_FACTOR x CHECKPOINT_BYTES in it, commits
    wait for one. Without checkpoints these writes make a WAL of about 40 MB; with them it stays
    within a few limits (how far past one it gets depends on how fast the disk syncs meanwhile)."""
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_BYTES", 256 * 1024)
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_EVERY_GROUPS", 8)
    waits = waits_for_checkpoints(writer, monkeypatch)
    for i in range(1_500):  # one group each, 1,500 x (a 4 KiB row and its index entry)
        await writer.transaction(insert(f"{i:06d}" + "x" * 4096))
    wal = os.stat(str(tmp_path / "w.db") + "-wal").st_size
    assert waits() > 0, "commits never waited for a checkpoint"
    assert wal < 16 * 1024 * 1024, f"the WAL grew to {wal} bytes: it was never wound back"
    assert len(values(str(tmp_path / "w.db"))) == 1_500


async def test_a_caller_cancelled_before_its_group_runs_leaves_nothing_behind(writer, tmp_path) -> None:
    """A request cancelled while its hold waits for the commit must not leave a hold nobody settles."""
    cancelled = asyncio.ensure_future(writer.transaction(insert("cancelled")))
    kept = asyncio.ensure_future(writer.transaction(insert("kept")))
    await asyncio.sleep(0)  # both queued, the group not yet run
    cancelled.cancel()
    assert await kept == 1
    assert cancelled.cancelled()
    assert values(str(tmp_path / "w.db")) == ["kept"]


async def test_a_kept_transaction_is_committed_though_its_caller_was_cancelled(writer, tmp_path) -> None:
    """A settlement (``keep``) records money already spent: a caller gone meanwhile does not undo it."""
    settling = asyncio.ensure_future(writer.transaction(insert("settled"), keep=True))
    dropped = asyncio.ensure_future(writer.transaction(insert("dropped")))
    await asyncio.sleep(0)  # both queued, the group not yet run
    settling.cancel()
    dropped.cancel()
    await writer.close()  # closing waits for the kept transaction
    assert settling.cancelled() and dropped.cancelled()
    assert values(str(tmp_path / "w.db")) == ["settled"]


async def test_a_kept_transaction_that_fails_after_its_caller_left_is_logged(writer, tmp_path, caplog) -> None:
    await writer.transaction(insert("first"))
    failing = asyncio.ensure_future(writer.transaction(insert("first"), keep=True))  # v is UNIQUE
    await asyncio.sleep(0)
    failing.cancel()
    await writer.close()
    assert values(str(tmp_path / "w.db")) == ["first"]
    assert any("caller had gone failed" in r.getMessage() and "UNIQUE" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")


async def test_a_failing_checkpoint_is_logged_and_writes_go_on(writer, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_BYTES", 0)
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_EVERY_GROUPS", 1)
    writer._checkpointer._pragmas = ("PRAGMA no_such_thing_is_an_error = (",)
    for i in range(3):
        await writer.transaction(insert(f"v{i}"))
    await eventually(lambda: any("checkpoint" in r.getMessage() for r in caplog.records))  # the checkpointer's thread
    assert values(str(tmp_path / "w.db")) == ["v0", "v1", "v2"]


@pytest.mark.parametrize("left_bytes, waits", [(0, False), (3 * sqlite_writer.CHECKPOINT_BYTES, False),
                                               (4 * sqlite_writer.CHECKPOINT_BYTES, True)])
async def test_commits_wait_for_a_checkpoint_only_once_the_wal_has_not_wound_back_for_long(
        writer, tmp_path, monkeypatch, left_bytes: int, waits: bool) -> None:
    """A checkpoint syncs the disk twice: commits go on meanwhile, unless the last checkpoint left
    CHECKPOINT_WAIT_FACTOR x CHECKPOINT_BYTES in the WAL (commits kept it from winding back); then
    the next group waits for one."""
    release = threading.Event()
    checkpointing = threading.Event()

    def slow_checkpoint(alone: bool = False) -> None:
        checkpointing.set()
        release.wait(5)
    monkeypatch.setattr(writer._checkpointer, "_checkpoint", slow_checkpoint)
    writer._checkpointer._left_bytes = left_bytes
    writer._checkpointer.start()
    assert await asyncio.to_thread(checkpointing.wait, 5)
    committing = asyncio.ensure_future(writer.transaction(insert("during")))
    if waits:
        await asyncio.sleep(0.2)
        assert not committing.done()
    else:
        await eventually(committing.done)
    release.set()
    assert await asyncio.wait_for(committing, 5) == 1
    assert values(str(tmp_path / "w.db")) == ["during"]


async def test_a_checkpoint_that_copies_everything_clears_the_wait(writer, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_BYTES", 4096)
    writer._checkpointer._left_bytes = 1 << 30  # overdue: the next group waits for a checkpoint
    assert await asyncio.wait_for(writer.transaction(insert("after")), 5) == 1
    assert not writer._checkpointer.overdue()  # nothing else was writing: it copied the whole WAL


# Another `serve` worker on the same file: no automatic checkpoints, a commit every fifth of a
# millisecond, and a refused lock tried again soon (as SqliteWriter does), not after a busy timeout's sleeps.
OTHER_WORKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA busy_timeout=0")
con.execute("PRAGMA wal_autocheckpoint=0")
print("writing", flush=True)
row = 0
while True:
    try:
        con.execute("INSERT INTO t (v) VALUES (?)", (f"other{row:06d}" + "y" * 4096,))
        row += 1
    except sqlite3.OperationalError:
        pass
    time.sleep(0.0002)
"""


def wal_frames(path: str) -> int:
    """The frames the WAL holds since it last wound back: mxFrame in the wal-index header
    (sqlite.org/walformat.html), read rather than asked of a checkpoint, which would copy them and
    so let the next commit wind the WAL back whatever the writer does."""
    with open(path + "-shm", "rb") as shm:
        header = shm.read(20)
    assert int.from_bytes(header[:4], sys.byteorder) == 3007000  # the wal-index format this reads
    return int.from_bytes(header[16:20], sys.byteorder)


async def test_another_process_committing_all_the_time_cannot_keep_the_wal_from_winding_back(
        writer, tmp_path, monkeypatch) -> None:
    """A second worker commits whenever it likes. A checkpoint that only kept this process's
    commits waiting could then seldom copy everything: here the WAL grew to about 100 MB (and
    past 100 MB under `serve --workers 2`). The checkpoint commits wait for holds the other writers off too."""
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_BYTES", 256 * 1024)
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_EVERY_GROUPS", 8)
    path = str(tmp_path / "w.db")
    other = await asyncio.create_subprocess_exec(sys.executable, "-c", OTHER_WORKER, path,
                                                 stdout=asyncio.subprocess.PIPE)
    assert await other.stdout.readline() == b"writing\n"
    try:
        largest = 0
        for i in range(1_500):
            await writer.transaction(insert(f"{i:06d}" + "x" * 4096))
            if i % 4 == 0:
                await asyncio.sleep(0.001)  # requests come and go between the group commits
            if i % 100 == 0:
                largest = max(largest, os.stat(path + "-wal").st_size)
    finally:
        other.terminate()
        await other.wait()
    other_rows = len([v for v in values(path) if v.startswith("other")])
    assert other_rows > 200  # it really was committing alongside
    # a few MB when both processes get the CPU; the other one alone, while this one waits for the
    # lock or a CPU (the suite's other tests), adds ~20 MB a second, which only the bound allows for
    assert largest < 32 * 1024 * 1024, f"the WAL grew to {largest} bytes: it was never wound back"
    assert len(values(path)) == 1_500 + other_rows


async def test_a_reader_that_holds_the_wal_back_makes_commits_wait_only_now_and_then(
        writer, tmp_path, monkeypatch) -> None:
    """While a reader keeps an old snapshot (a long report), no checkpoint can wind the WAL back.
    Commits then wait for one only each time the WAL has grown by another CHECKPOINT_WAIT_FACTOR x
    CHECKPOINT_BYTES, not before every group; once the reader is gone the WAL winds back again."""
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_BYTES", 64 * 1024)
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_EVERY_GROUPS", 4)
    path = str(tmp_path / "w.db")
    waits = waits_for_checkpoints(writer, monkeypatch)
    await writer.transaction(insert("before the reader"))
    reader = reading_from_now_on(path)
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (1,)  # its snapshot, kept from here on
    for i in range(400):  # one group each
        await writer.transaction(insert(f"{i:06d}" + "x" * 4096))
    reader.execute("COMMIT")
    reader.close()
    held_back = wal_frames(path)
    grown_by = held_back * 4096 // (sqlite_writer.CHECKPOINT_WAIT_FACTOR * sqlite_writer.CHECKPOINT_BYTES)
    assert 0 < waits() <= grown_by + 2, f"commits waited for a checkpoint {waits()} times in 400 groups"
    # the reader gone, the WAL winds back: how many groups that takes depends on how long the
    # checkpoint copying what the reader held back syncs the disk for, so it is given time, not groups
    loop = asyncio.get_running_loop()
    deadline, written = loop.time() + 20, 401
    while wal_frames(path) >= held_back / 2 and loop.time() < deadline:
        await writer.transaction(insert(f"{written:06d}" + "x" * 4096))
        written += 1
    assert wal_frames(path) < held_back / 2, f"the WAL never wound back in {written - 401} groups after the reader"
    assert len(values(path)) == written


async def test_once_the_reader_is_gone_the_next_checkpoint_that_copies_everything_makes_commits_wait(
        writer, tmp_path, monkeypatch) -> None:
    """A RESTART that a reader held back is remembered, so that commits do not wait for one before
    every group while the reader reads. Once a checkpoint copies everything, nothing holds the WAL
    back any more: the next group waits for a RESTART and the WAL winds back at once, instead of
    after it has grown by another CHECKPOINT_WAIT_FACTOR x CHECKPOINT_BYTES."""
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_BYTES", 64 * 1024)
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_EVERY_GROUPS", 1_000_000)  # checkpoints only as called here
    path = str(tmp_path / "w.db")
    checkpointer = writer._checkpointer
    await writer.transaction(insert("before the reader"))
    reader = reading_from_now_on(path)
    for i in range(100):  # about 200 frames, past CHECKPOINT_WAIT_FACTOR x CHECKPOINT_BYTES (64 frames)
        await writer.transaction(insert(f"{i:06d}" + "x" * 4096))
    await checkpoint(checkpointer, alone=True)  # a RESTART the reader holds back
    assert not checkpointer.overdue()
    reader.execute("COMMIT")
    reader.close()
    await checkpoint(checkpointer)  # a PASSIVE that copies it all: the reader is gone
    assert checkpointer.overdue()
    held_back = wal_frames(path)
    assert await asyncio.wait_for(writer.transaction(insert("after the reader")), 5) == 102
    assert wal_frames(path) < held_back / 10, "the WAL was not wound back"
    assert not checkpointer.overdue()
    assert len(values(path)) == 102


class Refused(Exception):
    """A transaction body's own failure."""


def refused(db: sqlite3.Cursor) -> None:
    raise Refused


@pytest.mark.parametrize("at_once", [False, True], ids=["queued", "at-once"])
async def test_a_failed_transaction_leaves_nothing_to_the_cyclic_garbage_collector(writer, at_once: bool) -> None:
    """Its exception reaches the caller without a reference cycle: a failure kept by the frame it is
    raised from (in a local, or in the future that carried it) is held by its own traceback."""
    writer.alone = lambda: at_once
    failed = 0
    with collected_garbage() as left:
        for _ in range(3):
            try:  # not pytest.raises, whose ExceptionInfo in this frame would make a cycle of its own
                await writer.transaction(refused)
            except Refused:
                failed += 1
    assert failed == 3
    assert [o for o in left if isinstance(o, Refused)] == []


async def test_a_failure_in_a_group_leaves_nothing_to_the_cyclic_garbage_collector(writer) -> None:
    """The group is run again with a savepoint around each body; the one that failed reaches its
    caller without a reference cycle, and the others are committed."""
    groups = group_sizes(writer)
    with collected_garbage() as left:
        tasks = [asyncio.create_task(writer.transaction(body)) for body in (insert("a"), refused, insert("b"))]
        await asyncio.wait(tasks)
        assert [type(task.exception()) for task in tasks] == [type(None), Refused, type(None)]
        del tasks  # not gather's results: asyncio holds those a while longer
    assert groups == [3]
    assert values(writer._path) == ["a", "b"]
    assert [o for o in left if isinstance(o, Refused)] == []
