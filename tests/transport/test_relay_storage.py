"""The relay's SQLite storage: atomic take-once, mailboxes, retention, device-list CAS."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from hushchat.protocol.errors import DuplicateDeviceKey, UnknownStateVersion
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.transport.relay.config import wall_clock_ms
from hushchat.transport.relay.ratelimit import RateLimit
from hushchat.transport.relay.storage import schema as sqlite_storage_schema
from hushchat.transport.relay.storage import sqlite as sqlite_storage
from hushchat.transport.relay.storage.interface import (
    ExpiryNotice,
    StorageConflict,
)
from hushchat.transport.relay.storage.names import is_postgres_url
from hushchat.transport.relay.storage.postgres import PostgresDatabase
from hushchat.transport.relay.storage.sqlite import SqliteDatabase, SqliteStorage
from hushchat.transport.wire.errors import (
    DeviceListRejected,
    MailboxFull,
    PreKeyIdInUse,
    PreKeyStockFull,
    UnknownDevice,
)
from hushchat.transport.wire.limits import DEFAULT_RETENTION_SECONDS
from hushchat.transport.wire.records import EnvelopeKind, PreKeyCounts
from tests.support.relay import connected, relay_config, running_relay
from tests.support.relay import register as register_users
from tests.support.storage import (
    SIGNATURE,
    batch,
    device_list,
    register_devices,
    schema_2_database,
    upload_prekeys,
)
from tests.support.users import make_user


@pytest.fixture
def open_db(relay_db: str, tmp_path: Path) -> Iterator[Callable[[], SqliteDatabase]]:
    """Opens this test's database (on each backend in turn), as another relay process would."""
    opened: list[SqliteDatabase] = []

    def open_database() -> SqliteDatabase:
        database = (
            PostgresDatabase(relay_db, key_file=str(tmp_path / "relay.keys"))
            if is_postgres_url(relay_db)
            else SqliteDatabase(relay_db)
        )
        opened.append(database)
        return database

    yield open_database
    for database in opened:
        with suppress(Exception):  # closed by the test already
            database.close()


@pytest.fixture
def db(open_db: Callable[[], SqliteDatabase]) -> SqliteDatabase:
    database = open_db()
    register_devices(database, "alice", 1, key_base=0xA0)
    register_devices(database, "bob", 1, 2)
    return database


@pytest.fixture
def sqlite_db(tmp_path: Path) -> SqliteDatabase:
    """The ``db`` of tests about SQLite's files."""
    database = SqliteDatabase(str(tmp_path / "relay.db"))
    register_devices(database, "alice", 1, key_base=0xA0)
    register_devices(database, "bob", 1, 2)
    return database


# ------------------------------------------------------------------ device lists


def test_device_list_compare_and_set(db: SqliteDatabase) -> None:
    with pytest.raises(StorageConflict):
        db.store_device_list(device_list("bob", 5, (1, b"x" * 32)), previous_counter=None)
    with pytest.raises(StorageConflict):
        db.store_device_list(device_list("bob", 5, (1, b"x" * 32)), previous_counter=3)
    stored = db.device_lists(["bob", "nobody", "bob"])
    assert list(stored) == ["bob"]
    assert stored["bob"].counter == 0 and stored["bob"].device_ids == {1, 2}
    assert stored["bob"].device_identity(2) == b"\x02" * 32
    assert stored["bob"].device_identity(3) is None


def test_u64_counters_are_stored(db: SqliteDatabase) -> None:
    top = 2**64 - 1
    db.store_device_list(device_list("bob", top, (1, b"\x01" * 32)), previous_counter=0)
    assert db.device_lists(["bob"])["bob"].counter == top


