"""Group commit in the relay's SQLite storage: many calls, one transaction, one fsync.

What must hold whatever the batching: a call returns only after the
transaction holding it committed; each call is atomic on its own (one that
fails leaves the others of its batch alone); calls see the calls queued
before them; the queue and the batches are bounded; a cancelled caller's
queued call still commits.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hushchat.protocol.errors import InvalidArgument
from hushchat.protocol.prekeys import OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.transport.relay.server import Relay
from hushchat.transport.relay.storage.interface import (
    EnvelopeBatch,
    MailboxPosition,
    StorageConflict,
)
from hushchat.transport.relay.storage.sqlite import WAL_SIZE_LIMIT, SqliteDatabase, SqliteStorage
from hushchat.transport.relay.storage.writer import DatabaseCall, run_batch
from hushchat.transport.wire.auth import sign_auth
from hushchat.transport.wire.errors import (
    DeviceListMismatch,
    MailboxFull,
    PreKeyIdInUse,
    StorageFull,
    TransportError,
)
from hushchat.transport.wire.frames import (
    Auth,
    EnvelopePush,
    Hello,
    Ok,
    Welcome,
    decode_relay_frame,
    encode_body,
)
from hushchat.transport.wire.limits import RELAY_PROTOCOL_VERSION
from hushchat.transport.wire.records import Envelope, PreKeyCounts
from tests.support.children import RELAY_COMMAND
from tests.support.relay import (
    RawClient,
    announced_port,
    connected,
    envelopes_until_empty,
    memory_connection,
    next_envelope,
    register,
    relay_config,
)
from tests.support.storage import batch, device_list, register_devices, upload_prekeys
from tests.support.users import make_user


class RecordingDatabase(SqliteDatabase):
    """Notes the size of every batch; ``gate``, when cleared, holds the writer before a batch."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()  # the writer is held at the gate
        self.held = 0  # calls in the held batch

    def run_batch(self, calls: Sequence[DatabaseCall]) -> None:
        if not self.gate.is_set():
            self.held = len(calls)
            self.waiting.set()
            self.gate.wait()
        self.batches.append(len(calls))
        super().run_batch(calls)


def registered(path: Path) -> RecordingDatabase:
    db = RecordingDatabase(str(path))
    register_devices(db, "alice", 1, key_base=0xA0)
    register_devices(db, "bob", 1, 2)
    db.batches.clear()
    return db


def seq_stored(path: Path, seq: int) -> bool:
    """Whether another connection (as after a crash) sees the delivery: it is committed."""
    with sqlite3.connect(path) as other:
        row = other.execute("SELECT 1 FROM deliveries WHERE seq = ?", (seq,)).fetchone()
    return row is not None


def deliveries_stored(path: Path) -> int:
    """How many deliveries another connection (as after a crash) sees committed."""
    with sqlite3.connect(path) as other:
        return int(other.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])


# ------------------------------------------------------------------ one batch, many calls


@pytest.fixture
def db(tmp_path: Path) -> RecordingDatabase:
    return registered(tmp_path / "relay.db")


