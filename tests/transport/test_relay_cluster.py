"""Several relay processes on one PostgreSQL database (spec 07 section 7.13, Relay clusters).

Two relays (in this process, or one of them a real ``hushchat relay`` child)
share a database and a key file: mail crosses between them, a device moves
from one to the other, prekeys are raced by many fetchers, and a relay
killed with SIGKILL leaves the other serving.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from hushchat.protocol.encoding import unpack
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.transport import ConnectionClosed
from hushchat.transport.client.connection import RelayConnection
from hushchat.transport.relay.config import wall_clock_ms
from hushchat.transport.relay.ratelimit import RateLimit
from hushchat.transport.relay.server import Relay
from hushchat.transport.relay.storage.atrest import RelayKeysMissing
from hushchat.transport.relay.storage.postgres import PostgresDatabase, PostgresStorage
from hushchat.transport.wire.errors import RateLimited, Superseded
from hushchat.transport.wire.frames import QueueEmpty
from hushchat.transport.wire.limits import BUNDLE_FETCH_CAPACITY, TARGET_ONE_TIME_CAPACITY
from hushchat.transport.wire.records import Envelope
from tests.support.children import RELAY_COMMAND, STARTED, child_env
from tests.support.postgres import DatabasePool
from tests.support.relay import (
    announced_port,
    connected,
    envelopes_until_empty,
    make_prekeys,
    next_envelope,
    register,
    relay_config,
    running_relay,
)
from tests.support.storage import register_devices, upload_prekeys
from tests.support.users import Device, User, make_user

# Sybils fetching one target's bundles: enough that two relays' separate budgets
# (20 each by default) would both run out, at 6 fetches per sybil and relay.
SYBILS = 10


@asynccontextmanager
async def two_relays(dsn: str, tmp_path: Path, **limits: Any) -> AsyncIterator[tuple[int, int]]:
    """Two relays on the database ``dsn``, sharing one key file; their ports."""
    async with (
        running_relay(relay_config(tmp_path, db=dsn, **limits)) as first,
        running_relay(relay_config(tmp_path, db=dsn, **limits)) as second,
    ):
        yield first, second


@asynccontextmanager
async def bob_alice_and_carol(
    port_a: int, port_b: int, alice: User, bob: User, carol: User
) -> AsyncIterator[tuple[RelayConnection, RelayConnection, RelayConnection]]:
    """The three registered; bob (his mailbox read, empty) and alice connected to relay A,
    carol to relay B: (bob's, alice's, carol's connection)."""
    await register(port_a, alice, bob, carol)
    async with (
        connected(port_a, bob.devices[1]) as receiver,
        connected(port_a, alice.devices[1]) as alice_connection,
        connected(port_b, carol.devices[1]) as carol_connection,
    ):
        assert await envelopes_until_empty(receiver) == []
        yield receiver, alice_connection, carol_connection


async def receive_envelopes(connection: RelayConnection, count: int) -> list[Envelope]:
    """The next ``count`` envelopes, each acknowledged as it arrives."""
    received = []
    for _ in range(count):
        envelope = await next_envelope(connection, timeout=20)
        received.append(envelope)
        await connection.ack(envelope.guid)
    return received


async def nothing_new(connection: RelayConnection, seen: list[Envelope]) -> bool:
    """Whether the connection's queue holds none but envelopes of ``seen``.

    An envelope acknowledged on one relay may come again on another if the
    device reconnects there before the deletion committed (spec 7.8: as after
    a crash, the client knows it by its guid).
    """
    guids = {e.guid for e in seen}
    return all(e.guid in guids for e in await envelopes_until_empty(connection))


async def test_a_send_on_one_relay_is_pushed_at_once_to_a_device_on_the_other(
    postgres_dsn: str, tmp_path: Path
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with two_relays(postgres_dsn, tmp_path) as (port_a, port_b):
        await register(port_a, alice)
        await register(port_b, bob)  # either relay registers, both know
        async with (
            connected(port_b, bob.devices[1]) as receiver,
            connected(port_a, alice.devices[1]) as sender,
        ):
            assert await envelopes_until_empty(receiver) == []
            for text in (b"one", b"two", b"three"):
                await sender.send_direct("bob", [(1, text)])
            received = await receive_envelopes(receiver, 3)
            assert [e.payload for e in received] == [b"one", b"two", b"three"]
            assert {e.sender_user for e in received} == {"alice"}
            # And back: bob's relay wakes alice's.
            await receiver.send_direct("alice", [(1, b"back")])
            assert (await next_envelope(sender, timeout=20)).payload == b"back"


async def test_a_wake_naming_a_hostile_user_id_reaches_its_relay_intact(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A wake is written into the SQL text sent with the batch's COMMIT: a user id made
    to break out of its quoting is woken as itself, and the database is unharmed."""
    hostile = "o'b\\'); DROP TABLE users; --\u00e9\""
    alice, mallory = make_user("alice"), make_user(hostile)
    async with two_relays(postgres_dsn, tmp_path) as (port_a, port_b):
        await register(port_a, alice)
        await register(port_b, mallory)
        async with (
            connected(port_b, mallory.devices[1]) as receiver,
            connected(port_a, alice.devices[1]) as sender,
        ):
            assert await envelopes_until_empty(receiver) == []
            await sender.send_direct(hostile, [(1, b"woken")])
            (received,) = await receive_envelopes(receiver, 1)
            assert received.payload == b"woken"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        users = conn.execute("SELECT user_id FROM users ORDER BY user_id").fetchall()
    assert users == sorted([("alice",), (hostile,)])


async def test_a_device_moving_to_another_relay_closes_its_old_connection_there(
    postgres_dsn: str, tmp_path: Path
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with two_relays(postgres_dsn, tmp_path) as (port_a, port_b):
        await register(port_a, alice, bob)
        async with connected(port_a, bob.devices[1]) as old:
            assert await envelopes_until_empty(old) == []
            async with connected(port_b, bob.devices[1]) as new:
                assert await envelopes_until_empty(new) == []
                with pytest.raises(ConnectionClosed) as info:
                    with trio.fail_after(20):
                        while True:
                            await old.receive()
                assert isinstance(info.value.reason, Superseded)
                # Mail sent through the old relay now reaches the device on the new one.
                async with connected(port_a, alice.devices[1]) as sender:
                    await sender.send_direct("bob", [(1, b"found you")])
                found = await receive_envelopes(new, 1)
                assert found[0].payload == b"found you"
            # Back on the first relay, with nothing left behind on the second.
            async with connected(port_a, bob.devices[1]) as again:
                assert await nothing_new(again, found)


async def test_racing_senders_on_both_relays_deliver_each_envelope_once_in_commit_order(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The attacker's hope: a send committed through relay B between two of relay A's
    reaches a device on A late, after A pushed the later one, and is skipped or pushed
    twice. Each envelope arrives once, and each sender's in the order it sent them."""
    senders = make_user("alice", [1, 2, 3, 4])
    bob = make_user("bob")
    per_sender = 15
    async with two_relays(postgres_dsn, tmp_path, max_in_flight=8) as (port_a, port_b):
        await register(port_a, senders, bob)
        async with connected(port_a, bob.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []

            async def send_all(device_id: int) -> None:
                port = port_a if device_id % 2 else port_b
                async with connected(port, senders.devices[device_id]) as sender:
                    for index in range(per_sender):
                        await sender.send_direct("bob", [(1, b"%d:%d" % (device_id, index))])

            async with trio.open_nursery() as nursery:
                for device_id in senders.devices:
                    nursery.start_soon(send_all, device_id)
                received = await receive_envelopes(receiver, 4 * per_sender)
        async with connected(port_b, bob.devices[1]) as again:
            assert await nothing_new(again, received)  # nothing skipped
    assert len({e.guid for e in received}) == len(received) == 4 * per_sender
    for device_id in senders.devices:
        mine = [e.payload for e in received if e.sender_device == device_id]
        assert mine == [b"%d:%d" % (device_id, i) for i in range(per_sender)]


class HeldWakes:
    """Wake-ups from other relays (Relay._mail_elsewhere) held back until let go."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held: list[tuple[Relay, list[tuple[str, int]]]] = []
        self.arrived = trio.Event()
        self._released = False
        self._original = original = Relay._mail_elsewhere

        def held_back(relay: Relay, devices: Any) -> None:  # in place of the Relay method
            if self._released:
                original(relay, devices)
            else:
                self.held.append((relay, list(devices)))
                self.arrived.set()

        monkeypatch.setattr(Relay, "_mail_elsewhere", held_back)

    def let_go(self) -> None:
        """Deliver the wakes held so far, and every later one at once."""
        self._released = True
        for relay, devices in self.held:
            self._original(relay, devices)


@pytest.fixture
def wakes(monkeypatch: pytest.MonkeyPatch) -> HeldWakes:
    return HeldWakes(monkeypatch)


async def test_a_late_wake_from_another_relay_loses_nothing_and_pushes_nothing_twice(
    postgres_dsn: str, tmp_path: Path, wakes: HeldWakes
) -> None:
    """Carol's send through relay B commits first, but B's wake reaches relay A (which
    holds bob) only after alice's later send through A committed. Handing alice's
    envelope to bob at its commit would move his cursor past carol's, which the late
    wake's read would then skip: bob gets both, in commit order, once each."""
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    async with two_relays(postgres_dsn, tmp_path) as (port_a, port_b):
        async with bob_alice_and_carol(port_a, port_b, alice, bob, carol) as (
            receiver,
            alice_connection,
            carol_connection,
        ):
            await carol_connection.send_direct("bob", [(1, b"first")])
            with trio.fail_after(20):
                await wakes.arrived.wait()  # relay A was told, and the wake is held back
            await alice_connection.send_direct("bob", [(1, b"second")])
            first, second = await receive_envelopes(receiver, 2)
            wakes.let_go()
            await receiver.ping()  # the late wake was handled before this reply's read
            assert [first.payload, second.payload] == [b"first", b"second"]
            assert (first.sender_user, second.sender_user) == ("carol", "alice")
        async with connected(port_b, bob.devices[1]) as again:
            assert await nothing_new(again, [first, second])


async def test_prekeys_raced_by_fetchers_on_both_relays_are_handed_out_once(
    postgres_dsn: str, tmp_path: Path
) -> None:
    bob = make_user("bob")
    fetchers = make_user("alice", range(1, 7))
    limits = {"bundle_fetch_rate": RateLimit(100, 1.0)}
    async with two_relays(postgres_dsn, tmp_path, **limits) as (port_a, port_b):
        await register(port_a, bob, fetchers)
        async with connected(port_a, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=20, one_time_kem=20))
        one_time: list[int] = []
        last_resort = 0

        async def fetch(device_id: int) -> None:
            nonlocal last_resort
            port = port_a if device_id % 2 else port_b
            async with connected(port, fetchers.devices[device_id]) as connection:
                for _ in range(6):
                    data = await connection.fetch_bundle("bob", 1)
                    bundle = unpack(data, what="bundle", max_size=10_000)
                    if bundle[5] is not None:  # the one-time prekey: [key id, public]
                        one_time.append(bundle[5][0])
                    else:
                        last_resort += 1

        async with trio.open_nursery() as nursery:
            for device_id in fetchers.devices:
                nursery.start_soon(fetch, device_id)
    assert sorted(one_time) == list(range(1, 21))  # every key once, none twice
    assert last_resort == 36 - 20


async def test_sybils_on_both_relays_take_no_more_than_one_budget_of_one_time_prekeys(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The attacker's hope: each relay counts the target's one-time budget for itself, so
    sybils fetching through both take twice the budget (N relays: N times). The budget
    is one row in the database: together the relays hand out one budget.

    The relays' clock stands still (the budget regains nothing meanwhile), and
    the sybils fetch at once, each on one relay until it refuses, then on the other.
    """
    bob = make_user("bob")
    sybils = [make_user(f"sybil{i:02}") for i in range(SYBILS)]
    frozen = wall_clock_ms()
    async with two_relays(postgres_dsn, tmp_path, clock=lambda: frozen) as (port_a, port_b):
        await register(port_a, bob, *sybils)
        async with connected(port_a, bob.devices[1]) as owner:
            stock = make_prekeys(bob.devices[1], one_time=100, one_time_kem=100)
            await owner.upload_prekeys(**stock)
        bundles: list[PreKeyBundle] = []

        async def drain(sybil: Device, ports: tuple[int, ...]) -> None:
            for port in ports:  # one relay after the other: a device connects to one at a time
                async with connected(port, sybil) as connection:
                    while True:
                        try:
                            data = await connection.fetch_bundle("bob", 1)
                        except RateLimited:
                            break
                        bundles.append(PreKeyBundle.decode(data))

        async with trio.open_nursery() as nursery:
            for i, sybil in enumerate(sybils):
                ports = (port_a, port_b) if i % 2 else (port_b, port_a)
                nursery.start_soon(drain, sybil.devices[1], ports)
        async with connected(port_b, bob.devices[1]) as owner:
            counts = await owner.upload_prekeys()
    assert len(bundles) == SYBILS * 2 * int(BUNDLE_FETCH_CAPACITY)  # nobody refused a bundle
    with_one_time = [b for b in bundles if b.one_time_prekey is not None]
    one_time_kem = [b for b in bundles if not b.kem_is_last_resort]
    budget = int(TARGET_ONE_TIME_CAPACITY)
    assert (len(with_one_time), len(one_time_kem)) == (budget, budget)
    assert (counts.one_time, counts.one_time_kem) == (100 - budget, 100 - budget)


def test_none_left_is_answered_only_when_none_is_left(postgres_dsn: str, tmp_path: Path) -> None:
    """A key another relay is taking in an open transaction is waited for: if that take
    rolls back, the key is handed out here, not "none left"."""
    db = PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys"))
    register_devices(db, "bob", 1)
    upload_prekeys(db, "bob", 1, one_time=1, kem=1)
    other = psycopg.connect(postgres_dsn, autocommit=True)  # another relay, mid-transaction
    other.execute("BEGIN")
    held = other.execute(
        "DELETE FROM one_time_prekeys WHERE user_id = 'bob' RETURNING key_id"
    ).fetchone()
    assert held == (1,)
    results: list[Any] = []
    taker = threading.Thread(target=lambda: results.append(db.take_bundle("bob", 1)))
    taker.start()
    with psycopg.connect(postgres_dsn, autocommit=True) as watcher:
        while not watcher.execute(  # the take waits for the held key's lock
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        ).fetchone():
            assert taker.is_alive()
    other.execute("ROLLBACK")
    taker.join()
    other.close()
    (bundle,) = results
    assert bundle.one_time is not None and bundle.one_time.key_id == 1
    db.close()


async def test_a_relay_killed_with_sigkill_leaves_the_other_serving(
    postgres_dsn: str, tmp_path: Path
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    key_file = tmp_path / "relay.keys"
    async with running_relay(relay_config(tmp_path, db=postgres_dsn)) as port_a:
        assert key_file.exists()  # the child relay shares it
        argv = [*RELAY_COMMAND, "--port", "0", "--db", postgres_dsn, "--key-file", str(key_file)]
        process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=child_env())
        STARTED.append(process)
        port_b = await announced_port(process)
        await register(port_b, alice, bob)
        async with connected(port_a, alice.devices[1]) as sender:
            async with connected(port_b, bob.devices[1]) as receiver:
                assert await envelopes_until_empty(receiver) == []
                await sender.send_direct("bob", [(1, b"before")])
                assert (await next_envelope(receiver, timeout=20)).payload == b"before"
                process.send_signal(signal.SIGKILL)
                assert await process.wait() == -signal.SIGKILL
                with pytest.raises(ConnectionClosed), trio.fail_after(20):
                    while True:
                        await receiver.receive()
            # The survivor goes on: mail sent meanwhile waits, and new mail is pushed.
            await sender.send_direct("bob", [(1, b"meanwhile")])
            async with connected(port_a, bob.devices[1]) as moved:
                payloads = [e.payload for e in await envelopes_until_empty(moved)]
                assert payloads == [b"before", b"meanwhile"]  # "before" was never acknowledged
                await sender.send_direct("bob", [(1, b"after")])
                assert (await next_envelope(moved, timeout=20)).payload == b"after"


def test_a_relay_with_another_key_file_does_not_start_on_the_cluster_s_database(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """With no mail queued yet, a SQLite relay adopts a new key file; on a shared database
    the other relays may be sealing under the stored chain right now, so it is refused."""
    PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys")).close()
    with pytest.raises(RelayKeysMissing):
        PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "other.keys"))
    with pytest.raises(RelayKeysMissing):
        PostgresDatabase(postgres_dsn)  # keys in memory: a new chain
    PostgresDatabase(postgres_dsn, key_file=str(tmp_path / "relay.keys")).close()


class Resyncs:
    """How many times the relays read their devices' mailboxes again, their listeners
    back (Relay._resynced, patched by the ``resyncs`` fixture)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def note(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(20):
            while self.count < count:
                await self._changed.wait()


@pytest.fixture
def resyncs(monkeypatch: pytest.MonkeyPatch) -> Resyncs:
    counted = Resyncs()
    original = Relay._resynced

    def resync(relay: Relay) -> None:
        original(relay)
        counted.note()

    monkeypatch.setattr(Relay, "_resynced", resync)
    return counted


@asynccontextmanager
async def bob_on_relay_a_then_cut(
    dsn: str, tmp_path: Path, bob: User, carol: User, which: str, *params: Any
) -> AsyncIterator[tuple[int, int, RelayConnection]]:
    """Two relays; bob connected to the first, his mailbox read; then the server ends the
    relays' connections that ``which`` (a condition on pg_stat_activity) names: how many,
    the second relay's port and bob's connection."""
    async with two_relays(dsn, tmp_path) as (port_a, port_b):
        await register(port_a, bob, carol)
        async with connected(port_a, bob.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []
            with psycopg.connect(dsn, autocommit=True) as admin:
                cut = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE pid <> pg_backend_pid() AND {which}",
                    params,
                ).fetchall()
            yield len(cut), port_b, receiver


async def test_a_relay_that_lost_its_notifications_reads_its_devices_mailboxes_again(
    postgres_dsn: str, tmp_path: Path, resyncs: Resyncs
) -> None:
    """The listening connection of bob's relay is cut (a database restart, a network
    failure); carol's send through the other relay meanwhile wakes no one. Once the relay
    listens again it reads every connected device's mailbox, and bob gets the mail."""
    bob, carol = make_user("bob"), make_user("carol")
    listeners = "query LIKE 'LISTEN hushchat_relay_%%'"
    async with bob_on_relay_a_then_cut(postgres_dsn, tmp_path, bob, carol, listeners) as (
        cut,
        port_b,
        receiver,
    ):
        assert cut == 2  # both relays' listeners
        async with connected(port_b, carol.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"while deaf")])
        await resyncs.wait_for(1)
        assert (await next_envelope(receiver, timeout=20)).payload == b"while deaf"


async def test_a_database_restart_costs_no_connection_of_a_device(
    postgres_dsn: str, postgres_databases: DatabasePool, tmp_path: Path, resyncs: Resyncs
) -> None:
    """The server ends every connection of both relays, their writers' too (a restart, a
    failover). Each relay's listener notices at once and reads its devices' mailboxes
    again once it listens again: that read, and the next device's login, must not meet
    the writer's dead connection, which would end bob's connection (an ERROR traceback
    for each device on each relay) where it only had to be read again."""
    bob, carol = make_user("bob"), make_user("carol")
    postgres_databases.settle()  # the sessions not the relays' stay the same
    sessions = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        not_the_relays = [pid for (pid,) in admin.execute(sessions).fetchall()]
    relays = (
        "datname = current_database() AND backend_type = 'client backend' AND NOT pid = ANY(%s)"
    )
    async with bob_on_relay_a_then_cut(
        postgres_dsn, tmp_path, bob, carol, relays, not_the_relays
    ) as (cut, port_b, receiver):
        assert cut == 4  # each relay's writer and listener
        await resyncs.wait_for(2)
        async with connected(port_b, carol.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"after the restart")])
        assert (await next_envelope(receiver, timeout=20)).payload == b"after the restart"


@pytest.fixture
def mailbox_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many mailbox reads the relays of this test made (one counter)."""
    reads = [0]
    original = PostgresStorage.pending

    async def counted(self: PostgresStorage, *args: Any, **kwargs: Any) -> Any:
        reads[0] += 1
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(PostgresStorage, "pending", counted)
    return reads


async def test_a_relay_hands_its_own_sends_over_without_reading_the_mailbox_again(
    postgres_dsn: str, tmp_path: Path, mailbox_reads: list[int]
) -> None:
    """When nothing of another relay lies between (MailboxPosition.previous), a committed
    envelope goes to the connection as on SQLite, not through one more mailbox read."""
    alice, bob = make_user("alice"), make_user("bob")
    async with two_relays(postgres_dsn, tmp_path) as (port_a, _):
        await register(port_a, alice, bob)
        async with (
            connected(port_a, bob.devices[1]) as receiver,
            connected(port_a, alice.devices[1]) as sender,
        ):
            assert await envelopes_until_empty(receiver) == []
            assert await envelopes_until_empty(sender) == []
            before = mailbox_reads[0]  # each connection read its empty mailbox once
            await sender.send_direct("bob", [(1, b"first")])
            assert [e.payload for e in await receive_envelopes(receiver, 1)] == [b"first"]
            for index in range(5):
                await sender.send_direct("bob", [(1, b"%d" % index)])
                (envelope,) = await receive_envelopes(receiver, 1)
                assert envelope.payload == b"%d" % index
            assert mailbox_reads[0] == before


async def test_a_backlog_across_epochs_read_in_windows_then_new_mail_handed_over(
    postgres_dsn: str, tmp_path: Path, mailbox_reads: list[int]
) -> None:
    """Carol's backlog spans several epochs and more than one read: each read that
    stopped at its limit is followed by another from where it stopped, none skips
    ahead to the newest epoch. Once a read found the end, the connection has
    everything of the newest epoch, and her next envelope is handed over without
    reading the mailbox again (MailboxRead.newest_epoch)."""
    now = [wall_clock_ms()]
    alice, carol = make_user("alice"), make_user("carol")
    fast = RateLimit(10_000, 10_000)
    config = relay_config(
        tmp_path,
        db=postgres_dsn,
        clock=lambda: now[0],
        retention_seconds=30,  # epochs of 1 s
        send_rate=fast,
        frame_rate=fast,
    )
    sends = 160  # more than one read's limit (DELIVERY_BATCH_SIZE)
    async with running_relay(config) as port:
        await register(port, alice, carol)
        async with connected(port, alice.devices[1]) as sender:
            assert await envelopes_until_empty(sender) == []
            for index in range(sends):
                await sender.send_direct("carol", [(1, b"%d" % index)])
                now[0] += 20  # 3.2 s of relay time: the backlog spans 4 or 5 epochs
            now[0] += 2_000  # and the newest epoch, when carol reads, holds none of it
            mail: list[bytes] = []
            async with connected(port, carol.devices[1]) as late:
                with trio.fail_after(20):
                    while True:
                        batch = await late.receive_batch()
                        arrived = [i for i in batch if isinstance(i, Envelope)]
                        mail.extend(e.payload for e in arrived)
                        if arrived:
                            await late.ack(*(e.guid for e in arrived))
                        if any(isinstance(i, QueueEmpty) for i in batch):
                            break
                assert mail == [b"%d" % i for i in range(sends)]
                before = mailbox_reads[0]
                await sender.send_direct("carol", [(1, b"new")])
                assert [e.payload for e in await receive_envelopes(late, 1)] == [b"new"]
                assert mailbox_reads[0] == before


async def test_a_late_wake_for_mail_of_an_older_epoch_loses_nothing_when_the_epoch_moved(
    postgres_dsn: str, tmp_path: Path, wakes: HeldWakes
) -> None:
    """Bob's connection on relay A has epoch E up to alice's first envelope. Carol's
    send through relay B files one more under E, its wake to A held back; then the
    epoch moves on, and alice's next send through A is the first of the new epoch
    (previous 0). Bob's connection does not have E to its end: handing alice's
    envelope over would put his cursor in the new epoch, past carol's, which the late
    wake's read would then skip. He gets both, in commit order."""
    now = [wall_clock_ms()]
    limits = {"clock": lambda: now[0], "retention_seconds": 30}  # epochs of 1 s
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    async with (
        two_relays(postgres_dsn, tmp_path, **limits) as (port_a, port_b),
        bob_alice_and_carol(port_a, port_b, alice, bob, carol) as (
            receiver,
            alice_connection,
            carol_connection,
        ),
    ):
        await alice_connection.send_direct("bob", [(1, b"first")])
        assert [e.payload for e in await receive_envelopes(receiver, 1)] == [b"first"]
        await carol_connection.send_direct("bob", [(1, b"second")])
        with trio.fail_after(20):
            await wakes.arrived.wait()  # relay A was told, and the wake is held back
        now[0] += 2_000  # epochs of 1 s: the next batch moves the epoch on
        await alice_connection.send_direct("bob", [(1, b"third")])
        received = []
        for _ in range(2):
            envelope = await next_envelope(receiver, timeout=5)
            received.append(envelope)
            await receiver.ack(envelope.guid)
        wakes.let_go()
        await receiver.ping()  # the late wake was handled before this reply's read
        assert [e.payload for e in received] == [b"second", b"third"]