def test_removed_and_replaced_devices_lose_mail_and_prekeys(db: SqliteDatabase) -> None:
    upload_prekeys(db, "bob", 1, one_time=2, kem=2)
    upload_prekeys(db, "bob", 2, one_time=2, kem=2)
    db.enqueue(
        batch([("bob", 1), ("bob", 2)], (b"p1", b"p2"), counters={"bob": 0}), max_mailbox_size=10
    )
    # Device 1 keeps its id but gets a new identity; device 2 leaves.
    removed = db.store_device_list(
        device_list("bob", 1, (1, b"\x09" * 32), (3, b"\x03" * 32)), previous_counter=0
    )
    assert removed == (1, 2)
    for device_id in (1, 2):
        assert db.pending("bob", device_id, after_seq=0, limit=10, now=0) == []
        assert db.prekey_counts("bob", device_id) == PreKeyCounts(0, 0)
        assert db.take_bundle("bob", device_id) is None
    assert db.device_lists(["bob"])["bob"].device_ids == {1, 3}
    # The shared payloads went with their last delivery.
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 0


# ------------------------------------------------------------------ prekeys


def test_prekey_upload_is_atomic(db: SqliteDatabase) -> None:
    upload_prekeys(db, "bob", 1, one_time=3, kem=1)
    with pytest.raises(PreKeyIdInUse):
        db.store_prekeys(
            "bob",
            1,
            signed_prekey=SignedPreKeyPublic(2, b"T" * 32, SIGNATURE),
            last_resort_kem=None,
            one_time=[OneTimePreKeyPublic(10, b"a" * 32), OneTimePreKeyPublic(3, b"b" * 32)],
            one_time_kem=[],
            max_stored=1000,
        )
    assert db.prekey_counts("bob", 1) == PreKeyCounts(3, 1)
    taken = db.take_bundle("bob", 1)
    assert taken is not None and taken.signed_prekey.key_id == 1  # not replaced
    with pytest.raises(PreKeyIdInUse):  # repeated within one upload
        db.store_prekeys(
            "bob",
            1,
            signed_prekey=None,
            last_resort_kem=None,
            one_time=[OneTimePreKeyPublic(50, b"a" * 32)] * 2,
            one_time_kem=[],
            max_stored=1000,
        )
    with pytest.raises(PreKeyStockFull):
        db.store_prekeys(
            "bob",
            1,
            signed_prekey=None,
            last_resort_kem=None,
            one_time=[OneTimePreKeyPublic(100 + i, b"a" * 32) for i in range(4)],
            one_time_kem=[],
            max_stored=5,
        )
    assert db.prekey_counts("bob", 1) == PreKeyCounts(2, 0)
    with pytest.raises(UnknownDevice):
        upload_prekeys(db, "bob", 7, one_time=1, kem=0)


def test_take_once_then_last_resort(db: SqliteDatabase) -> None:
    assert db.take_bundle("bob", 1) is None  # nothing uploaded
    upload_prekeys(db, "bob", 1, one_time=2, kem=1)
    first = db.take_bundle("bob", 1)
    assert first is not None
    assert first.one_time is not None and first.one_time.key_id == 1
    assert (first.kem.key_id, first.kem_is_last_resort) == (1, False)
    assert first.remaining == PreKeyCounts(1, 0)
    assert first.identity == b"\x01" * 32
    second = db.take_bundle("bob", 1)
    assert second is not None and second.one_time is not None and second.one_time.key_id == 2
    assert (second.kem.key_id, second.kem_is_last_resort) == (999, True)
    third = db.take_bundle("bob", 1)
    assert third is not None and third.one_time is None and third.kem_is_last_resort
    assert third.remaining == PreKeyCounts(0, 0)


def test_the_one_time_budget_is_one_per_device_for_every_relay_on_the_database(
    db: SqliteDatabase, open_db: Callable[[], SqliteDatabase]
) -> None:
    """Spec 7.7: the budget is a row beside the keys, so another relay process on the
    database (a second connection here) spends the same one; times are the relays' clock."""
    budget = RateLimit(2, 1.0)  # two at once, one more each second
    upload_prekeys(db, "bob", 1, one_time=10, kem=10)
    upload_prekeys(db, "bob", 2, one_time=10, kem=10)
    other_relay = open_db()

    def one_time_taken(database: SqliteDatabase, now: int, device_id: int = 1) -> bool:
        taken = database.take_bundle("bob", device_id, budget=budget, now=now)
        assert taken is not None
        assert (taken.one_time is None) == taken.kem_is_last_resort
        return taken.one_time is not None

    assert one_time_taken(db, 10_000) and one_time_taken(other_relay, 10_000)
    assert not one_time_taken(db, 10_000) and not one_time_taken(other_relay, 10_000)
    assert not one_time_taken(other_relay, 10_999)
    assert one_time_taken(other_relay, 11_000)  # a token regained
    assert not one_time_taken(db, 11_000)
    assert not one_time_taken(db, 5_000)  # a clock gone back regains nothing
    assert one_time_taken(db, 12_000)
    assert one_time_taken(db, 10_000, device_id=2)  # each device has its own budget
    assert db.prekey_counts("bob", 1) == PreKeyCounts(6, 6)


