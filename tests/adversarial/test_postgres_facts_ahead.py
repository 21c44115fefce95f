"""Attacks on the facts a PostgreSQL batch reads ahead for its sends (_FactsAhead): the
batch's other calls change what a send is checked against after the facts were read,
and each send must still be checked against what its own read would have found."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from hushchat.transport.relay.storage.interface import (
    EnvelopeBatch,
    ExpiryNotice,
    MailboxPosition,
    StorageConflict,
    StoredDeviceList,
)
from hushchat.transport.relay.storage.postgres import PostgresDatabase
from hushchat.transport.relay.storage.writer import DatabaseCall
from hushchat.transport.wire.errors import MailboxFull
from tests.support.postgres import DatabasePool, waiting_for_a_lock
from tests.support.storage import batch, device_list, register_devices, upload_prekeys

MAX_MAILBOX = 3


@pytest.fixture
def db(postgres_dsn: str, tmp_path: Path) -> Iterator[PostgresDatabase]:
    database = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(database, "alice", 1, key_base=0xA0)
    register_devices(database, "bob", 1, 2)
    yield database
    database.close()


def _send(
    db: PostgresDatabase, text: bytes, devices: list[tuple[str, int]], counter: int = 0
) -> DatabaseCall:
    send = batch(devices, (text,), counters={user: counter for user, _ in devices})
    return DatabaseCall(partial(db._enqueue, send, MAX_MAILBOX))


def _ack(
    db: PostgresDatabase, seqs: list[int], device: tuple[str, int] = ("bob", 1)
) -> DatabaseCall:
    return DatabaseCall(partial(db._acknowledge, *device, seqs))


def _positions(call: DatabaseCall) -> list[MailboxPosition | None]:
    """A send's result: where each delivery was filed (None: its mailbox was full)."""
    assert call.error is None and isinstance(call.result, list), call.error
    return call.result


def _filed(call: DatabaseCall) -> list[MailboxPosition]:
    """A send's result, every delivery of which was filed."""
    positions = _positions(call)
    filed = [position for position in positions if position is not None]
    assert len(filed) == len(positions), positions
    return filed


def _queued(db: PostgresDatabase, device: tuple[str, int] = ("bob", 1)) -> list[bytes]:
    return [q.envelope.payload for q in db.pending(*device, after_seq=0, limit=100, now=0)]


def _counts(db: PostgresDatabase) -> list[int]:
    """The mailbox rows' counts of queued envelopes, smallest first."""
    rows = db._conn.execute("SELECT queued FROM mailboxes ORDER BY queued").fetchall()
    return [int(queued) for (queued,) in rows]


def _run(db: PostgresDatabase, calls: list[DatabaseCall]) -> None:
    db.run_batch(calls)
    assert db.careful_batches == 0  # each batch ran pipelined, with facts read ahead


def test_an_acknowledgement_that_empties_a_mailbox_then_a_send_to_it(db: PostgresDatabase) -> None:
    """The acknowledgement deletes the mailbox's row after the facts said it exists: the
    send after it in the batch must leave a row counting its envelope (not add one to a
    row that is gone), or the mailbox bound would no longer count it."""
    db.enqueue(batch([("bob", 1)], (b"first",), counters={"bob": 0}), max_mailbox_size=3)
    _acknowledge_first_then_send_second(db)


def _acknowledge_first_then_send_second(db: PostgresDatabase) -> None:
    """Bob's only envelope, b"first", acknowledged, then b"second" sent to him, in one
    batch: both succeed, and his mailbox holds b"second" alone, counted once."""
    [first] = db.pending("bob", 1, after_seq=0, limit=10, now=0)
    calls = [_ack(db, [first.seq]), _send(db, b"second", [("bob", 1)])]
    _run(db, calls)
    assert [call.error for call in calls] == [None, None]
    assert calls[0].result == 1
    assert _queued(db) == [b"second"]
    assert _counts(db) == [1]


