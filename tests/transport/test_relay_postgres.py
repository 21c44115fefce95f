"""What only the PostgreSQL storage does: its dialect, its errors, and batches that lose a
deadlock to another relay process (the storage and relay suites run on it too)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from hushchat.devtools.pgcluster import ThrowawayCluster
from hushchat.protocol.prekeys import OneTimePreKeyPublic
from hushchat.transport import cli
from hushchat.transport.relay.config import Registration, wall_clock_ms
from hushchat.transport.relay.server import RelayStartError, serve_relay
from hushchat.transport.relay.storage import postgres as postgres_storage
from hushchat.transport.relay.storage.atrest import KeyChain, KeyState, read_key_file
from hushchat.transport.relay.storage.interface import ClusterEvents
from hushchat.transport.relay.storage.names import without_password
from hushchat.transport.relay.storage.postgres import (
    POSTGRES_SCHEMA_VERSION,
    BinaryArray,
    PostgresConnection,
    PostgresDatabase,
    PostgresStorage,
    postgres_sql,
)
from hushchat.transport.relay.storage.rows import open_delivery, open_payload
from hushchat.transport.relay.storage.writer import DatabaseCall, storage_error
from hushchat.transport.wire.errors import InviteRefused, PreKeyIdInUse, StorageFull
from hushchat.transport.wire.limits import DEFAULT_RETENTION_SECONDS, EPOCHS_PER_RETENTION
from hushchat.transport.wire.records import PreKeyCounts
from tests.support.postgres import back_to_schema_4
from tests.support.relay import (
    connected,
    envelopes_until_empty,
    make_prekeys,
    register,
    relay_config,
    running_relay,
)
from tests.support.storage import batch, register_devices, upload_prekeys
from tests.support.users import make_user


def test_sqlite_statements_are_spoken_in_postgresql_s_dialect() -> None:
    assert postgres_sql("SELECT 1 FROM meta WHERE name = ?") == "SELECT 1 FROM meta WHERE name = %s"
    assert postgres_sql("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)") == (
        "INSERT INTO meta (name, value) VALUES (%s, %s) "
        "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value"
    )
    assert "GREATEST(queued - %s, 0)" in postgres_sql(
        "UPDATE mailboxes SET queued = MAX(queued - ?, 0) WHERE mailbox = ?"
    )


class DiskFull(Exception):
    sqlstate = "53100"  # what psycopg's DiskFull carries


def test_a_full_disk_is_storage_full_as_on_sqlite() -> None:
    error = storage_error(DiskFull("could not extend file"))
    assert isinstance(error, StorageFull) and isinstance(error.__cause__, DiskFull)


def test_array_parameters_arrive_as_sent(postgres_dsn: str) -> None:
    """The prepared statements' own binary encoding of arrays (BinaryArray), for every
    element type they send, and of the scalars; and their decoding of the results."""
    conn = PostgresConnection(postgres_dsn)
    cases: list[tuple[str, Sequence[bytes | str | int]]] = [
        ("bytea", [b"", b"\x00\xff" * 40, bytes(range(256))]),
        ("text", ["alice", "", "b\u00f6b \U0001f600"]),
        ("bigint", [0, -1, 2**63 - 1, -(2**63)]),
        ("bytea", []),
        ("text", []),
    ]
    for element, values in cases:
        rows = conn.run(
            f"SELECT value, cardinality(%(values)b::{element}[]), %(scalar)b "
            f"FROM unnest(%(values)b::{element}[]) WITH ORDINALITY AS t (value, i) ORDER BY i",
            {"values": BinaryArray(element, values), "scalar": values[0] if values else 7},
        )
        assert [row[0] for row in rows] == values
        assert all(row[1:] == (len(values), values[0]) for row in rows)
        assert conn.run("SELECT %(n)b::integer, NULL::text", {"n": 7}) == [(7, None)]
    conn.close()


def test_a_failing_call_rolls_back_alone_in_its_batch(postgres_dsn: str, tmp_path: Path) -> None:
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "bob", 1, 2)
    upload_prekeys(db, "bob", 1, one_time=1, kem=0)
    key = [OneTimePreKeyPublic(1, b"\x01" * 32)]
    calls = [
        DatabaseCall(partial(db._store_prekeys, "bob", 2, None, None, key, [], 10)),
        DatabaseCall(partial(db._store_prekeys, "bob", 1, None, None, key, [], 10)),  # in use
        DatabaseCall(partial(db._counts, ("bob", 2)), savepoint=False),
    ]
    db.run_batch(calls)
    assert calls[0].error is None
    assert isinstance(calls[1].error, PreKeyIdInUse)
    assert calls[2].result == PreKeyCounts(1, 0)
    assert db.prekey_counts("bob", 1) == db.prekey_counts("bob", 2) == PreKeyCounts(1, 0)
    db.close()


def test_a_full_database_is_logged_once_a_minute_as_a_full_disk_is(
    postgres_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every batch that stores anything fails while the database is full: one warning
    line, not one per batch (README Logging: at most one a minute, the rest counted)."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "bob", 1)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(
            "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; END $$"
        )
        admin.execute(
            "CREATE TRIGGER disk_full BEFORE INSERT ON one_time_prekeys "
            "FOR EACH ROW EXECUTE FUNCTION disk_full()"
        )
    with caplog.at_level(logging.WARNING, logger="hushchat.relay"):
        for key_id in range(1, 6):
            key = [OneTimePreKeyPublic(key_id, bytes([key_id]) * 32)]
            call = DatabaseCall(partial(db._store_prekeys, "bob", 1, None, None, key, [], 10))
            db.run_batch([call])
            assert isinstance(call.error, StorageFull)
    db.close()
    full = [r.getMessage() for r in caplog.records if "full" in r.getMessage()]
    assert len(full) == 1, full


def send_to_bob(
    db: PostgresDatabase,
    text: bytes,
    now: int,
    *,
    devices: tuple[int, ...] = (1,),
    max_mailbox_size: int = 10,
) -> None:
    """Store alice's send of ``text`` to bob's ``devices`` at ``now``, kept for the retention."""
    db.enqueue(
        batch(
            [("bob", device) for device in devices],
            (text,),
            counters={"bob": 0},
            server_ts=now,
            expires_at=now + DEFAULT_RETENTION_SECONDS * 1000,
        ),
        max_mailbox_size=max_mailbox_size,
    )


def store_one_time_keys(
    db: PostgresDatabase, device: tuple[str, int], count: int, *, first: int = 1
) -> None:
    """Store one-time prekeys numbered from ``first`` for ``device``, inside a batch."""
    keys = [OneTimePreKeyPublic(i, bytes([i]) * 32) for i in range(first, first + count)]
    db._store_prekeys(*device, None, None, keys, [], 100)


def test_no_call_is_told_it_committed_when_its_batch_did_not(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The last call of a batch, a read run without a savepoint, meets an error after two
    writes: PostgreSQL fails the whole transaction and answers its COMMIT by rolling back
    without an error. The writes were reported as stored (and were not: seen on main at
    d6b41af). Now the batch runs again with a savepoint per call, and only the read fails."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "bob", 1, 2)
    calls = [
        DatabaseCall(partial(store_one_time_keys, db, ("bob", 1), 1)),
        DatabaseCall(partial(store_one_time_keys, db, ("bob", 2), 2)),
        DatabaseCall(partial(db._conn.execute, "SELECT 1 / 0"), savepoint=False),
    ]
    db.run_batch(calls)
    assert isinstance(calls[2].error, psycopg.errors.DivisionByZero)
    assert calls[0].error is None and calls[1].error is None
    assert db.prekey_counts("bob", 1) == PreKeyCounts(1, 0)
    assert db.prekey_counts("bob", 2) == PreKeyCounts(2, 0)
    assert db.careful_batches == 1
    db.close()


def test_a_call_that_fails_after_it_wrote_is_undone_alone(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A batch runs without savepoints until a call fails after it wrote: then it runs
    again with them, and that call's writes alone are undone. A call that fails before
    it writes costs no second run."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "bob", 1, 2)

    def write_then_fail() -> None:
        store_one_time_keys(db, ("bob", 2), 3)
        raise PreKeyIdInUse("after a write")

    def fail_first() -> None:
        raise PreKeyIdInUse("before any write")

    calls = [
        DatabaseCall(partial(store_one_time_keys, db, ("bob", 1), 1)),
        DatabaseCall(fail_first),
    ]
    db.run_batch(calls)
    assert calls[0].error is None and isinstance(calls[1].error, PreKeyIdInUse)
    assert db.careful_batches == 0
    calls = [
        DatabaseCall(partial(store_one_time_keys, db, ("bob", 1), 1, first=2)),
        DatabaseCall(write_then_fail),
    ]
    db.run_batch(calls)
    assert calls[0].error is None and isinstance(calls[1].error, PreKeyIdInUse)
    assert db.careful_batches == 1
    assert db.prekey_counts("bob", 1) == PreKeyCounts(2, 0)
    assert db.prekey_counts("bob", 2) == PreKeyCounts(0, 0)
    db.close()


@pytest.mark.parametrize("failing_write_last", [False, True])
def test_a_pipelined_write_that_fails_is_never_reported_stored(
    postgres_dsn: str, tmp_path: Path, failing_write_last: bool
) -> None:
    """An optimistic batch sends its writes without waiting for their results, so a write's
    error comes back in a later call, or only at the COMMIT. Either way the batch runs
    again with a savepoint per call: the write's call alone fails, with its own error, and
    the other call's keys are stored (a COMMIT that met the error would have rolled back
    the batch and reported it stored)."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "bob", 1)

    def conflicting_write() -> str:
        # The epoch's row exists: the key conflicts.
        db._conn.send(
            "INSERT INTO meta (name, value) VALUES (%(name)b, %(value)b)",
            {"name": "epoch", "value": b"\x00"},
        )
        return "sent"

    calls = [
        DatabaseCall(conflicting_write),
        DatabaseCall(partial(store_one_time_keys, db, ("bob", 1), 2)),
    ]
    if failing_write_last:
        calls.reverse()
    db.run_batch(calls)
    write, keys = (calls[1], calls[0]) if failing_write_last else (calls[0], calls[1])
    assert isinstance(write.error, psycopg.errors.UniqueViolation)
    assert keys.error is None
    assert db.careful_batches == 1
    assert db.prekey_counts("bob", 1) == PreKeyCounts(2, 0)
    db.close()