def test_a_budget_that_regained_its_capacity_is_forgotten(db: SqliteDatabase) -> None:
    """The sweep deletes full budgets' rows: a copy of the database tells when a device's
    one-time keys were last taken only until its budget refilled."""
    budget = RateLimit(2, 1.0)
    upload_prekeys(db, "bob", 1, one_time=10, kem=10)
    upload_prekeys(db, "bob", 2, one_time=10, kem=10)
    for device_id, now in ((1, 10_000), (2, 10_000), (2, 10_000)):
        taken = db.take_bundle("bob", device_id, budget=budget, now=now)
        assert taken is not None and taken.one_time is not None
    assert db.forget_full_budgets(budget, 10_999) == 0
    assert db.forget_full_budgets(budget, 11_000) == 1  # device 1 regained its one token
    taken = db.take_bundle("bob", 2, budget=budget, now=11_000)  # device 2 regained one
    assert taken is not None and taken.one_time is not None
    assert db.forget_full_budgets(budget, 12_999) == 0
    assert db.forget_full_budgets(budget, 13_000) == 1
    for _ in range(2):  # a forgotten budget is a full one
        taken = db.take_bundle("bob", 2, budget=budget, now=13_000)
        assert taken is not None and taken.one_time is not None


def test_a_fetch_that_takes_no_one_time_key_spends_no_budget(db: SqliteDatabase) -> None:
    budget = RateLimit(1, 1e-6)
    for _ in range(3):  # no prekeys at all: refused, nothing changes
        assert db.take_bundle("bob", 1, budget=budget, now=1000) is None
    upload_prekeys(db, "bob", 1, one_time=0, kem=0)
    for _ in range(3):  # an empty stock: a bundle with no one-time key, and no token spent
        taken = db.take_bundle("bob", 1, budget=budget, now=1000)
        assert taken is not None and taken.one_time is None and taken.kem_is_last_resort
    upload_prekeys(db, "bob", 1, one_time=1, kem=1)
    taken = db.take_bundle("bob", 1, budget=budget, now=1000)
    assert taken is not None and taken.one_time is not None and not taken.kem_is_last_resort


def test_no_bundle_without_a_kem_prekey(db: SqliteDatabase) -> None:
    db.store_prekeys(
        "bob",
        1,
        signed_prekey=SignedPreKeyPublic(1, b"S" * 32, SIGNATURE),
        last_resort_kem=None,
        one_time=[OneTimePreKeyPublic(1, b"o" * 32)],
        one_time_kem=[],
        max_stored=10,
    )
    assert db.take_bundle("bob", 1) is None
    assert db.prekey_counts("bob", 1) == PreKeyCounts(1, 0)  # nothing was taken


def test_take_once_across_processes_sharing_the_database(
    open_db: Callable[[], SqliteDatabase], db: SqliteDatabase
) -> None:
    upload_prekeys(db, "bob", 1, one_time=40, kem=40)
    taken: list[int | None] = []
    kem_taken: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def worker() -> None:
        own = open_db()  # a separate connection, as another relay process
        for _ in range(25):
            bundle = own.take_bundle("bob", 1)
            assert bundle is not None
            with lock:
                taken.append(None if bundle.one_time is None else bundle.one_time.key_id)
                kem_taken.append((bundle.kem.key_id, bundle.kem_is_last_resort))
        own.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    one_time = [k for k in taken if k is not None]
    assert sorted(one_time) == list(range(1, 41))
    one_time_kem = [k for k, last_resort in kem_taken if not last_resort]
    assert sorted(one_time_kem) == list(range(1, 41))
    assert kem_taken.count((999, True)) == 60