def test_an_acknowledgement_that_leaves_a_mailbox_its_row_then_a_send_to_it(
    db: PostgresDatabase,
) -> None:
    """The facts cannot tell whether the acknowledgement deleted the mailbox's row: the
    send stores it as new, and must count one more in the row it still finds."""
    [first] = db.enqueue(batch([("bob", 1)], (b"first",), counters={"bob": 0}), max_mailbox_size=3)
    db.enqueue(batch([("bob", 1)], (b"second",), counters={"bob": 0}), max_mailbox_size=3)
    assert first is not None
    calls = [_ack(db, [first.seq]), _send(db, b"third", [("bob", 1)])]
    _run(db, calls)
    assert [call.error for call in calls] == [None, None]
    assert _queued(db) == [b"second", b"third"]
    assert _counts(db) == [2]


def test_an_acknowledgement_that_frees_nothing_does_not_make_room(db: PostgresDatabase) -> None:
    """A full mailbox, and an acknowledgement of a seq it does not hold earlier in the
    batch: the facts read ahead cannot tell how much the acknowledgement freed, and the
    send must still be refused, not stored beyond the bound."""
    for text in (b"1", b"2", b"3"):
        db.enqueue(batch([("bob", 1)], (text,), counters={"bob": 0}), max_mailbox_size=3)
    calls = [_ack(db, [10**9]), _send(db, b"over", [("bob", 1)])]
    _run(db, calls)
    assert calls[0].error is None
    assert isinstance(calls[1].error, MailboxFull)
    assert _queued(db) == [b"1", b"2", b"3"]
    assert _counts(db) == [3]


def test_an_acknowledgement_that_frees_room_lets_the_send_in(db: PostgresDatabase) -> None:
    """As a send read on its own would find: the acknowledgement before it made room."""
    positions = [
        db.enqueue(batch([("bob", 1)], (text,), counters={"bob": 0}), max_mailbox_size=3)[0]
        for text in (b"1", b"2", b"3")
    ]
    assert positions[0] is not None
    calls = [_ack(db, [positions[0].seq]), _send(db, b"4", [("bob", 1)])]
    _run(db, calls)
    assert [call.error for call in calls] == [None, None]
    assert _queued(db) == [b"2", b"3", b"4"]
    assert _counts(db) == [3]


def test_a_device_list_change_between_two_sends(db: PostgresDatabase) -> None:
    """Bob drops device 2 between two sends of one batch: the second send, still naming
    the old list, must be refused as a send read on its own would be, and nothing may
    reach the removed device."""
    new_list = device_list("bob", 1, (1, bytes([1]) * 32))
    calls = [
        _send(db, b"before", [("bob", 1), ("bob", 2)]),
        DatabaseCall(partial(db._store_device_list, new_list, 0, None, 0)),
        _send(db, b"stale", [("bob", 1), ("bob", 2)]),
        _send(db, b"after", [("bob", 1)], counter=1),
    ]
    _run(db, calls)
    assert calls[0].error is None and calls[1].error is None
    assert isinstance(calls[2].error, StorageConflict)
    assert calls[3].error is None
    assert db.sends_read_ahead == 1  # the first; the list stored, the others read their own
    assert _queued(db) == [b"before", b"after"]
    assert _queued(db, ("bob", 2)) == []


def test_sends_to_one_device_in_one_batch_keep_their_order(db: PostgresDatabase) -> None:
    """Each send's seqs come after the previous send's, and each names the one before it
    as the mailbox's newest (what a relay of a cluster pushes against)."""
    calls = [_send(db, bytes([i]), [("bob", 1), ("bob", 2)]) for i in range(3)]
    _run(db, calls)
    assert db.sends_read_ahead == 3
    assert all(call.error is None for call in calls)
    firsts = [_filed(call)[0] for call in calls]
    assert [p.seq for p in firsts] == sorted(p.seq for p in firsts)
    assert [p.previous for p in firsts] == [0, firsts[0].seq, firsts[1].seq]
    assert _queued(db) == [b"\x00", b"\x01", b"\x02"]
    assert _counts(db) == [3, 3]


