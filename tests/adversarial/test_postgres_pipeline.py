"""Attacks on the PostgreSQL writer's pipelined batches (PreparedStatements, optimistic
batches): errors, lost connections and races met while statements are still out."""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

import psycopg
import pytest

from hushchat.transport.relay.storage.postgres import (
    _PLACEHOLDER,
    LOCK_DEVICES,
    LOCK_USERS_EXCLUSIVE,
    LOCK_USERS_SHARED,
    PostgresConnection,
    PostgresDatabase,
)
from hushchat.transport.relay.storage.writer import DatabaseCall
from hushchat.transport.wire.errors import PreKeyIdInUse
from tests.support.postgres import waiting_for_a_lock
from tests.support.storage import batch, device_list, register_devices


def _send(db: PostgresDatabase, text: bytes, device: tuple[str, int] = ("bob", 1)) -> DatabaseCall:
    return DatabaseCall(partial(db._enqueue, batch([device], (text,), counters={device[0]: 0}), 10))


def _queued(db: PostgresDatabase, device: tuple[str, int] = ("bob", 1)) -> list[bytes]:
    return [q.envelope.payload for q in db.pending(*device, after_seq=0, limit=100, now=0)]


def test_a_pipelined_write_error_then_a_later_call_s_own_failure(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A write fails while out in the pipeline; the next call fails on its own (no
    database error, no write) before any read could bring the first error back; a third
    call stores. Each failed call gets its own error, nothing of either is stored, and the
    third call's send is."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "alice", 1, key_base=0xA0)
    register_devices(db, "bob", 1)

    def conflicting_write() -> None:
        db._conn.send(
            "INSERT INTO meta (name, value) VALUES (%(name)b, %(value)b)",
            {"name": "epoch", "value": b"\x00"},
        )

    def refuse() -> None:
        raise PreKeyIdInUse("refused before any write")

    calls = [DatabaseCall(conflicting_write), DatabaseCall(refuse), _send(db, b"stored")]
    db.run_batch(calls)
    assert isinstance(calls[0].error, psycopg.errors.UniqueViolation)
    assert isinstance(calls[1].error, PreKeyIdInUse)
    assert calls[2].error is None
    assert _queued(db) == [b"stored"]
    db.close()


def test_a_batch_whose_every_call_fails_before_writing_stores_nothing(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Every call refused (a send whose counter is stale, a refusal): the pipelined BEGIN
    and locks commit empty, each call has its own error, and the next batch runs."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "alice", 1, key_base=0xA0)
    register_devices(db, "bob", 1)
    stale = DatabaseCall(
        partial(db._enqueue, batch([("bob", 1)], (b"stale",), counters={"bob": 7}), 10)
    )

    def refuse() -> None:
        raise PreKeyIdInUse("refused")

    calls = [stale, DatabaseCall(refuse), DatabaseCall(refuse)]
    db.run_batch(calls)
    assert all(call.error is not None for call in calls)
    assert db.careful_batches == 0
    assert _queued(db) == []
    after = _send(db, b"after")
    db.run_batch([after])
    assert after.error is None and _queued(db) == [b"after"]
    db.close()


def _terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            time.sleep(0.01)


@pytest.mark.parametrize("then_read", [False, True])
def test_a_connection_cut_while_writes_are_out_fails_the_batch_then_reconnects(
    postgres_dsn: str, tmp_path: Path, then_read: bool
) -> None:
    """The writer's backend is terminated in the middle of an optimistic batch, after a
    send's rows went out in the pipeline (and, with ``then_read``, another call reads
    after): no call of that batch is told it committed, nothing of it is stored, and the
    next batch reconnects and stores."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "alice", 1, key_base=0xA0)
    register_devices(db, "bob", 1)
    db.run_batch([_send(db, b"before")])

    def cut() -> None:
        _terminate(postgres_dsn, db._conn.raw.info.backend_pid)

    calls = [_send(db, b"lost 1"), DatabaseCall(cut)]
    if then_read:
        calls.append(_send(db, b"lost 2"))
    db.run_batch(calls)
    assert all(call.error is not None for call in calls), [c.error for c in calls]
    for _ in range(2):
        after = _send(db, b"after")
        db.run_batch([after])
        if after.error is None:
            break
    assert after.error is None, after.error
    assert _queued(db) == [b"before", b"after"]
    db.close()


def test_a_connection_cut_between_batches_fails_at_most_one_batch(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Cut while idle: the next pipelined batch (its BEGIN not yet sent) fails, the one
    after reconnects; an acknowledgement's count (Later) is right after it."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "alice", 1, key_base=0xA0)
    register_devices(db, "bob", 1)
    first = _send(db, b"one")
    db.run_batch([first])
    _terminate(postgres_dsn, db._conn.raw.info.backend_pid)
    outcomes = []
    for text in (b"two", b"three"):
        call = _send(db, text)
        db.run_batch([call])
        outcomes.append(call.error is None)
    assert outcomes[1]
    seqs = [q.seq for q in db.pending("bob", 1, after_seq=0, limit=100, now=0)]
    ack = DatabaseCall(partial(db._acknowledge, "bob", 1, seqs))
    db.run_batch([ack])
    assert ack.error is None and ack.result == len(seqs) == 1 + sum(outcomes)
    db.close()


@pytest.mark.parametrize("statement", [LOCK_USERS_SHARED, LOCK_USERS_EXCLUSIVE, LOCK_DEVICES])
def test_the_lock_statements_lock_rows_in_key_order(postgres_dsn: str, statement: str) -> None:
    """In the generic plan the writer runs, LockRows is the top node and its input a Sort
    by the user id's bytes (COLLATE "C", Python's order) first: rows are locked as
    sorted, in the order of the batch's runs of user locks whatever the collation."""
    names = list(dict.fromkeys(_PLACEHOLDER.findall(statement)))
    numbered = _PLACEHOLDER.sub(lambda m: f"${names.index(m.group(1)) + 1}", statement)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE probe AS {numbered}".encode())
        args = ", ".join("NULL" for _ in names)
        plan = [row[0] for row in conn.execute(f"EXPLAIN EXECUTE probe({args})".encode())]
    assert plan[0].lstrip().startswith("LockRows"), plan
    assert plan[1].strip().lstrip("-> ").strip().startswith("Sort"), plan
    key = plan[2].strip()
    assert key.startswith("Sort Key:") and 'user_id COLLATE "C"' in key, plan


def test_two_relays_racing_sends_to_the_same_devices_never_deadlock_or_lose(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """Two relays send batches of sends to the same devices of several users, each batch
    in its own (opposite) order, many times at once: no deadlock is met (the prelock takes
    the rows in one order), every envelope is stored once, and each device's mailbox is in
    commit order (seqs increasing)."""
    keys = str(tmp_path / "relay.keys")
    first = PostgresDatabase(postgres_dsn, key_file=keys)
    second = PostgresDatabase(postgres_dsn, key_file=keys)
    register_devices(first, "alice", 1, key_base=0xA0)
    users = ["Bob", "bob", "carol", "b-c", "ba"]
    for n, user in enumerate(users):
        register_devices(first, user, 1, 2, key_base=0x10 * (n + 1))
    rounds = 30
    errors: list[BaseException] = []

    def run(db: PostgresDatabase, name: str, order: list[str]) -> None:
        for r in range(rounds):
            calls = [
                DatabaseCall(
                    partial(
                        db._enqueue,
                        batch([(u, 1), (u, 2)], (f"{name} {r} {u}".encode(),), counters={u: 0}),
                        1000,
                    )
                )
                for u in order
            ]
            db.run_batch(calls)
            errors.extend(call.error for call in calls if call.error is not None)

    threads = [
        threading.Thread(target=run, args=(first, "first", users)),
        threading.Thread(target=run, args=(second, "second", users[::-1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert first.batch_retries == second.batch_retries == 0
    for user in users:
        for device in (1, 2):
            queued = first.pending(user, device, after_seq=0, limit=1000, now=0)
            payloads = [q.envelope.payload for q in queued]
            assert len(payloads) == len(set(payloads)) == 2 * rounds
            assert [q.seq for q in queued] == sorted(q.seq for q in queued)
    first.close()
    second.close()


def test_the_user_lock_order_is_one_whatever_the_database_s_collation(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """An operator's database sorts text by a language's rules (en-US, not byte order: "a"
    before "B"), where Python sorts "B" first. One relay's batch changes the lists of "B"
    and "a" (both users' rows locked exclusively, in one statement); another's changes
    "B"'s list and sends to "a" (rows locked in two statements, one per mode). Both must
    lock in one order; if the statements sort by the collation and the runs by Python's
    order, the first holds "a" and waits for "B" while the second holds "B" and waits for
    "a": a deadlock, which PostgreSQL breaks by aborting one (batch_retries)."""
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        if (
            admin.execute("SELECT 1 FROM pg_collation WHERE collname = 'en-US-x-icu'").fetchone()
            is None
        ):
            pytest.skip("PostgreSQL built without ICU")
        for table in ("users", "devices"):
            admin.execute(
                f'ALTER TABLE {table} ALTER COLUMN user_id TYPE text COLLATE "en-US-x-icu"'.encode()
            )
    keys = str(tmp_path / "relay.keys")
    first = PostgresDatabase(postgres_dsn, key_file=keys)
    second = PostgresDatabase(postgres_dsn, key_file=keys)
    register_devices(first, "alice", 1, key_base=0xA0)
    register_devices(first, "B", 1, key_base=0x10)
    register_devices(first, "a", 1, key_base=0x20)
    both = [
        DatabaseCall(partial(first._store_device_list, device_list(user, 1, key), 0, None, 0))
        for user, key in (("B", (1, bytes([0x11]) * 32)), ("a", (1, bytes([0x21]) * 32)))
    ]
    other = [
        DatabaseCall(
            partial(
                second._store_device_list,
                device_list("B", 1, (1, bytes([0x11]) * 32)),
                0,
                None,
                0,
            )
        ),
        DatabaseCall(partial(second._enqueue, batch([("a", 1)], (b"hi",), counters={"a": 0}), 10)),
    ]
    pids = {first._conn.raw.info.backend_pid, second._conn.raw.info.backend_pid}
    with psycopg.connect(postgres_dsn) as holder:  # holds "a" until both batches wait
        holder.execute("SELECT 1 FROM users WHERE user_id = 'a' FOR UPDATE")
        threads = [
            threading.Thread(target=first.run_batch, args=(both,)),
            threading.Thread(target=second.run_batch, args=(other,)),
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while waiting_for_a_lock(postgres_dsn, pids) != pids and time.monotonic() < deadline:
            time.sleep(0.02)
        holder.rollback()
    for thread in threads:
        thread.join()
    assert first.batch_retries == second.batch_retries == 0
    assert [call.error for call in both] == [None, None]
    first.close()
    second.close()


@pytest.mark.parametrize("pipelined", [False, True])
def test_the_interpreter_lock_is_free_while_the_writer_waits_for_the_server(
    postgres_dsn: str, pipelined: bool
) -> None:
    """A prepared statement waits a second on the server (run at once, or sent in a
    pipeline and read back by the next run): meanwhile another thread runs Python."""
    conn = PostgresConnection(postgres_dsn)
    conn.prepared.pipelining = pipelined
    conn.run("SELECT %(n)b::bigint", {"n": 0})  # connected and warm
    ticks: list[float] = []
    done = threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    counter = threading.Thread(target=tick)
    counter.start()
    time.sleep(0.05)
    start = time.monotonic()
    sent = conn.send("SELECT 1::bigint FROM pg_sleep(%(seconds)b::bigint)", {"seconds": 1})
    assert conn.run("SELECT %(n)b::bigint", {"n": 2}) == [(2,)]
    assert conn.prepared.rows(sent) == [(1,)]
    end = time.monotonic()
    done.set()
    counter.join()
    conn.prepared.settle()
    conn.close()
    assert end - start >= 0.9
    assert sum(start + 0.2 < t < end - 0.2 for t in ticks) > 100