async def test_concurrent_takes_through_the_async_storage(tmp_path: Path) -> None:
    storage = await SqliteStorage.open(str(tmp_path / "async.db"))
    try:
        await storage.store_device_list(
            device_list("bob", 0, (1, b"\x01" * 32)), previous_counter=None
        )
        await storage.store_prekeys(
            "bob",
            1,
            signed_prekey=SignedPreKeyPublic(1, b"S" * 32, SIGNATURE),
            last_resort_kem=KemPreKeyPublic(9, b"L" * 1184, SIGNATURE),
            one_time=[OneTimePreKeyPublic(i, b"o" * 32) for i in range(10)],
            one_time_kem=[],
            max_stored=100,
        )
        results: list[int | None] = []

        async def take() -> None:
            bundle = await storage.take_bundle("bob", 1)
            assert bundle is not None
            results.append(None if bundle.one_time is None else bundle.one_time.key_id)

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(take)
        assert sorted(k for k in results if k is not None) == list(range(10))
        assert results.count(None) == 20
    finally:
        await storage.aclose()


# ------------------------------------------------------------------ mailboxes


def test_group_payload_is_stored_once(db: SqliteDatabase) -> None:
    recipients = [("bob", 1), ("bob", 2)]
    db.enqueue(
        batch(recipients, (b"group",), counters={"bob": 0}, kind=EnvelopeKind.GROUP),
        max_mailbox_size=10,
    )
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 1
    assert db._conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 2
    (first,) = db.pending("bob", 1, after_seq=0, limit=10, now=0)
    (second,) = db.pending("bob", 2, after_seq=0, limit=10, now=0)
    one, two = first.envelope, second.envelope
    assert one.payload == two.payload == b"group" and one.guid != two.guid
    assert (one.sender_user, one.sender_device, one.kind) == ("alice", 1, 2)
    assert db.acknowledge("bob", 1, [first.seq]) == 1
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 1
    assert db.acknowledge("bob", 1, [second.seq]) == 0  # not bob/1's envelope
    assert db.acknowledge("bob", 2, [second.seq, first.seq]) == 1  # first: gone, and bob/1's
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 0