def test_a_batch_whose_epoch_moved_meanwhile(
    postgres_dsn: str, tmp_path: Path, db: PostgresDatabase
) -> None:
    """Another relay moved the epoch on since this relay last saw it: the facts read
    ahead in the old epoch's partitions are dropped, and the sends are filed in the new
    epoch, where its mailboxes are."""
    now = [db._clock()]
    other = PostgresDatabase(
        postgres_dsn, key_file=str(tmp_path / "relay.keys"), clock=lambda: now[0]
    )
    epoch_before = db._epoch_seen
    now[0] += 2 * db._chain.epoch_ms
    moved = _send(other, b"moved", [("bob", 1)])
    other.run_batch([moved])
    assert other._epoch_seen > epoch_before
    calls = [_send(db, b"a", [("bob", 1)]), _send(db, b"b", [("bob", 1)])]
    db.run_batch(calls)
    assert [call.error for call in calls] == [None, None]
    positions = [_filed(call)[0] for call in (moved, *calls)]
    assert {p.epoch for p in positions} == {other._epoch_seen}
    # Each names the one before it as the mailbox's newest: a relay holding bob pushes
    # "a" only to a connection that has "moved".
    assert [p.previous for p in positions[1:]] == [p.seq for p in positions[:2]]
    assert _queued(db) == [b"moved", b"a", b"b"]
    other.close()


def _two_databases(pool: DatabasePool, tmp_path: Path) -> list[PostgresDatabase]:
    """Two new databases ("ahead" and "one by one"), each with alice/1, bob/1 and 2, and
    carol/1."""
    pair = []
    for name in ("ahead", "one_by_one"):
        database = PostgresDatabase(pool.take(), key_file=str(tmp_path / name))
        register_devices(database, "alice", 1, key_base=0xA0)
        register_devices(database, "bob", 1, 2)
        register_devices(database, "carol", 1, key_base=0xC0)
        pair.append(database)
    return pair


def test_random_batches_agree_with_sends_read_one_by_one(
    postgres_databases: DatabasePool, tmp_path: Path
) -> None:
    """Batches of sends, acknowledgements and list changes, run pipelined (facts read
    ahead) on one database and one call per batch (each send reads its own) on another:
    every call has the same outcome, every mailbox the same envelopes and count."""
    rng = random.Random(20)
    pair = _two_databases(postgres_databases, tmp_path)
    ahead, alone = pair
    devices = [("bob", 1), ("bob", 2), ("carol", 1)]
    counters = {"bob": 0, "carol": 0}
    texts = iter(range(10**6))
    for _ in range(40):
        # Each call of the batch, as made for either database.
        plan: list[Callable[[PostgresDatabase], DatabaseCall]] = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            if roll < 0.55:
                to = rng.sample(devices, rng.randint(1, 3))
                seen = {user: counters[user] for user, _ in to}
                if rng.random() < 0.2:  # a sender behind on carol's list
                    seen = {user: c - (user == "carol") for user, c in seen.items()}
                send = batch(to, (str(next(texts)).encode(),), counters=seen)
                plan.append(partial(_send_call, send))
            elif roll < 0.9:
                device = rng.choice(devices)
                queued = [q.seq for q in alone.pending(*device, after_seq=0, limit=100, now=0)]
                seqs = rng.sample(queued, min(len(queued), 2))
                plan.append(partial(_ack_call, alone, device, seqs))
            else:
                counters["carol"] += 1
                new = device_list("carol", counters["carol"], (1, bytes([0xC1]) * 32))
                plan.append(partial(_list_call, new))
        outcomes = []
        for database in pair:
            calls = [make(database) for make in plan]
            if database is ahead:
                database.run_batch(calls)
            else:
                for call in calls:
                    database.run_batch([call])
            outcomes.append([_outcome(call) for call in calls])
        assert outcomes[0] == outcomes[1]
        for device in devices:
            assert _queued(ahead, device) == _queued(alone, device)
        assert _counts(ahead) == _counts(alone)
    assert ahead.careful_batches == 0
    assert ahead.sends_read_ahead > 20
    for database in pair:
        database.close()