def test_a_failing_call_rolls_back_alone(db: RecordingDatabase) -> None:
    upload_prekeys(db, "bob", 1, one_time=1, kem=1)
    first = batch([("bob", 1)], (b"one",), counters={"bob": 0})
    stale = batch([("bob", 2)], (b"stale",), counters={"bob": 7})
    full = batch([("bob", 1)], (b"two",), counters={"bob": 0})
    new_spk = SignedPreKeyPublic(2, b"N" * 32, b"\x05" * 64)
    opk = OneTimePreKeyPublic(77, b"o" * 32)
    calls = [
        DatabaseCall(partial(db._enqueue, first, 10)),
        DatabaseCall(partial(db._enqueue, stale, 10)),
        DatabaseCall(partial(db._take_bundle, "bob", 1, None, 0)),
        DatabaseCall(partial(db._enqueue, full, 1)),  # bob/1 holds one already: refused
        DatabaseCall(partial(db._take_bundle, "bob", 1, None, 0)),
        # Fails after writing: the new signed prekey goes back out with the rest.
        DatabaseCall(partial(db._store_prekeys, "bob", 1, new_spk, None, [opk, opk], [], 100)),
    ]
    db.run_batch(calls)
    with pytest.raises(PreKeyIdInUse):
        calls[5].outcome()
    assert len(calls[0].outcome()) == 1  # its one delivery's mailbox position
    with pytest.raises(StorageConflict):
        calls[1].outcome()
    with pytest.raises(MailboxFull) as info:
        calls[3].outcome()
    assert info.value.devices == (("bob", 1),)
    taken, again = calls[2].outcome(), calls[4].outcome()
    assert taken.one_time is not None and taken.one_time.key_id == 1  # take-once, in order
    assert again.one_time is None and again.kem_is_last_resort
    assert [q.envelope.payload for q in db.pending("bob", 1, after_seq=0, limit=9, now=0)] == [
        b"one"
    ]
    assert db.pending("bob", 2, after_seq=0, limit=9, now=0) == []  # nothing of the refusals
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 1
    assert db.prekey_counts("bob", 1) == PreKeyCounts(0, 0)
    assert db._conn.execute("SELECT key_id FROM signed_prekeys").fetchall() == [(1,)]


def test_calls_see_the_calls_before_them_in_the_batch(db: RecordingDatabase) -> None:
    send = batch([("bob", 1)], (b"seen",), counters={"bob": 0})
    guid = send.deliveries[0].guid
    pending = partial(db._pending, "bob", 1, 0, 10, 0)

    def acknowledge() -> int:  # the envelope the second call stored, as the third read it
        return db._acknowledge("bob", 1, [calls[2].result[0].seq])  # type: ignore[index]

    calls = [
        DatabaseCall(pending, savepoint=False),
        DatabaseCall(partial(db._enqueue, send, 10)),
        DatabaseCall(pending, savepoint=False),
        DatabaseCall(acknowledge),
        DatabaseCall(acknowledge),
        DatabaseCall(pending, savepoint=False),
    ]
    db.run_batch(calls)
    assert db.batches == [6]
    outcomes = [call.outcome() for call in calls]
    assert outcomes[0] == [] and outcomes[5] == []
    assert [q.envelope.guid for q in outcomes[2]] == [guid]
    assert outcomes[3:5] == [1, 0]


def test_a_failed_transaction_fails_every_call_and_stores_nothing(db: RecordingDatabase) -> None:
    def abort() -> None:
        # As SQLite does on a full disk or an I/O error: the whole transaction is rolled back.
        db._conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")

    send = batch([("bob", 1)], (b"lost",), counters={"bob": 0})
    truncated = []
    calls = [
        DatabaseCall(partial(db._enqueue, send, 10), after_commit=lambda: truncated.append(1)),
        DatabaseCall(abort),
        DatabaseCall(partial(db._pending, "bob", 1, 0, 10, 0), savepoint=False),
    ]
    db.run_batch(calls)
    for call in calls:
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            call.outcome()
    assert truncated == []  # after-commit actions wait for a commit
    assert db.pending("bob", 1, after_seq=0, limit=9, now=0) == []
    # The connection is usable again.
    db.enqueue(send, max_mailbox_size=10)
    assert len(db.pending("bob", 1, after_seq=0, limit=9, now=0)) == 1