def test_acknowledgements_count_a_mailbox_down_across_epochs(relay_db: str, tmp_path: Path) -> None:
    """A device's envelopes of an older epoch and of the newest, acknowledged together
    (PostgreSQL takes the newest epoch's in one statement, the others as SQLite does):
    each counts once, another device's is left alone, and the emptied mailbox row goes."""
    now = [wall_clock_ms()]
    db = (
        PostgresDatabase(relay_db, key_file=str(tmp_path / "relay.keys"), clock=lambda: now[0])
        if is_postgres_url(relay_db)
        else SqliteDatabase(relay_db, clock=lambda: now[0])
    )
    try:
        register_devices(db, "alice", 1, key_base=0xA0)
        register_devices(db, "bob", 1, 2)

        def send(to: tuple[str, int], payload: bytes, room: int = 5) -> None:
            db.enqueue(
                batch([to], (payload,), counters={"bob": 0}, server_ts=now[0]),
                max_mailbox_size=room,
            )

        for index in range(3):
            send(("bob", 1), b"old %d" % index)
        send(("bob", 2), b"bob/2's")
        now[0] += db.key_chain.epoch_ms  # a new epoch: bob/1's count moves to its new index
        for index in range(2):
            send(("bob", 1), b"new %d" % index)
        queued = db.pending("bob", 1, after_seq=0, limit=10, now=0)
        payloads = [q.envelope.payload for q in queued]
        assert payloads == [b"old 0", b"old 1", b"old 2", b"new 0", b"new 1"]
        assert len({q.epoch for q in queued}) == 2
        with pytest.raises(MailboxFull):
            send(("bob", 1), b"one too many")
        (other,) = db.pending("bob", 2, after_seq=0, limit=10, now=0)
        seqs = [q.seq for q in queued]
        assert db.acknowledge("bob", 1, [seqs[0], seqs[3], other.seq]) == 2
        assert db.acknowledge("bob", 1, [seqs[0], seqs[3]]) == 0  # once only
        send(("bob", 1), b"room again", room=4)  # 3 queued: room for a 4th, not a 5th
        with pytest.raises(MailboxFull):
            send(("bob", 1), b"no room", room=4)
        rest = [q.seq for q in db.pending("bob", 1, after_seq=0, limit=10, now=0)]
        assert db.acknowledge("bob", 1, rest) == 4
        assert db.pending("bob", 1, after_seq=0, limit=10, now=0) == []
        # bob/1's mailbox row is gone; bob/2's (moved to the new epoch) and its envelope stay.
        assert db._conn.execute("SELECT queued FROM mailboxes").fetchall() == [(1,)]
        assert [q.seq for q in db.pending("bob", 2, after_seq=0, limit=10, now=0)] == [other.seq]
        # Within the newest epoch alone: counted down, then emptied.
        send(("bob", 1), b"a")
        send(("bob", 1), b"b")
        first, second = db.pending("bob", 1, after_seq=0, limit=10, now=0)
        assert db.acknowledge("bob", 1, [first.seq]) == 1
        assert sorted(db._conn.execute("SELECT queued FROM mailboxes").fetchall()) == [(1,), (1,)]
        assert db.acknowledge("bob", 1, [second.seq, first.seq]) == 1
        assert db._conn.execute("SELECT queued FROM mailboxes").fetchall() == [(1,)]
    finally:
        db.close()


def test_a_full_mailbox_takes_nothing_and_the_others_take_the_send(db: SqliteDatabase) -> None:
    for payload in (b"a", b"b"):
        db.enqueue(batch([("bob", 1)], (payload,), counters={"bob": 0}), max_mailbox_size=2)
    # bob/1 is full: bob/2 takes its payload; bob/1's is not stored at all.
    seqs = db.enqueue(
        batch([("bob", 1), ("bob", 2)], (b"c", b"d"), counters={"bob": 0}), max_mailbox_size=2
    )
    assert seqs[0] is None and seqs[1] is not None
    assert [q.envelope.payload for q in db.pending("bob", 2, after_seq=0, limit=10, now=0)] == [
        b"d"
    ]
    assert len(db.pending("bob", 1, after_seq=0, limit=10, now=0)) == 2
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 3
    # Every named mailbox full: refused, nothing stored.
    with pytest.raises(MailboxFull) as info:
        db.enqueue(batch([("bob", 1)], (b"e",), counters={"bob": 0}), max_mailbox_size=2)
    assert info.value.devices == (("bob", 1),)
    # A group change is stored for all or none: one full mailbox refuses it whole.
    change = batch([("bob", 2), ("bob", 1)], (b"f", b"g"), counters={"bob": 0})
    with pytest.raises(MailboxFull) as info:
        db.enqueue(replace(change, all_or_nothing=True), max_mailbox_size=2)
    assert info.value.devices == (("bob", 1),)
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 3