def _send_call(send: EnvelopeBatch, database: PostgresDatabase) -> DatabaseCall:
    return DatabaseCall(partial(database._enqueue, send, MAX_MAILBOX))


def _ack_call(
    source: PostgresDatabase,
    device: tuple[str, int],
    seqs: list[int],
    database: PostgresDatabase,
) -> DatabaseCall:
    """An acknowledgement of the envelopes at ``seqs`` in ``source``."""
    return DatabaseCall(
        partial(database._acknowledge, *device, _translate(source, database, device, seqs))
    )


def _list_call(new: StoredDeviceList, database: PostgresDatabase) -> DatabaseCall:
    return DatabaseCall(partial(database._store_device_list, new, new.counter - 1, None, 0))


def _translate(
    source: PostgresDatabase, target: PostgresDatabase, device: tuple[str, int], seqs: list[int]
) -> list[int]:
    """The seqs in ``target`` of the envelopes at ``seqs`` in ``source`` (by payload)."""
    if source is target:
        return seqs
    by_payload = {
        q.envelope.payload: q.seq for q in target.pending(*device, after_seq=0, limit=100, now=0)
    }
    wanted = {
        q.seq: q.envelope.payload for q in source.pending(*device, after_seq=0, limit=100, now=0)
    }
    return [by_payload[wanted[seq]] for seq in seqs]


def _outcome(call: DatabaseCall) -> object:
    if call.error is not None:
        return type(call.error).__name__
    result = call.result
    if isinstance(result, list):  # a send's positions: which deliveries were stored
        return [position is not None for position in result]
    return result


def test_facts_read_ahead_wait_for_another_relay_s_batch_holding_the_devices(
    postgres_dsn: str, tmp_path: Path, db: PostgresDatabase
) -> None:
    """Another relay's batch fills bob's device 1 and files into device 2 while this
    relay's batch waits for their locks: the facts read ahead must be read behind those
    locks, after the other batch committed. Read before them, the send to device 1 would
    be stored beyond the bound and the one to device 2 would name a newest seq that
    misses the other relay's envelope (its relay would push it to a connection that has
    not read that envelope)."""
    other = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    for text in (b"1", b"2"):
        db.enqueue(batch([("bob", 1)], (text,), counters={"bob": 0}), max_mailbox_size=3)
    read_ahead = db.sends_read_ahead
    theirs = [_send(other, b"theirs", [("bob", 1), ("bob", 2)])]
    ours = [_send(db, b"over", [("bob", 1)]), _send(db, b"after", [("bob", 2)])]
    _run_behind(postgres_dsn, other, theirs, db, ours)
    assert theirs[0].error is None
    assert isinstance(ours[0].error, MailboxFull)
    assert ours[1].error is None
    assert db.sends_read_ahead == read_ahead + 2 and db.careful_batches == 0
    _, theirs_to_2 = _positions(theirs[0])
    [after] = _positions(ours[1])
    assert theirs_to_2 is not None and after is not None
    assert after.seq > theirs_to_2.seq
    assert after.previous == theirs_to_2.seq
    assert _queued(db) == [b"1", b"2", b"theirs"]
    assert _queued(db, ("bob", 2)) == [b"theirs", b"after"]
    assert _counts(db) == [2, 3]
    other.close()