class FailingRollbacks:
    """A connection whose next ROLLBACK TO and ROLLBACK fail, as after a disk error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.failing = {"ROLLBACK TO call", "ROLLBACK"}

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql in self.failing:
            self.failing.discard(sql)
            raise sqlite3.OperationalError("cannot rollback - no transaction is active")
        return self.conn.execute(sql, *args)


def test_a_rollback_that_fails_keeps_the_cause_and_does_not_wedge_the_writer(
    db: RecordingDatabase,
) -> None:
    def fail() -> None:
        raise ValueError("the real cause")

    conn = FailingRollbacks(db._conn)
    send = batch([("bob", 1)], (b"lost",), counters={"bob": 0})
    calls = [DatabaseCall(partial(db._enqueue, send, 10)), DatabaseCall(fail)]
    run_batch(conn, calls)
    for call in calls:
        with pytest.raises(ValueError, match="the real cause"):
            call.outcome()
    # The failed ROLLBACK left the transaction open; the next batch ends it first.
    read = DatabaseCall(partial(db._pending, "bob", 1, 0, 10, 0), savepoint=False)
    run_batch(conn, [read])
    assert read.outcome() == []
    assert not db._conn.in_transaction


def test_a_full_database_is_storage_full_and_passes_when_there_is_room(
    db: RecordingDatabase,
) -> None:
    pages = db._conn.execute("PRAGMA page_count").fetchone()[0]
    db._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLITE_FULL, as a full disk
    big = batch([("bob", 1)], (bytes(64 * 1024),), counters={"bob": 0})
    with pytest.raises(StorageFull) as info:
        db.enqueue(big, max_mailbox_size=10)
    cause = info.value.__cause__
    assert isinstance(cause, sqlite3.OperationalError)
    assert cause.sqlite_errorcode == sqlite3.SQLITE_FULL
    assert db.pending("bob", 1, after_seq=0, limit=9, now=0) == []
    db._conn.execute("PRAGMA max_page_count = 1000000")
    db.enqueue(big, max_mailbox_size=10)
    assert len(db.pending("bob", 1, after_seq=0, limit=9, now=0)) == 1


def test_the_wal_stays_bounded(tmp_path: Path, db: RecordingDatabase) -> None:
    # Without a bound the WAL keeps its largest size, which a full disk turns
    # into space the relay can never get back (SQLite's own checkpoint is at ~4 MB).
    wal = tmp_path / "relay.db-wal"
    sends = [batch([("bob", 1)], (bytes(32 * 1024),), counters={"bob": 0}) for _ in range(96)]
    largest = 0
    seqs = []
    for send in sends:
        [position] = db.enqueue(send, max_mailbox_size=1000)
        assert position is not None
        seqs.append(position.seq)
        largest = max(largest, wal.stat().st_size)
    # A large delete: every page written again.
    assert db.acknowledge("bob", 1, seqs[:48]) == 48
    db.enqueue(batch([("bob", 2)], (b"x",), counters={"bob": 0}), max_mailbox_size=9)
    margin = 64 * 1024  # one transaction's frames beyond the limit
    assert largest <= WAL_SIZE_LIMIT + margin
    assert wal.stat().st_size <= WAL_SIZE_LIMIT + margin


def test_a_reader_of_another_process_does_not_hold_the_sweep(
    tmp_path: Path, db: RecordingDatabase
) -> None:
    marker = b"MARKER-" + bytes(range(100))
    send = batch([("bob", 1)], (marker,), counters={"bob": 0})
    db.enqueue(send, max_mailbox_size=10)
    shell = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    shell.execute("BEGIN")
    shell.execute("SELECT COUNT(*) FROM deliveries").fetchone()  # holds a snapshot
    (queued,) = db.pending("bob", 1, after_seq=0, limit=1, now=0)
    assert db.acknowledge("bob", 1, [queued.seq]) == 1
    started = time.monotonic()
    db.purge_expired(0)  # cannot reset the WAL now: tries once, does not wait 5 s
    assert time.monotonic() - started < 4  # the busy wait it must not do is 5 s
    shell.close()
    db.purge_expired(0)  # the next sweep resets it
    assert not any(marker in f.read_bytes() for f in tmp_path.glob("relay.db*"))


# ------------------------------------------------------------------ the writer thread


async def test_concurrent_calls_share_commits_and_return_only_once_committed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.db"
    storage = SqliteStorage(registered(path))
    db = storage._db
    assert isinstance(db, RecordingDatabase)
    sends = [batch([("bob", 1)], (b"%d" % i,), counters={"bob": 0}) for i in range(200)]

    async def send(index: int) -> None:
        positions: list[MailboxPosition | None] = []
        await storage.enqueue(sends[index], max_mailbox_size=1000, committed=positions.extend)
        [position] = positions
        assert position is not None and seq_stored(path, position.seq)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(len(sends)):
                nursery.start_soon(send, index)
        assert sum(db.batches) == len(sends)
        assert len(db.batches) < len(sends) // 4, db.batches  # commits were shared
        queued = await storage.pending("bob", 1, after_seq=0, limit=1000, now=0)
        assert len(queued) == len(sends)
    finally:
        await storage.aclose()


async def test_commit_listeners_run_in_commit_order_before_the_callers_resume(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.db"
    storage = SqliteStorage(registered(path))
    sends = [batch([("bob", 1), ("bob", 2)], (b"%d" % i,), counters={"bob": 0}) for i in range(50)]
    heard: list[tuple[bytes, int]] = []

    def committed(send: EnvelopeBatch, positions: Sequence[tuple[int, int]]) -> None:
        seqs = [seq for _, seq in positions]
        heard.extend(zip([d.guid for d in send.deliveries], seqs, strict=True))

    async def send(index: int) -> None:
        await storage.enqueue(
            sends[index], max_mailbox_size=1000, committed=partial(committed, sends[index])
        )
        assert sends[index].deliveries[0].guid in dict(heard)  # heard before returning

    try:
        async with trio.open_nursery() as nursery:
            for index in range(len(sends)):
                nursery.start_soon(send, index)
        seqs = [seq for _, seq in heard]
        assert seqs == sorted(seqs) and len(set(seqs)) == 2 * len(sends)
        for device_id in (1, 2):
            queued = await storage.pending("bob", device_id, after_seq=0, limit=1000, now=0)
            assert [(q.envelope.guid, q.seq) for q in queued] == [
                (guid, seq) for guid, seq in heard if guid in {q.envelope.guid for q in queued}
            ]
        with pytest.raises(StorageConflict):  # a refused send is not heard of
            await storage.enqueue(
                batch([("bob", 1)], (b"x",), counters={"bob": 9}),
                max_mailbox_size=1000,
                committed=lambda _: pytest.fail("heard of a refused send"),
            )
    finally:
        await storage.aclose()


async def test_batches_and_the_queue_are_bounded(tmp_path: Path) -> None:
    db = registered(tmp_path / "relay.db")
    storage = SqliteStorage(db, max_batch=3, max_queued=5)
    try:
        async with trio.open_nursery() as nursery:
            for index in range(40):
                send = batch([("bob", 1)], (b"%d" % index,), counters={"bob": 0})
                nursery.start_soon(partial(storage.enqueue, send, max_mailbox_size=1000))
        assert sum(db.batches) == 40
        assert max(db.batches) == 3
        # With the writer held, at most max_queued calls get queued; the rest wait to queue.
        db.gate.clear()
        db.batches.clear()
        async with trio.open_nursery() as nursery:
            for _ in range(9):
                nursery.start_soon(storage.prekey_counts, "bob", 1)
            await trio.to_thread.run_sync(db.waiting.wait)
            await trio.sleep(0.1)
            assert storage._writer._queue.qsize() + db.held == 5
            db.gate.set()
        assert sum(db.batches) == 9 and max(db.batches) <= 3
    finally:
        db.gate.set()
        await storage.aclose()
    with pytest.raises(InvalidArgument):
        SqliteStorage(db, max_batch=0)


async def test_a_cancelled_caller_s_call_still_commits(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    db = registered(path)
    storage = SqliteStorage(db)
    send = batch([("bob", 1)], (b"cancelled",), counters={"bob": 0})
    try:
        db.gate.clear()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(storage.enqueue, send, max_mailbox_size=10))
                await trio.to_thread.run_sync(db.waiting.wait)
                scope.cancel()  # while the call is queued: it is not abandoned
                db.gate.set()
        assert deliveries_stored(path) == 1
        assert len(await storage.pending("bob", 1, after_seq=0, limit=5, now=0)) == 1
    finally:
        db.gate.set()
        await storage.aclose()


async def test_close_commits_what_is_queued_then_refuses(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    db = registered(path)
    storage = SqliteStorage(db)
    sends = [batch([("bob", 2)], (b"%d" % i,), counters={"bob": 0}) for i in range(20)]
    db.gate.clear()
    async with trio.open_nursery() as nursery:
        for send in sends:
            nursery.start_soon(partial(storage.enqueue, send, max_mailbox_size=100))
        await trio.to_thread.run_sync(db.waiting.wait)
        with trio.fail_after(5):
            while storage._writer._queue.qsize() + db.held < len(sends):
                await trio.sleep(0.01)
        nursery.start_soon(storage.aclose)
        await trio.sleep(0.05)
        with pytest.raises(trio.ClosedResourceError):
            await storage.device_lists(["bob"])  # refused once closing, never stranded
        db.gate.set()
    assert deliveries_stored(path) == len(sends)
    with pytest.raises(trio.ClosedResourceError):
        await storage.device_lists(["bob"])
    await storage.aclose()  # idempotent
    reopened = SqliteDatabase(str(path))
    assert len(reopened.pending("bob", 2, after_seq=0, limit=100, now=0)) == 20
    reopened.close()


async def test_device_list_compare_and_set_through_the_writer(tmp_path: Path) -> None:
    storage = await SqliteStorage.open(str(tmp_path / "relay.db"))
    try:
        first = device_list("carol", 0, (1, secrets.token_bytes(32)))
        results: list[bool] = []

        async def publish() -> None:
            try:
                await storage.store_device_list(first, previous_counter=None)
                results.append(True)
            except StorageConflict:
                results.append(False)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(publish)
        assert sorted(results) == [False] * 9 + [True]  # one registration wins, in one batch
    finally:
        await storage.aclose()


# ------------------------------------------------------------------ stopping the relay


@pytest.mark.parametrize(
    ("signum", "shell_open"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
)
async def test_the_relay_stops_on_a_signal_under_load(
    tmp_path: Path, signum: signal.Signals, shell_open: bool
) -> None:
    """Ctrl-C (or a service manager) stops a busy relay within a couple of seconds, and
    every send it accepted is in the database it closed; also while a shell on the file
    holds a read transaction (closing waited 5 s for it to truncate the WAL)."""
    db_path = tmp_path / "relay.db"
    argv = [*RELAY_COMMAND, "--port", "0", "--db", str(db_path)]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    accepted: set[bytes] = set()
    try:
        port = await announced_port(process)
        bob, senders = make_user("bob"), [make_user(f"sender{i}") for i in range(4)]
        await register(port, bob, *senders)

        async def send_until_stopped(sender: Any) -> None:
            with suppress(TransportError, OSError):
                async with connected(port, sender.devices[1], request_timeout=5) as connection:
                    for n in range(10**6):
                        payload = b"%s %d" % (sender.user_id.encode(), n)
                        await connection.send_direct("bob", [(1, payload)])
                        accepted.add(payload)

        shell = sqlite3.connect(db_path, isolation_level=None)
        if shell_open:
            shell.execute("BEGIN")
            shell.execute("SELECT COUNT(*) FROM users").fetchone()  # holds a snapshot
        async with trio.open_nursery() as nursery:
            for sender in senders:
                nursery.start_soon(send_until_stopped, sender)
            await trio.sleep(1)
            process.send_signal(signum)
            with trio.fail_after(3):
                assert await process.wait() == 0
            nursery.cancel_scope.cancel()
        shell.close()
    finally:
        process.kill()
        await process.wait()
    assert len(accepted) > 20, "the load was too light to mean anything"
    if not shell_open:  # closed cleanly: WAL truncated (or deleted, by the last connection)
        wal = tmp_path / "relay.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0
    db = SqliteDatabase(str(db_path))  # with the key file it created beside the database
    stored = {q.envelope.payload for q in db.pending("bob", 1, after_seq=0, limit=10**6, now=0)}
    db.close()
    assert accepted <= stored


# ------------------------------------------------------------------ acknowledgements


async def serve(
    relay: Relay, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """``relay`` on 127.0.0.1 (any port) over TCP, as serve_relay does."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(relay.handle_connection, listeners)