def test_a_send_larger_than_one_statement(
    db: SqliteDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_storage, "ROWS_PER_STATEMENT", 3)
    users = [f"user{i}" for i in range(4)]
    for index, user_id in enumerate(users):
        register_devices(db, user_id, 1, 2, key_base=0x10 * (index + 1))
    recipients = [(user_id, device_id) for user_id in users for device_id in (1, 2)]
    counters = dict.fromkeys(users, 0)
    send = batch(recipients, (b"g",), counters=counters, kind=EnvelopeKind.GROUP)
    positions = db.enqueue(send, max_mailbox_size=2)
    filed = [position for position in positions if position is not None]
    seqs = [seq for _, seq in filed]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(recipients)
    for delivery, (epoch, seq) in zip(send.deliveries, filed, strict=True):
        (queued,) = db.pending(delivery.user_id, delivery.device_id, after_seq=0, limit=9, now=0)
        assert (queued.epoch, queued.seq, queued.envelope.guid) == (epoch, seq, delivery.guid)
    # Only user0/1's own envelope is deleted, however many others are named.
    assert db.acknowledge("user0", 1, seqs) == 1
    # Full mailboxes are found across statements: only user0/1 has room.
    db.enqueue(batch(recipients[1:], (b"h",), counters=counters), max_mailbox_size=2)
    positions = db.enqueue(batch(recipients, (b"i",), counters=counters), max_mailbox_size=2)
    assert positions[0] is not None and positions[1:] == [None] * (len(recipients) - 1)
    with pytest.raises(MailboxFull) as info:  # all named, in the send's order
        db.enqueue(batch(recipients[1:], (b"i",), counters=counters), max_mailbox_size=2)
    assert info.value.devices == tuple(recipients[1:])
    with pytest.raises(StorageConflict):  # one device gone: nothing is stored
        db.enqueue(
            batch([*recipients, ("user0", 3)], (b"j",), counters=counters), max_mailbox_size=9
        )


def test_stale_device_list_counter_refuses_the_send(db: SqliteDatabase) -> None:
    with pytest.raises(StorageConflict):
        db.enqueue(batch([("bob", 1)], (b"a",), counters={"bob": 7}), max_mailbox_size=10)
    with pytest.raises(StorageConflict):
        db.enqueue(batch([("bob", 9)], (b"a",), counters={"bob": 0}), max_mailbox_size=10)
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 0


def _enqueue_for_bob(db: SqliteDatabase, expiries: list[int]) -> None:
    """Envelope ``i`` (payload ``bytes([i])``, sent at 100 + i) to bob/1, expiring then."""
    for index, expires_at in enumerate(expiries):
        db.enqueue(
            batch(
                [("bob", 1)],
                (bytes([index]),),
                counters={"bob": 0},
                server_ts=100 + index,
                expires_at=expires_at,
            ),
            max_mailbox_size=10,
        )


def test_a_read_returning_fewer_than_its_limit_read_past_expired_rows_to_the_end(
    db: SqliteDatabase,
) -> None:
    """Expired rows fill the first rows a read fetches: it fetches on, so a read that
    comes back with fewer envelopes than its limit has read the mailbox to its end,
    which a connection takes as having the newest epoch (MailboxRead.newest_epoch)."""
    _enqueue_for_bob(db, [1000, 1000, 1000, 1000, 5000, 5000])
    found = db.pending("bob", 1, after_seq=0, limit=3, now=2000)
    assert [q.envelope.payload for q in found] == [b"\x04", b"\x05"]
    assert found.newest_epoch == db.key_chain.epoch_of(wall_clock_ms())
    assert {q.epoch for q in found} == {found.newest_epoch}


def test_pending_in_order_after_seq_and_unexpired(db: SqliteDatabase) -> None:
    _enqueue_for_bob(db, [1000 + index for index in range(5)])
    queued = db.pending("bob", 1, after_seq=0, limit=3, now=0)
    assert [q.envelope.payload for q in queued] == [b"\x00", b"\x01", b"\x02"]
    rest = db.pending("bob", 1, after_seq=queued[-1].seq, limit=10, now=0)
    assert [q.envelope.payload for q in rest] == [b"\x03", b"\x04"]
    # Expired envelopes are never handed out, even before the sweep.
    assert [q.envelope.payload for q in db.pending("bob", 1, after_seq=0, limit=10, now=1002)] == [
        b"\x03",
        b"\x04",
    ]
    # They are deleted with their epoch, when it leaves the retention window.
    chain = db.key_chain
    newest = chain.epoch_of(wall_clock_ms())
    assert {q.epoch for q in queued + rest} == {newest}  # never before the newest epoch
    leaves = chain.start_of(newest + 1) + DEFAULT_RETENTION_SECONDS * 1000
    now = wall_clock_ms()
    assert now < db.next_purge(now) <= now + chain.epoch_ms  # the next epoch boundary
    assert db.purge_expired(leaves - 1) == 0
    assert db.key_chain.keys(newest) is not None
    assert db.purge_expired(leaves) == 5
    assert db.key_chain.keys(newest) is None  # and its keys cease to exist
    assert db._conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 0
    # bob/1 is told; its mailbox counts nothing queued.
    assert db.expiry_notice("bob", 1) == ExpiryNotice(5, 100, 104)
    assert db._conn.execute("SELECT queued FROM mailboxes").fetchall() == [(0,)]