def _run_behind(
    dsn: str,
    other: PostgresDatabase,
    theirs: list[DatabaseCall],
    db: PostgresDatabase,
    ours: list[DatabaseCall],
    *,
    exclusive: bool = False,
) -> None:
    """Run ``theirs`` on the other relay's database (``exclusive``: as one transaction
    holding the epoch lock, as an epoch's move does), holding its transaction open until
    ``ours`` (a batch of this relay's) waits for a lock it holds; then let both finish."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        assert release.wait(10)

    held = [*theirs, DatabaseCall(hold)]
    run = partial(other._run, held, exclusive=True) if exclusive else partial(other.run_batch, held)
    threads = [threading.Thread(target=run)]
    threads[0].start()
    assert holding.wait(10)
    threads.append(threading.Thread(target=db.run_batch, args=(ours,)))
    threads[1].start()
    pid = db._conn.raw.info.backend_pid
    deadline = time.monotonic() + 10
    while not (waiting := bool(waiting_for_a_lock(dsn, {pid}))) and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    for thread in threads:
        thread.join()
    assert waiting  # ours did wait behind theirs


def test_a_send_after_an_acknowledgement_keeps_the_mailbox_s_expiry_notice(
    db: PostgresDatabase,
) -> None:
    """Bob's mailbox also holds a notice of mail that expired unread: the acknowledgement
    of its one envelope lowers the row to none queued but keeps it (the notice is still to
    be told). The send after it, told the row may be gone, stores it as new and meets it:
    it must count one more in it and leave its notice, not replace the row with a fresh
    one that forgets the expired mail."""
    notice = ExpiryNotice(2, 100, 200)
    db.enqueue(batch([("bob", 1)], (b"first",), counters={"bob": 0}), max_mailbox_size=3)
    db.run_batch([DatabaseCall(partial(db._note, "bob", 1, 0, notice, 0))])
    assert db.expiry_notice("bob", 1) == notice
    _acknowledge_first_then_send_second(db)
    assert db.expiry_notice("bob", 1) == notice


def test_a_send_naming_a_device_twice_is_refused_and_the_batch_goes_on(
    db: PostgresDatabase,
) -> None:
    """The relay's frames never name a device twice; the storage refuses such a send
    anyway (its two deliveries would count one in the mailbox, or store its row twice).
    The facts read ahead list each device once, and the send after it is checked against
    them as if the refused one had never been."""
    db.enqueue(batch([("bob", 1)], (b"first",), counters={"bob": 0}), max_mailbox_size=3)
    calls = [
        _send(db, b"twice", [("bob", 1), ("bob", 1)]),
        _send(db, b"twice, new box", [("bob", 2), ("bob", 2)]),
        _send(db, b"second", [("bob", 1), ("bob", 2)]),
    ]
    _run(db, calls)
    assert isinstance(calls[0].error, StorageConflict)
    assert isinstance(calls[1].error, StorageConflict)
    assert calls[2].error is None
    assert _queued(db) == [b"first", b"second"]
    assert _queued(db, ("bob", 2)) == [b"second"]
    assert _counts(db) == [1, 2]


def test_sends_filling_a_mailbox_in_one_batch_meet_its_bound(db: PostgresDatabase) -> None:
    """Bob's device 1 has room for one more: the first send of the batch takes it, the
    second stores only to device 2 (the facts read ahead must count what the first
    filed, and only what it filed), an all-or-nothing send is refused whole, and the
    last send to device 2 names the second's envelope as that mailbox's newest."""
    for text in (b"1", b"2"):
        db.enqueue(batch([("bob", 1)], (text,), counters={"bob": 0}), max_mailbox_size=3)
    both = [("bob", 1), ("bob", 2)]
    change = replace(batch(both, (b"change",), counters={"bob": 0}), all_or_nothing=True)
    calls = [
        _send(db, b"fills", both),
        _send(db, b"partly", both),
        DatabaseCall(partial(db._enqueue, change, MAX_MAILBOX)),
        _send(db, b"last", [("bob", 2)]),
    ]
    _run(db, calls)
    assert [call.error is None for call in calls] == [True, True, False, True]
    assert _positions(calls[1])[0] is None
    assert isinstance(calls[2].error, MailboxFull)
    partly, last = _positions(calls[1])[1], _positions(calls[3])[0]
    assert partly is not None and last is not None
    assert last.previous == partly.seq
    assert _queued(db) == [b"1", b"2", b"fills"]
    assert _queued(db, ("bob", 2)) == [b"fills", b"partly", b"last"]
    assert _counts(db) == [3, 3]


def test_two_relays_racing_sends_and_acknowledgements_keep_each_mailbox_whole(
    postgres_dsn: str, tmp_path: Path, db: PostgresDatabase
) -> None:
    """Two relays run batches of sends and acknowledgements to the same devices at once,
    each batch reading its sends' facts ahead. Afterwards each mailbox holds exactly the
    envelopes stored and not acknowledged, no more than its bound, counted right; and
    each envelope names as its mailbox's newest at least every envelope before it that
    is still queued (what its relay pushes against)."""
    other = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "carol", 1, key_base=0xC0)
    devices = [("bob", 1), ("bob", 2), ("carol", 1)]
    stored: dict[tuple[str, int], dict[int, tuple[bytes, int]]] = {d: {} for d in devices}
    acknowledged: set[int] = set()
    failures: list[BaseException] = []
    record = threading.Lock()
    met = threading.Barrier(2, timeout=10)  # each round's batches run at once

    def run(database: PostgresDatabase, name: str, seed: int) -> None:
        rng = random.Random(seed)
        for r in range(25):
            calls: list[DatabaseCall] = []
            sends: list[tuple[int, list[tuple[str, int]], bytes]] = []
            acks: list[tuple[int, list[int]]] = []
            for n in range(rng.randint(1, 5)):
                if rng.random() < 0.7:
                    to = rng.sample(devices, rng.randint(1, 3))
                    text = f"{name} {r} {n}".encode()
                    sends.append((len(calls), to, text))
                    calls.append(_send(database, text, to))
                else:
                    device = rng.choice(devices)
                    queued = database.pending(*device, after_seq=0, limit=100, now=0)
                    seqs = [q.seq for q in rng.sample(queued, min(len(queued), 2))]
                    acks.append((len(calls), seqs))
                    calls.append(_ack(database, seqs, device))
            met.wait()
            database.run_batch(calls)
            with record:
                failures.extend(
                    call.error
                    for call in calls
                    if call.error is not None and not isinstance(call.error, MailboxFull)
                )
                for index, to, text in sends:
                    filed = _positions(calls[index]) if calls[index].error is None else []
                    for device, position in zip(to, filed, strict=False):
                        if position is not None:
                            assert position.previous is not None
                            stored[device][position.seq] = (text, position.previous)
                for index, seqs in acks:
                    if calls[index].error is None:
                        acknowledged.update(seqs)

    threads = [
        threading.Thread(target=run, args=(db, "first", 1)),
        threading.Thread(target=run, args=(other, "second", 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert db.careful_batches == other.careful_batches == 0
    assert db.sends_read_ahead > 20 and other.sends_read_ahead > 20
    keys = db._chain.keys(db._epoch_seen)
    assert keys is not None
    for device in devices:
        queued = db.pending(*device, after_seq=0, limit=100, now=0)
        mine = stored[device]
        assert [q.seq for q in queued] == sorted(s for s in mine if s not in acknowledged)
        assert [q.envelope.payload for q in queued] == [mine[q.seq][0] for q in queued]
        assert len(queued) <= MAX_MAILBOX
        row = db._conn.execute(
            "SELECT queued FROM mailboxes WHERE mailbox = ?", (keys.index(*device),)
        ).fetchone()
        assert (0 if row is None else int(row[0])) == len(queued)
        for seq, (_, previous) in mine.items():
            before = [q.seq for q in queued if q.seq < seq]
            assert previous < seq
            assert not before or previous >= before[-1]
    other.close()


def test_random_batches_of_every_kind_of_call_agree_with_calls_run_one_by_one(
    postgres_databases: DatabasePool, tmp_path: Path
) -> None:
    """As the random batches above, with the other calls a relay's batch holds between its
    sends: sends naming no device or a device twice, all-or-nothing sends, an
    acknowledgement of a seq no mailbox holds, expiry notices added and cleared,
    connections attached and detached (devices held by another relay too), prekeys taken.
    Each call's outcome, each mailbox's envelopes, count and notice, and the relays each
    batch wakes must be what the calls run one per batch give."""
    rng = random.Random(7)
    pair = _two_databases(postgres_databases, tmp_path)
    for database in pair:
        upload_prekeys(database, "bob", 2, one_time=100, kem=0)
        database._conn.execute(
            "INSERT INTO presence VALUES ('bob', 2, 'other', ?), ('carol', 1, 'other', ?)",
            (b"o" * 8, b"p" * 8),
        )
    ahead, alone = pair
    devices = [("bob", 1), ("bob", 2), ("carol", 1)]
    texts = iter(range(10**6))
    for _ in range(40):
        plan: list[Callable[[PostgresDatabase], DatabaseCall]] = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            device = rng.choice(devices)
            if roll < 0.5:
                to = rng.sample(devices, rng.randint(0, 3))
                if to and rng.random() < 0.1:
                    to.append(to[0])
                send = batch(to, (str(next(texts)).encode(),), counters={"bob": 0, "carol": 0})
                send = replace(send, all_or_nothing=rng.random() < 0.2)
                plan.append(partial(_send_call, send))
            elif roll < 0.7:
                queued = [q.seq for q in alone.pending(*device, after_seq=0, limit=100, now=0)]
                seqs = rng.sample(queued, min(len(queued), 2))
                if seqs:
                    plan.append(partial(_ack_call, alone, device, seqs))
                else:  # a seq no mailbox holds
                    plan.append(_later(PostgresDatabase._acknowledge, *device, [10**12]))
            elif roll < 0.8:
                notice = ExpiryNotice(1, 10, 20)
                plan.append(_later(PostgresDatabase._note, *device, 0, notice, 0))
            elif roll < 0.85:
                told = alone.expiry_notice(*device)
                if told is not None:
                    plan.append(_later(PostgresDatabase._clear_expiry_notice, *device, told))
            elif roll < 0.95:
                verb = rng.choice([PostgresDatabase._attach, PostgresDatabase._detach])
                plan.append(_later(verb, *device, b"c" * 8))
            else:
                plan.append(lambda d: _call(d._take_bundle, "bob", 2, None, 0))
        outcomes, wakes = [], []
        for database in pair:
            calls = [make(database) for make in plan]
            woken: dict[str, set[tuple[str, int]]] = {}
            if database is ahead:
                database.run_batch(calls)
                woken = database._wakes
            else:
                for call in calls:
                    database.run_batch([call])
                    for relay, named in database._wakes.items():
                        woken.setdefault(relay, set()).update(named)
            outcomes.append([_outcome(call) for call in calls])
            wakes.append(woken)
        assert outcomes[0] == outcomes[1]
        assert wakes[0] == wakes[1]
        for device in devices:
            assert _queued(ahead, device) == _queued(alone, device)
            assert ahead.expiry_notice(*device) == alone.expiry_notice(*device)
        assert _counts(ahead) == _counts(alone)
    assert ahead.careful_batches == 0
    assert ahead.sends_read_ahead > 20
    for database in pair:
        database.close()


def _call(method: Callable[..., object], *args: object) -> DatabaseCall:
    return DatabaseCall(partial(method, *args))


def _later(
    method: Callable[..., object], *args: object
) -> Callable[[PostgresDatabase], DatabaseCall]:
    """A call of ``method`` (unbound) with ``args`` on whichever database runs the plan."""
    return lambda database: _call(partial(method, database), *args)


def test_a_send_waiting_behind_another_relay_s_attach_wakes_that_relay(
    postgres_dsn: str, tmp_path: Path, db: PostgresDatabase
) -> None:
    """Bob's device connects to another relay, whose batch holds the device's row while
    this relay's batch of sends waits for it: the presence read ahead must be read behind
    the lock, after the attach committed, so that the send wakes the other relay. Read
    before it, no relay would tell bob's new connection of the mail (it read its mailbox
    before the send committed)."""
    other = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    attach = [_call(other._attach, "bob", 1, b"c" * 8)]
    sends = [_send(db, b"a", [("bob", 1)]), _send(db, b"b", [("bob", 1), ("bob", 2)])]
    _run_behind(postgres_dsn, other, attach, db, sends)
    assert [call.error for call in attach + sends] == [None] * 3
    assert db.sends_read_ahead == 2
    assert db._wakes == {other.relay_id: {("bob", 1)}}
    other.close()


def test_a_send_waiting_behind_another_relay_s_list_change_is_checked_against_it(
    postgres_dsn: str, tmp_path: Path, db: PostgresDatabase
) -> None:
    """Another relay's batch changes bob's device list (drops device 2) and holds his row
    while this relay's batch sends to his old list: the counters read ahead must be read
    behind the users' locks, after the change committed, so the compare-and-set refuses
    the send. Read before them, device 1 would get a send made for a list that is gone."""
    other = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    new_list = device_list("bob", 1, (1, bytes([1]) * 32))
    change = [_call(other._store_device_list, new_list, 0, None, 0)]
    sends = [_send(db, b"stale", [("bob", 1), ("bob", 2)]), _send(db, b"new", [("bob", 1)], 1)]
    _run_behind(postgres_dsn, other, change, db, sends)
    assert change[0].error is None
    assert isinstance(sends[0].error, StorageConflict)
    assert sends[1].error is None
    assert db.sends_read_ahead == 2
    assert _queued(db) == [b"new"]
    other.close()


def test_facts_read_ahead_that_miss_a_mailbox_row_fail_the_batch_not_the_count(
    db: PostgresDatabase,
) -> None:
    """Facts read ahead gone wrong (here made so: the mailbox's row dropped from them
    mid-batch) must not be trusted silently: the send stores the mailbox as new, which
    fails on the row that exists, and the batch runs again reading each send's own facts
    (only a mailbox acknowledged in the batch may meet its row)."""
    db.enqueue(batch([("bob", 1)], (b"first",), counters={"bob": 0}), max_mailbox_size=3)

    def forget_the_row() -> None:
        if db._ahead is not None:  # the batch's first run (its second reads its own)
            db._ahead.queued.clear()

    calls = [DatabaseCall(forget_the_row), _send(db, b"second", [("bob", 1)])]
    db.run_batch(calls)
    assert [call.error for call in calls] == [None, None]
    assert db.careful_batches == 1
    assert _queued(db) == [b"first", b"second"]
    assert _counts(db) == [2]


def test_a_batch_waiting_for_another_relay_s_epoch_move_files_under_the_new_epoch(
    postgres_dsn: str, tmp_path: Path, db: PostgresDatabase
) -> None:
    """Another relay moves the epoch on while this relay's batch waits for the epoch lock:
    the batch must read the epoch after the lock is its, in a statement of its own (a
    statement's snapshot is taken when it starts), and file its sends under the new
    epoch, where the moved mailboxes are; facts read ahead in the old epoch's partitions
    are dropped. Read with the lock, its snapshot from before the move, the sends would
    go under the old epoch after the move, where no connection's cursor looks again."""
    now = [db._clock()]
    other = PostgresDatabase(
        postgres_dsn, key_file=str(tmp_path / "relay.keys"), clock=lambda: now[0]
    )
    now[0] += 2 * db._chain.epoch_ms
    new_epoch = other._chain.epoch_of(now[0])
    move = DatabaseCall(partial(other._current_epoch, new_epoch))
    sends = [_send(db, b"a", [("bob", 1)]), _send(db, b"b", [("bob", 1), ("bob", 2)])]
    _run_behind(postgres_dsn, other, [move], db, sends, exclusive=True)
    assert move.error is None and move.result == new_epoch
    assert [call.error for call in sends] == [None, None]
    assert {p.epoch for call in sends for p in _filed(call)} == {new_epoch}
    assert db.sends_read_ahead == 0
    assert _queued(db) == [b"a", b"b"]
    other.close()