async def test_ok_to_ack_does_not_wait_for_the_commit_and_the_deletion_follows(
    tmp_path: Path,
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    db = RecordingDatabase(str(tmp_path / "relay.db"))
    storage = SqliteStorage(db)
    relay = Relay(relay_config(), storage)

    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, relay)
            await register(port, alice, bob)
            async with connected(port, alice.devices[1]) as sender:
                for index in range(10):
                    await sender.send_direct("bob", [(1, b"%d" % index)])
            async with connected(port, bob.devices[1]) as receiver:
                envelopes = [await next_envelope(receiver) for _ in range(10)]
                db.gate.clear()  # nothing commits from here on
                try:
                    with trio.fail_after(5):
                        for envelope in envelopes:
                            await receiver.ack(envelope.guid)  # answered all the same
                    # The deletions wait at the gate (the writer reaches it in its own time).
                    assert await trio.to_thread.run_sync(db.waiting.wait, 5)
                    assert db.held >= 1
                    assert deliveries_stored(tmp_path / "relay.db") == 10
                finally:
                    db.gate.set()
            async with connected(port, bob.devices[1]) as again:
                with trio.fail_after(5):
                    assert not isinstance(await again.receive(), Envelope)  # QUEUE_EMPTY first
            nursery.cancel_scope.cancel()
    finally:
        db.gate.set()
        await storage.aclose()