# ------------------------------------------------------------------ the file


def test_reopen_keeps_everything(open_db: Callable[[], SqliteDatabase], db: SqliteDatabase) -> None:
    db.enqueue(batch([("bob", 1)], (b"kept",), counters={"bob": 0}), max_mailbox_size=10)
    db.close()
    again = open_db()
    assert [q.envelope.payload for q in again.pending("bob", 1, after_seq=0, limit=5, now=0)] == [
        b"kept"
    ]
    assert again.device_lists(["alice"])["alice"].counter == 0
    again.close()


def test_a_device_key_is_listed_under_one_user_only(db: SqliteDatabase) -> None:
    """Mallory lists carol's device key (as if its proof verified): refused, nothing stored."""
    carol_key = b"\xcc" * 32
    db.store_device_list(device_list("carol", 0, (1, carol_key)), previous_counter=None)
    for devices in ([(1, b"M" * 32), (5, carol_key)], [(5, carol_key)]):
        with pytest.raises(DeviceListRejected) as refused:
            db.store_device_list(device_list("mallory", 0, *devices), previous_counter=None)
        assert refused.value.cause == DuplicateDeviceKey.code
    assert "mallory" not in db.device_lists(["mallory"])
    db.store_device_list(device_list("mallory", 0, (1, b"M" * 32)), previous_counter=None)
    with pytest.raises(DeviceListRejected):
        db.store_device_list(
            device_list("mallory", 1, (1, b"M" * 32), (5, carol_key)), previous_counter=0
        )
    assert db.device_lists(["mallory"])["mallory"].counter == 0
    # Carol's own lists may name it again, under another id too; once she lists it
    # no more, it is free.
    db.store_device_list(device_list("carol", 1, (2, carol_key)), previous_counter=0)
    db.store_device_list(device_list("carol", 2, (3, b"C" * 32)), previous_counter=1)
    db.store_device_list(
        device_list("mallory", 1, (1, b"M" * 32), (5, carol_key)), previous_counter=0
    )


def test_a_schema_2_database_is_migrated(tmp_path: Path) -> None:
    """Schema 2 (relays of protocol version 1): alice's list names key A, and mallory's
    names A too (lists carried no proofs)."""
    path = tmp_path / "relay.db"
    schema_2_database(
        path,
        [
            ("alice", b"U" * 32, 3, b"version 1 list of alice", [(1, b"A" * 32)]),
            (
                "mallory",
                b"U" * 32,
                3,
                b"version 1 list of mallory",
                [(1, b"M" * 32), (5, b"A" * 32)],
            ),
        ],
    )
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO one_time_prekeys VALUES ('alice', 1, 7, ?)", (b"K" * 32,))
    conn.close()
    db = SqliteDatabase(str(path))
    with sqlite3.connect(path) as conn:
        assert (
            conn.execute("PRAGMA user_version").fetchone()[0]
            == sqlite_storage_schema.SCHEMA_VERSION
        )
    # Everything is kept: the lists (as version 1), the devices and prekeys.
    lists = db.device_lists(["alice", "mallory"])
    assert {u: (dl.protocol_version, dl.counter, dl.signed) for u, dl in lists.items()} == {
        "alice": (1, 3, b"version 1 list of alice"),
        "mallory": (1, 3, b"version 1 list of mallory"),
    }
    assert lists["mallory"].devices == ((1, b"M" * 32), (5, b"A" * 32))
    assert db.prekey_counts("alice", 1) == PreKeyCounts(1, 0)
    # A version 1 list does not make its keys taken (mallory's names alice's key without
    # her device's consent): alice's list of the current version names it, and then
    # mallory's next list may not.
    db.store_device_list(device_list("alice", 4, (1, b"A" * 32)), previous_counter=3)
    with pytest.raises(DeviceListRejected):
        db.store_device_list(
            device_list("mallory", 4, (1, b"M" * 32), (5, b"A" * 32)), previous_counter=3
        )
    db.store_device_list(device_list("mallory", 4, (1, b"M" * 32)), previous_counter=3)
    db.close()
    # The migrated file opens again as it is, and equals a new file's schema.
    SqliteDatabase(str(path)).close()
    fresh = tmp_path / "fresh.db"
    SqliteDatabase(str(fresh)).close()
    assert _schema_of(path) == _schema_of(fresh)