def test_pipelined_writes_larger_than_the_socket_buffers_all_arrive(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Writes sent without reading their results, many megabytes of them: libpq's
    non-blocking connection leaves part unsent, which the sync must write out (while
    reading) before it waits for the results, or both sides wait forever."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    blob = bytes(range(256)) * 1024  # 256 KiB

    def many_writes() -> int:
        for i in range(40):
            db._conn.send(
                "INSERT INTO meta (name, value) VALUES (%(name)b, %(value)b)",
                {"name": f"test {i}", "value": blob},
            )
        (count,) = db._conn.run(
            "SELECT COUNT(*) FROM meta WHERE name LIKE 'test %%' AND value = %(value)b",
            {"value": blob},
        )[0]
        return int(count)

    call = DatabaseCall(many_writes)
    db.run_batch([call])
    assert call.error is None and call.result == 40
    db.close()


def test_a_writer_whose_socket_is_beyond_select_s_reach_waits_all_the_same(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A relay holding a thousand connections opens its database connection on a file
    descriptor above 1023, which select() refuses ("filedescriptor out of range"): the
    pipelined batch waits with poll()."""
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    finally:
        for fd in fillers:
            os.close(fd)
    assert db._conn.raw.pgconn.socket > 1023
    register_devices(db, "bob", 1)
    calls = [
        DatabaseCall(partial(store_one_time_keys, db, ("bob", 1), 2)),
        DatabaseCall(partial(db._enqueue, batch([("bob", 1)], (b"hi",), counters={"bob": 0}), 10)),
    ]
    db.run_batch(calls)
    assert [call.error for call in calls] == [None, None]
    assert [q.envelope.payload for q in db.pending("bob", 1, after_seq=0, limit=5, now=0)] == [
        b"hi"
    ]
    db.close()


def test_a_writer_whose_database_connection_was_cut_fails_that_batch_and_reconnects(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The server ends the writer's connection (a restart, a failover, an operator's
    pg_terminate_backend): the batch that meets it fails, never reported as stored;
    the next batch reconnects, and what was stored before is all there."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "alice", 1, key_base=0xA0)
    register_devices(db, "bob", 1)

    def send(text: bytes) -> None:
        db.enqueue(batch([("bob", 1)], (text,), counters={"bob": 0}), max_mailbox_size=10)

    send(b"before")
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        terminated = admin.execute(
            "SELECT pg_terminate_backend(%s)", (db._conn.raw.info.backend_pid,)
        ).fetchone()
    assert terminated is not None
    (ended,) = terminated
    assert ended
    with pytest.raises(psycopg.OperationalError):
        send(b"lost with its connection")
    send(b"after")
    queued = db.pending("bob", 1, after_seq=0, limit=10, now=0)
    assert [q.envelope.payload for q in queued] == [b"before", b"after"]
    db.close()


def test_a_batch_that_loses_a_deadlock_runs_again_whole(postgres_dsn: str, tmp_path: Path) -> None:
    """Two relays' batches lock two rows in opposite orders, one call each, and meet: the
    server aborts one transaction; rolling back only its second call would leave its
    first call's lock in the winner's way, so the whole batch runs again, and both end
    with every call committed once."""
    first = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    second = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(first, "a", 1)
    register_devices(first, "b", 1, key_base=0x10)
    met = threading.Barrier(2)
    runs = {"a": 0, "b": 0}

    def lock(db: PostgresDatabase, user: str, wait: bool) -> None:
        if wait:
            runs[user] += 1
        db._conn.execute("UPDATE devices SET identity = identity WHERE user_id = ?", (user,))
        if not wait and sum(runs.values()) == 0:
            met.wait()  # both hold their first row before asking for the other's

    def batch(db: PostgresDatabase, order: tuple[str, str]) -> list[DatabaseCall]:
        calls = [
            DatabaseCall(partial(lock, db, order[0], False)),
            DatabaseCall(partial(lock, db, order[1], True)),
        ]
        db.run_batch(calls)
        return calls

    results: list[list[DatabaseCall]] = []
    threads = [
        threading.Thread(target=lambda: results.append(batch(first, ("a", "b")))),
        threading.Thread(target=lambda: results.append(batch(second, ("b", "a")))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [call.error for calls in results for call in calls] == [None] * 4
    # At least one batch ran again (under load, both may have been chosen: each
    # backend's deadlock check can find the cycle before the other's abort ends it).
    assert sum(runs.values()) >= 3
    first.close()
    second.close()


def test_batches_that_lock_two_devices_in_opposite_orders_do_not_deadlock(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Two relays' batches acknowledge on alice's and bob's devices in opposite call orders
    (call order is kept: a sender's requests commit in order), and both try to go on only
    once both took their first call's lock or one of them waits for a lock. Every batch
    locks what its calls will lock up front, in one global order, so neither holds a row
    the other holds back: no deadlock, no batch run again."""
    first = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    second = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(first, "alice", 1)
    register_devices(first, "bob", 1, key_base=0x10)
    pids = [db._conn.execute("SELECT pg_backend_pid()").fetchone()[0] for db in (first, second)]
    arrived: set[str] = set()
    watcher = psycopg.connect(postgres_dsn, autocommit=True)
    watching = threading.Lock()

    def meet(name: str) -> None:
        """Wait until the other batch got as far, or is waiting for a lock."""
        arrived.add(name)
        while not arrived - {name}:
            with watching:
                if watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s) "
                    "AND wait_event_type = 'Lock'",
                    (pids,),
                ).fetchone():
                    return

    def run(db: PostgresDatabase, name: str, order: tuple[str, str]) -> list[DatabaseCall]:
        calls = [
            DatabaseCall(partial(db._acknowledge, order[0], 1, [])),
            DatabaseCall(partial(meet, name), savepoint=False),
            DatabaseCall(partial(db._acknowledge, order[1], 1, [])),
        ]
        db.run_batch(calls)
        return calls

    results: list[list[DatabaseCall]] = []
    threads = [
        threading.Thread(target=lambda: results.append(run(first, "first", ("bob", "alice")))),
        threading.Thread(target=lambda: results.append(run(second, "second", ("alice", "bob")))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    watcher.close()
    assert [call.error for calls in results for call in calls] == [None] * 6
    assert first.batch_retries == second.batch_retries == 0
    first.close()
    second.close()


def test_errors_and_logs_name_no_password() -> None:
    assert without_password("postgresql://relay:s3cret@db/hushchat") == (
        "postgresql://relay@db/hushchat"
    )
    assert "s3cret" not in without_password("postgresql:///hushchat?user=relay&password=s3cret")


def test_a_relay_started_after_the_retention_purged_tells_and_files_anew(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Stopped for longer than the retention: at start the old epoch is purged, its
    recipient told, its keys gone, and new mail is filed under the current epoch."""
    now = [wall_clock_ms()]
    keys = str(tmp_path / "relay.keys")
    retention = DEFAULT_RETENTION_SECONDS * 1000

    db = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: now[0])
    register_devices(db, "bob", 1)
    send_to_bob(db, b"old", now[0])
    old_epoch = db.key_chain.epoch_of(now[0])
    db.close()
    now[0] += retention + 2 * db.key_chain.epoch_ms
    again = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: now[0])
    assert again.key_chain.keys(old_epoch) is None
    assert again.pending("bob", 1, after_seq=0, limit=10, now=now[0]) == []
    notice = again.expiry_notice("bob", 1)
    assert notice is not None and notice.count == 1
    send_to_bob(again, b"new", now[0])
    (queued,) = again.pending("bob", 1, after_seq=0, limit=10, now=now[0])
    assert queued.envelope.payload == b"new"
    assert queued.epoch == again.key_chain.epoch_of(now[0])
    again.close()


def test_a_move_to_a_new_epoch_that_did_not_commit_is_tried_again(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The clock enters a new epoch and the writer's exclusive batch moving the database
    to it fails at its COMMIT (the server went away, say): nothing moved. The relay
    had noted the new epoch as seen all the same, so it never tried again, and filed
    new mail under the old epoch (which leaves the retention window, and is purged, an
    epoch early) until another relay or the purge moved it (seen on main at 91e3199)."""
    now = [wall_clock_ms()]
    keys = str(tmp_path / "relay.keys")
    db = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: now[0])
    register_devices(db, "bob", 1)
    old_epoch = db.key_chain.epoch_of(now[0])
    now[0] = db.key_chain.start_of(old_epoch + 1)
    real_execute = db._conn.execute
    cut: list[str] = []

    def execute(sql: str, parameters: Any = (), /) -> Any:
        if sql == "COMMIT" and db._exclusive and not cut:
            cut.append(sql)
            raise psycopg.OperationalError("the server closed the connection")
        return real_execute(sql, parameters)

    db._conn.execute = execute
    db.device_lists(["bob"])  # its batch is preceded by the move, which fails
    assert cut
    db._conn.execute = real_execute
    ts = now[0]
    send = batch([("bob", 1)], (b"new",), counters={"bob": 0}, server_ts=ts, expires_at=ts + 9)
    db.enqueue(send, max_mailbox_size=10)
    (queued,) = db.pending("bob", 1, after_seq=0, limit=10, now=now[0])
    assert queued.epoch == old_epoch + 1
    db.close()


def test_a_call_whose_first_statement_is_an_executemany_is_undone_whole(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Run with savepoints, a call's SAVEPOINT waits to be sent with its first statement;
    an executemany did not send it, so its rows went in before the savepoint, and the
    call's failure rolled back to a savepoint taken after them: the rows of a failed
    call were committed (seen on main at 91e3199). Now they go with the call."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))

    def insert_then_fail() -> None:
        db._conn.executemany(
            "INSERT INTO invites (token_hash, expires_at) VALUES (?, ?)", [(b"\x01" * 32, 1)]
        )
        raise InviteRefused("after a write")

    calls = [DatabaseCall(insert_then_fail)]
    db.run_batch(calls)
    assert isinstance(calls[0].error, InviteRefused)
    assert db.careful_batches == 1
    with psycopg.connect(postgres_dsn) as other:
        assert other.execute("SELECT COUNT(*) FROM invites").fetchone() == (0,)
    db.close()


def test_the_relay_command_on_postgresql(
    postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relay on PostgreSQL needs the key file all its relays share (no path to put it
    beside); the operator commands work on the database, given that key file."""
    assert cli.main(["relay", "--db", postgres_dsn]) == 1
    assert "needs --key-file" in capsys.readouterr().err
    keys = str(tmp_path / "relay.keys")
    db = PostgresDatabase(postgres_dsn, key_file=keys)
    register_devices(db, "alice", 1, 2)
    db.close()
    assert cli.main(["relay", "users", "--db", postgres_dsn, "--key-file", keys]) == 0
    assert "alice" in capsys.readouterr().out
    assert cli.main(["relay", "users", "--db", postgres_dsn]) == 1
    assert "--key-file" in capsys.readouterr().err
    # A key file that is not there is named as missing, as on SQLite, and not made.
    missing = str(tmp_path / "typo.keys")
    assert cli.main(["relay", "users", "--db", postgres_dsn, "--key-file", missing]) == 1
    assert (
        capsys.readouterr().err == f"hushchat relay users: no key file of the relay at {missing}\n"
    )
    assert not Path(missing).exists()


def test_one_notification_per_batch_and_relay_naming_devices_never_ciphertext(
    postgres_dsn: str, tmp_path: Path
) -> None:
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "alice", 1, key_base=0x40)
    register_devices(db, "bob", 1, 2)
    db.run_batch([DatabaseCall(partial(db._attach, "bob", 1, b"c" * 8))])
    with psycopg.connect(postgres_dsn, autocommit=True) as other:
        other.execute("UPDATE presence SET relay = 'other' WHERE user_id = 'bob' AND device_id = 1")
        other.execute(
            "INSERT INTO presence VALUES ('bob', 2, 'other', %s), ('alice', 1, 'third', %s)",
            (b"d" * 8, b"e" * 8),
        )
        other.execute("LISTEN hushchat_relay_other")
        other.execute("LISTEN hushchat_relay_third")
        secret = b"CIPHERTEXT-" + bytes(range(50))
        sends = [
            batch([("bob", 1), ("bob", 2)], (secret,), counters={"bob": 0}),
            batch([("bob", 1)], (secret,), counters={"bob": 0}),
            batch([("bob", 2)], (secret,), counters={"bob": 0}),
        ]
        db.run_batch([DatabaseCall(partial(db._enqueue, s, 10)) for s in sends])
        notes = list(other.notifies(timeout=2, stop_after=3))
    assert [n.channel for n in notes] == ["hushchat_relay_other"]  # one, none to 'third'
    assert json.loads(notes[0].payload) == ["mail", [["bob", 1], ["bob", 2]]]
    assert secret.hex() not in notes[0].payload and "CIPHERTEXT" not in notes[0].payload
    db.close()


def test_a_backup_of_the_database_opens_nothing_once_its_epochs_left_the_window(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """PostgreSQL keeps deleted rows in pages, its WAL, replicas and backups: a copy taken
    while mail was queued keeps every row. After the window, the key file derives no key
    that opens any of them (spec 9.8)."""
    now = [wall_clock_ms()]
    keys = str(tmp_path / "relay.keys")
    db = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: now[0])
    register_devices(db, "bob", 1)
    for text in (b"one", b"two", b"three"):
        send_to_bob(db, text, now[0])
    with psycopg.connect(postgres_dsn) as backup:
        deliveries = backup.execute(
            "SELECT seq, mailbox, payload_id, sealed FROM deliveries"
        ).fetchall()
        payloads = backup.execute("SELECT id, sealed FROM payloads").fetchall()

    def opened(state: KeyState | None) -> list[object]:
        assert state is not None
        chain = KeyChain(state)
        epochs = range(state.epoch, chain.epoch_of(now[0]) + 2)
        every = [k for e in epochs if (k := chain.keys(e)) is not None]
        found: list[object] = []
        for seq, mailbox, payload_id, sealed in deliveries:
            found += [d for k in every if (d := open_delivery(k, seq, mailbox, payload_id, sealed))]
        for payload_id, sealed in payloads:
            found += [p for k in every if (p := open_payload(k, payload_id, sealed))]
        return found

    assert len(opened(read_key_file(keys))) == 6  # the check sees what is there
    now[0] += DEFAULT_RETENTION_SECONDS * 1000 + 2 * db.key_chain.epoch_ms
    assert db.purge_expired(now[0]) == 3
    assert opened(read_key_file(keys)) == []
    db.close()


async def test_invite_and_report_on_a_postgresql_database(
    postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hushchat relay invite`` and ``report`` take a PostgreSQL URL as they take a file:
    tokens issued into the database register users at the relays on it, and the report
    counts what the database holds."""
    dsn, key_file = postgres_dsn, str(tmp_path / "relay.keys")
    back_to_schema_4(dsn)  # as the previous relay left it
    assert cli.main(["relay", "invite", "--db", dsn]) == 1  # an older schema: migrate first
    err = capsys.readouterr().err
    assert "run 'hushchat relay migrate' first" in err and err.count("\n") == 1
    assert cli.main(["relay", "migrate", "--db", dsn]) == 0
    capsys.readouterr()
    assert cli.main(["relay", "invite", "--db", dsn, "--count", "2"]) == 0
    first, second = capsys.readouterr().out.split()
    alice, bob, mallory = make_user("alice"), make_user("bob"), make_user("mallory")
    config = relay_config(tmp_path, db=dsn, registration=Registration.INVITE)
    async with running_relay(config) as port:
        await register(port, alice, invite=first)
        with pytest.raises(InviteRefused):  # single use
            await register(port, mallory, invite=first)
        await register(port, bob, invite=second)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=3, one_time_kem=2))
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"queued")])
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM invites").fetchone() == (0,)
    assert cli.main(["relay", "report", "--db", dsn]) == 1
    assert "needs its relays' --key-file" in capsys.readouterr().err
    assert cli.main(["relay", "report", "--db", dsn, "--key-file", key_file]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for said in [
        f"(schema {POSTGRES_SCHEMA_VERSION})",
        "2 users and 2 devices",
        "prekeys: 1 signed, 1 last-resort ML-KEM-768, 3 one-time X25519, 2 one-time ML-KEM-768",
        "1 queued envelope (1 distinct payload,",
        "1 accepted within the last hour",
        "The oldest epoch whose keys exist began",
        "for the 1 envelope still queued",
    ]:
        assert said in out, said
    assert cli.main(["relay", "report", "--db", dsn, "--key-file", str(tmp_path / "none")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "does not exist: no queued envelope can be opened" in out


def test_the_report_of_a_postgresql_database_without_a_relay_schema_is_one_line(
    postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE schema_version")
    argv = ["relay", "report", "--db", postgres_dsn, "--key-file", str(tmp_path / "relay.keys")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("hushchat relay report: ") and "schema version none" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # it creates nothing


def _database_files(conn: psycopg.Connection[tuple[object, ...]], data: Path) -> list[Path]:
    """Every file of the connected database in the cluster's data folder (its tables and
    indexes, after a CHECKPOINT wrote the shared buffers out)."""
    conn.execute("CHECKPOINT")
    row = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
    assert row is not None
    return [p for p in (data / "base" / str(row[0])).rglob("*") if p.is_file()]


def test_a_seized_data_folder_holds_no_expired_row_after_the_sweep(
    postgres_dsn: str, postgres_cluster: ThrowawayCluster, tmp_path: Path
) -> None:
    """PostgreSQL has no secure delete: a DELETE leaves the rows' bytes in the table's pages
    until they are overwritten. The sweep drops the expired epoch's partitions instead:
    their files are emptied at commit and unlinked at the next checkpoint, and no file of
    the database holds the expired rows (the WAL, replicas and backups still may, spec 9.8)."""
    now = [wall_clock_ms()]
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"), clock=lambda: now[0])
    register_devices(db, "bob", 1, 2)
    for text in (b"one", b"two", b"three"):
        send_to_bob(db, text, now[0], devices=(1, 2))
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        sealed = [
            bytes(row[0])
            for row in conn.execute(
                "SELECT sealed FROM deliveries UNION ALL SELECT sealed FROM payloads"
            )
        ]
        assert len(sealed) == 9
        parts = conn.execute(
            "SELECT c.relname, pg_relation_filepath(c.oid) FROM pg_inherits AS i "
            "JOIN pg_class AS c ON c.oid = i.inhrelid "
            "WHERE i.inhparent IN ('deliveries'::regclass, 'payloads'::regclass, "
            "'deliveries_pkey'::regclass, 'payloads_pkey'::regclass, "
            "'deliveries_epoch_mailbox'::regclass, 'deliveries_payload'::regclass)"
        ).fetchall()
        files = [f.read_bytes() for f in _database_files(conn, postgres_cluster.data)]
        assert all(any(s in f for f in files) for s in sealed)  # the check sees what is stored
        now[0] += DEFAULT_RETENTION_SECONDS * 1000 + 2 * db.key_chain.epoch_ms
        assert db.purge_expired(now[0]) == 6
        files = [f.read_bytes() for f in _database_files(conn, postgres_cluster.data)]
        assert not any(s in f for f in files for s in sealed)
        # The epoch's tables and indexes are gone, and so are their files.
        assert len(parts) == 2 + 4  # a partition of each table, and of each index
        names = [name for name, _ in parts]
        assert (
            conn.execute(
                "SELECT relname FROM pg_class WHERE relname = ANY(%s) "
                "AND relnamespace = current_schema()::regnamespace",
                (names,),
            ).fetchall()
            == []
        )
        assert not any((postgres_cluster.data / path).exists() for _, path in parts)
    db.close()


def test_the_prepared_statements_outlive_a_sweep_and_a_rollback(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The hot statements are prepared once per connection. psycopg, once it has prepared
    statements of its own, answers a DROP (the sweep's) or a ROLLBACK by deallocating all
    of the session's: the next send then failed with 'prepared statement does not exist'
    (seen before psycopg was told to prepare none). Here the relay sends, the sweep drops
    an expired epoch, a batch rolls back, and the same relay sends, reads and
    acknowledges again."""
    now = [wall_clock_ms()]
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"), clock=lambda: now[0])
    register_devices(db, "bob", 1)

    send_to_bob(db, b"expires", now[0])
    now[0] += DEFAULT_RETENTION_SECONDS * 1000 + 2 * db.key_chain.epoch_ms
    for _ in range(6):  # what psycopg would have prepared: a statement run often
        db.prekey_counts("bob", 1)
    send_to_bob(db, b"kept", now[0])  # the newest epoch's statements prepared
    assert db.purge_expired(now[0]) == 1  # the first epoch's partitions dropped
    failed = DatabaseCall(partial(db._conn.execute, "SELECT 1 / 0"))
    db.run_batch([failed])  # and a rollback
    assert isinstance(failed.error, psycopg.errors.DivisionByZero)
    send_to_bob(db, b"after", now[0])
    queued = db.pending("bob", 1, after_seq=0, limit=10, now=now[0])
    assert [q.envelope.payload for q in queued] == [b"kept", b"after"]
    assert db.acknowledge("bob", 1, [q.seq for q in queued]) == 2
    db.close()


def _partitions(conn: psycopg.Connection[tuple[object, ...]]) -> set[str]:
    """The partitions of the queue's tables."""
    return {
        str(row[0])
        for row in conn.execute(
            "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
            "WHERE i.inhparent IN ('deliveries'::regclass, 'payloads'::regclass)"
        )
    }


def test_sends_across_epoch_boundaries_on_relays_whose_clocks_differ_never_fail(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A relay whose clock runs ahead starts each epoch (and creates its partitions) early;
    the relay behind files under that epoch, whose partitions exist. Every send across
    the boundaries succeeds, and the mailbox reads back whole and in order."""
    keys = str(tmp_path / "relay.keys")
    start = wall_clock_ms()
    behind_now = [start]
    epoch_ms = DEFAULT_RETENTION_SECONDS * 1000 // EPOCHS_PER_RETENTION
    skew = epoch_ms // 3
    ahead = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: behind_now[0] + skew)
    behind = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: behind_now[0])
    assert ahead.key_chain.epoch_ms == epoch_ms
    register_devices(ahead, "bob", 1)
    sent: list[bytes] = []
    for step in range(12):  # four epochs, in thirds: each boundary crossed by both clocks
        behind_now[0] = start + step * epoch_ms // 3
        for name, db in (("ahead", ahead), ("behind", behind)):
            text = f"{name} {step}".encode()
            db.enqueue(
                batch(
                    [("bob", 1)],
                    (text,),
                    counters={"bob": 0},
                    server_ts=db._clock(),
                    expires_at=db._clock() + DEFAULT_RETENTION_SECONDS * 1000,
                ),
                max_mailbox_size=100,
            )
            sent.append(text)
    queued = behind.pending("bob", 1, after_seq=0, limit=100, now=behind_now[0])
    assert [q.envelope.payload for q in queued] == sent
    epochs = {q.epoch for q in queued}
    assert len(epochs) >= 4
    assert max(epochs) == ahead.key_chain.epoch_of(behind_now[0] + skew)  # filed as ahead says
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert {f"deliveries_{e}" for e in epochs} <= _partitions(conn)
        assert not conn.execute(
            "SELECT 1 FROM pg_inherits AS i JOIN pg_class AS c "
            "ON c.oid = i.inhrelid WHERE c.relname LIKE '%default%'"
        ).fetchall()
    # Acknowledged by seq alone, each in its epoch's partition.
    assert behind.acknowledge("bob", 1, [q.seq for q in queued]) == len(sent)
    assert behind.pending("bob", 1, after_seq=0, limit=100, now=behind_now[0]) == []
    ahead.close()
    behind.close()


def test_an_acknowledgement_looks_into_the_partitions_of_its_seqs_epochs_only(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The first seq of each epoch is kept (``epoch_starts``), so the deliveries at some
    seqs are looked up in the epochs they can be in: the other partitions are pruned."""
    now = [wall_clock_ms()]
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"), clock=lambda: now[0])
    register_devices(db, "bob", 1)
    epoch_ms = db.key_chain.epoch_ms
    for _ in range(4):
        for text in (b"a", b"b"):
            send_to_bob(db, text, now[0], max_mailbox_size=100)
        now[0] += epoch_ms
    queued = db.pending("bob", 1, after_seq=0, limit=100, now=now[0])
    by_epoch: dict[int, list[int]] = {}
    for q in queued:
        by_epoch.setdefault(q.epoch, []).append(q.seq)
    first, second, third, fourth = sorted(by_epoch)
    db._single(lambda: None)  # a shared batch, as an acknowledgement's
    assert db._epochs_of(by_epoch[second]) == (second, second)
    assert db._epochs_of([by_epoch[second][0], by_epoch[third][1]]) == (second, third)
    assert db._epochs_of(by_epoch[fourth]) == (fourth, fourth)  # the newest: nothing later
    where, values = db._where_seqs(by_epoch[second])
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        plan = "\n".join(
            str(row[0])
            for row in conn.execute(
                f"EXPLAIN SELECT seq FROM deliveries WHERE {where.replace('?', '%s')}", values
            )
        )
    assert f"deliveries_{second}" in plan
    assert not any(f"deliveries_{e}" in plan for e in (first, third, fourth))
    assert db.acknowledge("bob", 1, by_epoch[second] + by_epoch[fourth]) == 4
    left = db.pending("bob", 1, after_seq=0, limit=100, now=now[0])
    assert [q.epoch for q in left] == [first, first, third, third]
    db.close()


def test_a_sweep_on_one_relay_while_the_other_sends_loses_nothing(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Two relays on one database: one sends without pause while the other sweeps, the
    clock crossing epoch boundaries, expired epochs' partitions dropped. No send fails,
    every new envelope is queued once, in order; the expired ones are told."""
    keys = str(tmp_path / "relay.keys")
    retention = DEFAULT_RETENTION_SECONDS * 1000
    now = [wall_clock_ms()]
    sender = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: now[0])
    sweeper = PostgresDatabase(postgres_dsn, key_file=keys, clock=lambda: now[0])
    epoch_ms = sender.key_chain.epoch_ms
    register_devices(sender, "alice", 1, key_base=0x40)
    register_devices(sender, "bob", 1)

    def send(text: bytes) -> None:
        send_to_bob(sender, text, now[0], max_mailbox_size=10_000)

    for index in range(3):  # to expire, one epoch each
        send(f"old {index}".encode())
        now[0] += epoch_ms
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        old_partitions = _partitions(conn)
    now[0] += retention - 4 * epoch_ms
    sent: list[bytes] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_sending() -> None:
        try:
            while not stop.is_set():
                text = f"new {len(sent)}".encode()
                send(text)
                sent.append(text)
        except BaseException as exc:
            errors.append(exc)

    def keep_sweeping() -> None:
        try:
            while not stop.is_set():
                sweeper.purge_expired(now[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=keep_sending), threading.Thread(target=keep_sweeping)]
    for thread in threads:
        thread.start()
    for _ in range(8):  # the three old epochs leave the window one by one
        stop.wait(0.15)
        now[0] += epoch_ms // 2
    stop.wait(0.15)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    sweeper.purge_expired(now[0])
    queued = sender.pending("bob", 1, after_seq=0, limit=100_000, now=now[0])
    assert [q.envelope.payload for q in queued] == sent and len(sent) > 10
    notice = sender.expiry_notice("bob", 1)
    assert notice is not None and notice.count == 3
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert not old_partitions & _partitions(conn)
    sender.close()
    sweeper.close()


@pytest.fixture
def latin1_dsn(postgres_cluster: ThrowawayCluster) -> Iterator[str]:
    """A database created in LATIN1, as `createdb -E LATIN1` or an old cluster's default."""
    postgres_cluster.sql(
        "CREATE DATABASE latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )
    yield postgres_cluster.dsn("latin1")
    postgres_cluster.drop_database("latin1")


async def test_a_database_not_in_utf8_is_refused_before_anything_is_stored(
    latin1_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In LATIN1 a user id such as "日本" cannot be stored (every request naming it failed
    with INTERNAL_ERROR), and "COLLATE \"C\"" sorts LATIN1 bytes, not the UTF-8 bytes
    relays lock users in, so two relays could deadlock. A relay, and migrate, refuse it."""
    config = relay_config(tmp_path, db=latin1_dsn)
    async with trio.open_nursery() as nursery:
        with pytest.raises(RelayStartError, match="UTF8"):
            await nursery.start(serve_relay, config)
    assert cli.main(["relay", "migrate", "--db", latin1_dsn]) != 0
    err = capsys.readouterr().err
    assert "UTF8" in err and err.count("\n") == 1 and "Traceback" not in err
    with psycopg.connect(latin1_dsn, autocommit=True) as conn:  # nothing was created
        assert conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,)


@pytest.fixture
def latin1_client_dsn(postgres_cluster: ThrowawayCluster) -> Iterator[str]:
    """A UTF8 database whose sessions default to the client encoding LATIN1, as after
    ALTER DATABASE ... SET client_encoding (PGCLIENTENCODING on the relay's host does
    the same)."""
    postgres_cluster.sql(
        "CREATE DATABASE latin1_client ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0"
    )
    postgres_cluster.sql("ALTER DATABASE latin1_client SET client_encoding = 'LATIN1'")
    yield postgres_cluster.dsn("latin1_client")
    postgres_cluster.drop_database("latin1_client")


async def test_a_utf8_database_whose_client_encoding_defaults_otherwise_still_holds_any_user_id(
    latin1_client_dsn: str, tmp_path: Path
) -> None:
    """The database is in UTF8, so the relay starts; its connections must speak UTF8 too,
    or a user id such as "日本" cannot be sent to it (INTERNAL_ERROR, as in a LATIN1
    database)."""
    alice, bob = make_user("日本"), make_user("bob")
    async with running_relay(relay_config(tmp_path, db=latin1_client_dsn)) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"hello")])
        async with connected(port, bob.devices[1]) as receiver:
            got = await envelopes_until_empty(receiver, acknowledge=True)
            assert [(e.sender_user, e.payload) for e in got] == [("日本", b"hello")]


async def test_a_database_away_is_logged_once_a_minute_on_one_line(
    postgres_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listener retries every POSTGRES_RECONNECT_INTERVAL while the server is away:
    one warning, on one line (psycopg's reasons span several), not one per retry."""
    refusals = [0]
    real_connect = postgres_storage.connect

    def connect(dsn: str) -> Any:
        # The listener's only: the test's database pool connects from a thread too.
        listener = threading.current_thread().name == "hushchat-relay-listen"
        if listener and 0 < refusals[0] < 6:
            refusals[0] += 1
            raise psycopg.OperationalError(
                "connection failed: No such file or directory\n\tIs the server running locally?"
            )
        return real_connect(dsn)

    monkeypatch.setattr(postgres_storage, "connect", connect)
    monkeypatch.setattr(postgres_storage, "POSTGRES_RECONNECT_INTERVAL", 0.01)
    resynced = trio.Event()
    events = ClusterEvents(lambda devices: None, lambda *superseded: None, resynced.set)
    storage = await PostgresStorage.open(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    try:
        async with trio.open_nursery() as nursery:
            with caplog.at_level(logging.WARNING, logger="hushchat.relay"):
                await nursery.start(storage.listen, events)
                refusals[0] = 1  # from the next connection on: refused five times
                with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query LIKE 'LISTEN hushchat_relay_%'"
                    )
                with trio.fail_after(10):
                    await resynced.wait()
            nursery.cancel_scope.cancel()
    finally:
        await storage.aclose()
    assert refusals[0] == 6
    away = [r.getMessage() for r in caplog.records if "notifications" in r.getMessage()]
    assert len(away) == 1 and "\n" not in away[0], away