async def test_an_acknowledged_envelope_is_deleted_even_if_the_connection_closes_first(
    tmp_path: Path,
) -> None:
    """The storage queue is full when the client acknowledges and leaves: still deleted."""
    alice, bob = make_user("alice"), make_user("bob")
    db = RecordingDatabase(str(tmp_path / "relay.db"))
    storage = SqliteStorage(db, max_queued=1)
    relay = Relay(relay_config(), storage)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, relay)
            await register(port, alice, bob)
            async with connected(port, alice.devices[1]) as sender:
                for index in range(2):
                    await sender.send_direct("bob", [(1, b"%d" % index)])
            try:
                async with connected(port, bob.devices[1]) as receiver:
                    envelopes = [await next_envelope(receiver) for _ in range(2)]
                    db.gate.clear()
                    for envelope in envelopes:
                        # The first deletion is held in the writer, the second waits to queue.
                        await receiver.ack(envelope.guid)
                    await trio.to_thread.run_sync(db.waiting.wait)
                await trio.sleep(0.2)  # the relay has seen the connection close
            finally:
                db.gate.set()
            with trio.fail_after(5):
                while deliveries_stored(tmp_path / "relay.db"):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    finally:
        db.gate.set()
        await storage.aclose()


# ------------------------------------------------------------------ the directory in memory