def _schema_of(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    # ALTER TABLE keeps the original text around a new column: compare tokens only.
    return [
        (name, re.sub(r"\s*([(),])\s*", r"\1", " ".join((sql or "").split()))) for name, sql in rows
    ]


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(UnknownStateVersion):
        SqliteDatabase(str(path))


def test_acknowledged_ciphertext_leaves_no_trace_on_disk(
    tmp_path: Path, sqlite_db: SqliteDatabase
) -> None:
    db = sqlite_db
    marker = b"MARKER-" + bytes(range(200))
    db.enqueue(batch([("bob", 1)], (marker,), counters={"bob": 0}), max_mailbox_size=10)
    (queued,) = db.pending("bob", 1, after_seq=0, limit=1, now=0)
    assert queued.envelope.payload == marker
    files = list(tmp_path.glob("relay.db*"))
    assert not any(marker in f.read_bytes() for f in files)  # sealed at rest
    (sealed,) = db._conn.execute("SELECT sealed FROM payloads").fetchone()
    assert any(sealed in f.read_bytes() for f in files)  # the check can see what is stored
    assert db.acknowledge("bob", 1, [queued.seq]) == 1
    db.purge_expired(0)  # also truncates the WAL
    assert not any(sealed in f.read_bytes() for f in tmp_path.glob("relay.db*"))
    db.close()
    assert not any(sealed in f.read_bytes() for f in tmp_path.glob("relay.db*"))


# ------------------------------------------------------------------ file modes


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are created world-readable (0644)."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, str]:
    """Every file's and folder's permission bits under ``folder``, by relative path."""
    found = {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777) for p in folder.rglob("*")}
    return dict(sorted(found.items()))


@pytest.mark.usefixtures("umask_022")
def test_every_file_the_relay_creates_is_private(tmp_path: Path) -> None:
    db = SqliteDatabase(str(tmp_path / "relay.db"))
    register_devices(db, "bob", 1)
    db.enqueue(batch([("bob", 1)], (b"mail",), counters={"bob": 0}), max_mailbox_size=10)
    assert modes(tmp_path) == {
        "relay.db": "0o600",
        "relay.db-shm": "0o600",
        "relay.db-wal": "0o600",
        "relay.db.keys": "0o600",
    }
    db.close()
    assert set(modes(tmp_path).values()) <= {"0o600"}


@pytest.mark.usefixtures("umask_022")
async def test_a_running_relay_s_files_are_private(tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config(tmp_path)) as port:
        await register_users(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"mail")])
        found = modes(tmp_path)
    assert set(found) >= {"relay.db", "relay.db-wal", "relay.db-shm", "relay.db.keys"}
    assert set(found.values()) == {"0o600"}, found


@pytest.mark.usefixtures("umask_022")
def test_files_of_an_older_relay_are_made_private(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    older = SqliteDatabase(str(path))
    register_devices(older, "bob", 1)
    held_open = sqlite3.connect(path)  # keeps the WAL and shared memory files in place
    held_open.execute("SELECT COUNT(*) FROM users").fetchone()
    older.close()
    for name in ("relay.db", "relay.db-wal", "relay.db-shm"):
        (tmp_path / name).chmod(0o644)
    SqliteDatabase(str(path)).close()
    held_open.close()
    assert set(modes(tmp_path).values()) <= {"0o600"}, modes(tmp_path)