async def test_sends_checked_on_a_stale_copy_of_a_device_list_are_checked_again(
    tmp_path: Path,
) -> None:
    """Two relay processes share one database; one changes bob's list behind the other's copy."""
    path = str(tmp_path / "relay.db")
    first, second = await SqliteStorage.open(path), await SqliteStorage.open(path)
    relay_a, relay_b = Relay(relay_config(), first), Relay(relay_config(), second)
    alice, bob = make_user("alice"), make_user("bob")
    try:
        async with memory_connection(relay_a) as registrar:
            for user in (alice, bob):
                await registrar.upload_device_list(user.signed_list())
        async with memory_connection(relay_a, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"one")])  # relay_a now holds bob's list
            bob.add_device(2)
            async with memory_connection(relay_b, bob.devices[1]) as owner:
                await owner.upload_device_list(bob.signed_list())
            # The copy says device 1 only; the commit's compare-and-set sees the change.
            with pytest.raises(DeviceListMismatch) as info:
                await sender.send_direct("bob", [(1, b"two")])
            assert info.value.mismatches[0].missing == (2,)
            # The copy is now current: naming both devices is accepted at once.
            await sender.send_direct("bob", [(1, b"three"), (2, b"three")])
            bob.remove_device(2)
            async with memory_connection(relay_b, bob.devices[1]) as owner:
                await owner.upload_device_list(bob.signed_list())
            # The copy names device 2, which is gone: refused only after a fresh read agrees.
            await sender.send_direct("bob", [(1, b"four")])
        async with memory_connection(relay_b, bob.devices[1]) as receiver:
            envelopes = await envelopes_until_empty(receiver)
        assert [e.payload for e in envelopes] == [b"one", b"three", b"four"]
    finally:
        await first.aclose()
        await second.aclose()


# ------------------------------------------------------------------ writing to a slow reader


async def raw_device(port: int, device: Any, *, window: int) -> RawClient:
    """A raw TCP connection authenticated as ``device``, reading only when the test does."""
    client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
    await client.send_body(encode_body(Hello(0, RELAY_PROTOCOL_VERSION, window)))
    welcome = decode_relay_frame(await client.receive_body() or b"")
    assert isinstance(welcome, Welcome)
    signature = sign_auth(
        device.identity, welcome.relay_name, welcome.challenge, device.user_id, device.device_id
    )
    await client.send_body(encode_body(Auth(1, device.user_id, device.device_id, signature)))
    assert decode_relay_frame(await client.receive_body() or b"") == Ok(1)
    return client


async def test_frames_to_a_reader_that_pauses_or_stops_stay_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pushes beyond what the socket takes at once: the direct write's remainder goes
    through trio (whole frames, in order); a reader that stops is dropped at the send
    timeout, and its mail waits for it."""
    partial: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        written = real_write(fd, data)
        if written < len(data):
            partial.append(written)
        return written

    monkeypatch.setattr(os, "write", write)
    alice, bob = make_user("alice"), make_user("bob")
    storage = await SqliteStorage.open(str(tmp_path / "relay.db"))
    relay = Relay(relay_config(send_timeout=1.0), storage)
    payloads = [bytes([index]) * 200_000 for index in range(40)]
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, relay)
            await register(port, alice, bob)
            reader = await raw_device(port, bob.devices[1], window=100)
            async with connected(port, alice.devices[1]) as sender:
                for payload in payloads:
                    await sender.send_direct("bob", [(1, payload)])
            await trio.sleep(0.3)  # bob reads nothing meanwhile
            got: list[bytes] = []
            with trio.fail_after(10):
                while len(got) < len(payloads):
                    frame = decode_relay_frame(await reader.receive_body() or b"")
                    if isinstance(frame, EnvelopePush):
                        got.append(frame.envelope.payload)
            assert got == payloads
            assert partial, "every write fitted the socket: the test shows nothing"
            # A reader that stops for good is dropped once a write waits 1 s.
            async with connected(port, alice.devices[1]) as sender:
                for payload in payloads:
                    await sender.send_direct("bob", [(1, payload)])
            with trio.fail_after(10):
                while ("bob", 1) in relay.connected_devices:
                    await trio.sleep(0.05)
            await reader.stream.aclose()
            async with connected(port, bob.devices[1]) as again:  # nothing was acknowledged
                envelopes = await envelopes_until_empty(again, timeout=10)
                assert [e.payload for e in envelopes] == payloads * 2
            nursery.cancel_scope.cancel()
    finally:
        await storage.aclose()
