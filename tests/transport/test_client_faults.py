"""The client library under faults: relay outages and restarts, a relay that lost its
database, its rate limits, errors an app must be able to catch.

Each test plays what a user or an operator meets: the relay killed and started
again (in this process, or as a child process killed with SIGKILL), its
database gone, a burst of sends beyond its rate. What the client must do is in
transport/client/client.py's docstring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hushchat.protocol.client_core import (
    Address,
    ClientCore,
    DeviceAdded,
    GroupChangeFailed,
    GroupUpdated,
    MessageReceived,
)
from hushchat.protocol.errors import InvalidArgument
from hushchat.transport.client import client as client_module
from hushchat.transport.client import connection as connection_module
from hushchat.transport.client.client import (
    PROCESSED_MEMORY,
    Client,
    Connected,
    Disconnected,
    MessageDelivered,
    MessagePending,
    MessageSent,
    Reregistered,
    Status,
    UnknownToRelay,
    load_or_create_core,
    open_client,
)
from hushchat.transport.client.events import ClientEvent, QueuedMessage
from hushchat.transport.client.store import WAL_SIZE_LIMIT, ClientStore, StoreFull
from hushchat.transport.relay.config import RelayLimits
from hushchat.transport.relay.ratelimit import RateLimit
from hushchat.transport.wire.errors import (
    Forbidden,
    NoPreKeys,
    RateLimited,
    RelayTimeout,
    UnknownUser,
)
from tests.support.clients import Relay, RelayProcess, client, free_port, next_matching
from tests.support.clock import NOW

TIMEOUT = 30


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: Path) -> Relay:
    server = Relay(nursery, str(tmp_path / "relay.db"))
    await server.start()
    return server


def sent_by(sender: str) -> Any:
    return lambda event: event.sender.user_id == sender


async def test_the_readme_example_raises_unknown_user_itself(tmp_path: Path, relay: Relay) -> None:
    """README's "Using the library" against a fresh relay: bob does not exist.

    The error used to leave open_client inside an ExceptionGroup, which
    ``except UnknownUser`` does not catch.
    """
    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        with pytest.raises(UnknownUser) as raised:
            async with open_client(store, "127.0.0.1", relay.port, user_id="alice") as alice:
                await alice.send_direct("bob", b"hi Bob")
        assert raised.value.user_id == "bob"
        assert store.outbox() == []  # nothing was queued for a user the relay does not know
    finally:
        store.close()


class DiedHere(Exception):
    """The process dying at this point (the test's stand-in for kill -9)."""


async def test_a_registration_the_store_did_not_record_still_comes_online(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay stored alice's first device list; the client died before its store
    recorded that. At the next start the relay refuses the list as a registration
    (FORBIDDEN: the user exists), and the user that exists is this device's."""

    async def dies(self: Client, counter: int) -> None:
        raise DiedHere

    path = str(tmp_path / "alice.db")
    store = ClientStore.open(path)
    try:
        with monkeypatch.context() as patched, pytest.raises(DiedHere):
            patched.setattr(Client, "_set_registered", dies)
            async with open_client(store, "127.0.0.1", relay.port, user_id="alice"):
                pass
    finally:
        store.close()
    store = ClientStore.open(path)
    try:
        with trio.fail_after(TIMEOUT):
            async with open_client(store, "127.0.0.1", relay.port) as alice:
                assert alice.status is Status.READY
    finally:
        store.close()


async def test_a_user_id_someone_else_registered_is_refused_from_open_client(
    tmp_path: Path, relay: Relay
) -> None:
    """A new device under a user id the relay holds for another identity: no retry
    changes that, so open_client says so instead of trying forever."""
    async with client(tmp_path, relay, "bob"):
        pass
    store = ClientStore.open(str(tmp_path / "another-bob.db"))
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(Forbidden):
            async with open_client(store, "127.0.0.1", relay.port, user_id="bob"):
                pass
    finally:
        store.close()


async def test_a_send_during_an_outage_is_queued_at_once_and_sent_in_order_after(
    tmp_path: Path, relay: Relay
) -> None:
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"before")
        assert (await next_matching(bob, MessageReceived)).body == b"before"
        await relay.stop()
        with trio.fail_after(TIMEOUT):
            while alice.status is Status.READY:
                await trio.sleep(0.01)
        sent = []
        with trio.fail_after(1):  # no network wait: each is stored and returns
            for n in range(3):
                sent.append(await alice.send_direct("bob", b"during %d" % n))
        assert alice.pending_messages() == sent
        pending = [await next_matching(alice, MessagePending) for _ in sent]
        assert [(p.message_id, p.reason) for p in pending] == [(m, "NOT_CONNECTED") for m in sent]
        await relay.start()
        got = [(await next_matching(bob, MessageReceived)).body for _ in sent]
        assert got == [b"during 0", b"during 1", b"during 2"]
        done = [(await next_matching(alice, MessageSent)).message_id for _ in sent]
        assert done == sent and alice.pending_messages() == []


async def test_a_first_message_during_an_outage_is_encrypted_after_the_reconnect(
    tmp_path: Path, relay: Relay
) -> None:
    """No session with carol yet: the message waits unencrypted, in its place."""
    async with client(tmp_path, relay, "carol"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        await alice.refresh_device_list("carol")
        await relay.stop()
        with trio.fail_after(TIMEOUT):
            while alice.status is Status.READY:
                await trio.sleep(0.01)
        first = await alice.send_direct("carol", b"first contact, offline")
        [(_, queued)] = alice.store.outbox()
        assert isinstance(queued, QueuedMessage) and queued.message_id == first
        await relay.start()
        assert (await next_matching(alice, MessageSent)).message_id == first
    async with client(tmp_path, relay, "carol") as carol:
        got = await next_matching(carol, MessageReceived)
        assert (got.message_id, got.body) == (first, b"first contact, offline")


async def test_rate_limited_sends_are_paced_not_raised(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The relay allows 5 sends at once, 5 a second: 25 sends take about 4 seconds, none fails."""
    limits = RelayLimits(send_rate=RateLimit(5, 5))
    relay = Relay(nursery, str(tmp_path / "relay.db"), limits=limits)
    await relay.start()
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        with trio.fail_after(TIMEOUT):
            for n in range(25):
                await alice.send_direct("bob", b"burst %d" % n)
        got = [(await next_matching(bob, MessageReceived)).body for _ in range(25)]
        assert got == [b"burst %d" % n for n in range(25)]


async def test_a_concurrent_burst_to_a_user_and_a_group_is_paced_not_raised(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Many tasks send at once, beyond the relay's per-connection rate: every call returns
    its message id (none raises RateLimited) and every message arrives once."""
    limits = RelayLimits(send_rate=RateLimit(5, 5))
    relay = Relay(nursery, str(tmp_path / "relay.db"), limits=limits)
    await relay.start()
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "carol") as carol,
    ):
        group_id = await alice.create_group("burst", ["bob", "carol"])
        for member in (bob, carol):
            await next_matching(member, GroupUpdated)
        sent: list[bytes] = []

        async def direct(n: int) -> None:
            sent.append(await alice.send_direct("bob", b"direct %d" % n))

        async def in_group(n: int) -> None:
            sent.append(await alice.send_group(group_id, b"group %d" % n))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as burst:
                for n in range(15):
                    burst.start_soon(direct, n)
                    burst.start_soon(in_group, n)
        assert len(set(sent)) == 30
        got = [await next_matching(bob, MessageReceived) for _ in range(30)]
        assert sorted(e.body for e in got) == sorted(
            [b"direct %d" % n for n in range(15)] + [b"group %d" % n for n in range(15)]
        )
        got = [await next_matching(carol, MessageReceived) for _ in range(15)]
        assert sorted(e.body for e in got) == sorted(b"group %d" % n for n in range(15))


def count_logins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every login attempt a client makes, by user id."""
    attempts: list[str] = []
    real = connection_module.RelayConnection.authenticate

    async def counted(self: Any, user_id: str, *args: Any) -> None:
        attempts.append(user_id)
        await real(self, user_id, *args)

    monkeypatch.setattr(connection_module.RelayConnection, "authenticate", counted)
    return attempts


def wipe(db_path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.remove(db_path + suffix)


async def test_backoff_grows_across_refused_logins(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay lost alice, and someone else took her name: her logins are refused.

    The backoff used to start over after every connection the relay accepted,
    so a refused login was retried every reconnect_first_delay (here 0.05 s:
    about 40 times in 3 seconds).
    """
    attempts = count_logins(monkeypatch)
    async with client(tmp_path, relay, "alice", reconnect_max_delay=30) as alice:
        await relay.stop()
        wipe(relay.db_path)
        await relay.start()
        (tmp_path / "other").mkdir()
        async with client(tmp_path / "other", relay, "alice"):  # a new "alice", other keys
            pass
        refused = await next_matching(alice, UnknownToRelay)
        assert refused.reason == "AUTH_FAILED"
        assert alice.status is Status.UNKNOWN_TO_RELAY
        start = len(attempts)
        await trio.sleep(3)
        refused_logins = attempts[start:].count("alice")
    # 0.05 s growing 1.6 times (20 % jitter): at most 10 in 3 s.
    assert refused_logins <= 10, refused_logins


def count_connects(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each connection attempt a client makes starts (trio time)."""
    attempts: list[float] = []
    real = connection_module.connect_relay

    def counted(*args: Any, **kwargs: Any) -> Any:
        attempts.append(trio.current_time())
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "connect_relay", counted)
    return attempts


async def test_the_backoff_stops_growing_at_reconnect_max_delay(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay is gone for a while. The client's wait between attempts grows, but never
    beyond reconnect_max_delay (within the jitter): else after a long outage it would
    come back hours after its relay did."""
    attempts = count_connects(monkeypatch)
    async with client(tmp_path, relay, "alice", reconnect_max_delay=0.1) as alice:
        await relay.stop()
        await until(lambda: alice.status is not Status.READY)
        start = len(attempts)
        await trio.sleep(2)
        tried = len(attempts) - start
        await relay.start()
        await until(lambda: alice.status is Status.READY)
    # 0.05 s, 0.08 s, then 0.1 s (20 % jitter): at least 15 in 2 s; growing on, about 7.
    assert tried >= 12, tried


async def test_the_backoff_starts_over_once_connected(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage makes the wait between attempts grow to reconnect_max_delay; the client
    connects again. When that connection drops, the client must try again after
    reconnect_first_delay, not after the wait the earlier outage grew to."""
    attempts = count_connects(monkeypatch)
    async with client(tmp_path, relay, "alice", reconnect_max_delay=0.6) as alice:
        await relay.stop()
        await until(lambda: alice.status is not Status.READY)
        start = len(attempts)
        # 0.05 s growing 1.6 times reaches 0.6 s in about 1.3 s of attempts.
        await until(lambda: len(attempts) - start >= 7)
        await relay.start()
        await until(lambda: alice.status is Status.READY)
        dropped, gone = len(attempts), trio.current_time()
        await relay.stop()
        await relay.start()
        await until(lambda: len(attempts) > dropped)
        waited = attempts[dropped] - gone
    # About 0.1 s (the relay's stop, then 0.05 s); at least 0.48 s without the start over.
    assert waited < 0.3, waited


async def test_ctrl_c_as_the_connection_drops_stops_the_client(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trio raises a Ctrl-C's KeyboardInterrupt in the task that runs when it comes. One
    raised in a task of the connection as the relay dropped it, beside the receive loop's
    ConnectionClosed, must stop the client: it used to be dropped for that error, and the
    client connected again, so an app (the echo bot) never stopped on that Ctrl-C."""

    async def interrupted(self: Client, connection: connection_module.RelayConnection) -> None:
        # Work that reaches no checkpoint (the shield stands for it) from before the drop
        # until the receive loop has raised ConnectionClosed, and is interrupted then.
        with trio.CancelScope(shield=True):
            await connection.wait_closed()
            await trio.sleep(0.1)
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "_wake_receive_loop_on_close", interrupted)
    with trio.fail_after(5), pytest.raises(KeyboardInterrupt):
        async with client(tmp_path, relay, "alice"):
            await relay.stop()
            await trio.sleep_forever()


async def test_a_relay_restarted_on_an_empty_database(
    tmp_path: Path,
    relay: Relay,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Four connected users; the relay comes back with no database at all.

    Each says it is unknown to the relay once, registers again with the list
    it holds, uploads its prekeys again, and they all talk again: over the
    sessions they had, in their group, and with a newcomer who needs their
    prekeys. The clients kept retrying forever before, silently.
    """
    names = ["alice", "bob", "carol", "dave"]
    attempts = count_logins(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="hushchat.transport.client")
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "carol") as carol,
        client(tmp_path, relay, "dave") as dave,
    ):
        users = [alice, bob, carol, dave]
        group_id = await alice.create_group("four", names[1:])
        for member in users[1:]:
            await next_matching(member, GroupUpdated)
        await relay.stop()
        wipe(relay.db_path)
        await relay.start()
        with trio.fail_after(TIMEOUT):
            for user in users:
                await next_matching(user, UnknownToRelay)
                await next_matching(user, Reregistered)
                await next_matching(user, Connected)
        assert all(user.status is Status.READY for user in users)
        for sender, receiver in zip(users, users[1:] + users[:1], strict=True):
            await sender.send_direct(receiver.address.user_id, b"still here")
            got = await next_matching(receiver, MessageReceived)
            assert (got.sender.user_id, got.body) == (sender.address.user_id, b"still here")
        await dave.send_group(group_id, b"the group too")
        for member in users[:3]:
            got = await next_matching(member, MessageReceived, sent_by("dave"))
            assert (got.group_id, got.body) == (group_id, b"the group too")
        async with client(tmp_path, relay, "erin") as erin:
            for name in names:
                await erin.send_direct(name, b"hello from a newcomer")  # needs their bundles
            for user in users:
                assert (await next_matching(user, MessageReceived, sent_by("erin"))).body == (
                    b"hello from a newcomer"
                )
    # No log flood: at most two lines per client (refused, registered again), and the
    # relay's refused-login line at most once a minute.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    by_client = [r for r in warnings if r.name == "hushchat.client"]
    by_relay = [r for r in warnings if r.name == "hushchat.relay"]
    assert len(by_client) <= 2 * len(names), [r.getMessage() for r in by_client]
    assert len(by_relay) <= 1, [r.getMessage() for r in by_relay]
    assert len(warnings) == len(by_client) + len(by_relay)
    assert len(attempts) < 10 * len(names), len(attempts)


async def test_a_primary_that_linked_a_device_connects_again(tmp_path: Path, relay: Relay) -> None:
    """Its device list changed after registration: it must not register again.

    (It tried to publish the new list before logging in, which the relay
    refuses for a registered user, and so never connected again.)
    """
    async with client(tmp_path, relay, "alice") as alice:
        linked = ClientCore.create_linked("alice", 2, alice.core.user_identity_public, now=0)
        await alice.link_device(linked.device_entry)
    with trio.fail_after(TIMEOUT):
        async with client(tmp_path, relay, "alice") as alice:
            assert alice.status is Status.READY


async def test_fifty_clients_survive_a_relay_kill_under_load(tmp_path: Path) -> None:
    """50 users in a ring, each sending to the next; the relay is killed with SIGKILL.

    During the outage each sends once more (stored at once); every client is
    ready again soon after the relay listens again, and every message arrives,
    in order. (A send during an outage used to hold the client's lock for up
    to 30 s, delaying its reconnect, then fail with RelayTimeout.)
    """
    count = 50
    relay = RelayProcess(tmp_path / "relay.db")
    await relay.start()
    names = [f"user{n:02d}" for n in range(count)]
    received: dict[str, list[bytes]] = {name: [] for name in names}
    ready_again: dict[str, float] = {}
    expected: dict[str, list[bytes]] = {name: [] for name in names}
    phase = {"outage": False}

    async def run(index: int, task_status: trio.TaskStatus[Any]) -> None:
        name, peer = names[index], names[(index + 1) % count]
        async with client(tmp_path, relay, name, reconnect_first_delay=0.5) as c:
            task_status.started(c)

            async def read() -> None:
                async for event in c.events():
                    if isinstance(event, MessageReceived):
                        received[name].append(event.body)
                    elif isinstance(event, Connected) and phase["outage"]:
                        ready_again.setdefault(name, trio.current_time())

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                await trio.sleep_forever()
            del peer

    async with trio.open_nursery() as nursery:
        clients = [await nursery.start(run, n) for n in range(count)]

        async def send(index: int, body: bytes) -> None:
            peer = names[(index + 1) % count]
            expected[peer].append(body)
            await clients[index].send_direct(peer, body)

        for round_ in range(3):
            async with trio.open_nursery() as senders:
                for n in range(count):
                    senders.start_soon(send, n, b"%s before %d" % (names[n].encode(), round_))
        await relay.kill()
        phase["outage"] = True
        with trio.fail_after(5):
            async with trio.open_nursery() as senders:
                for n in range(count):
                    senders.start_soon(send, n, b"%s during" % names[n].encode())
        await trio.sleep(2)
        listening = await relay.start()
        with trio.fail_after(TIMEOUT):
            while len(ready_again) < count or received != expected:
                await trio.sleep(0.05)
        slowest = max(ready_again.values()) - listening
        print(f"{count} clients ready {slowest:.2f} s after the relay listened again")
        print(sorted(round(t - listening, 2) for t in ready_again.values()))
        nursery.cancel_scope.cancel()
    await relay.kill()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (mounting one needs root), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """A file that takes every free byte of ``folder``'s disk."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_is_reported_with_its_cause_and_the_client_recovers(
    tmp_path: Path, relay: Relay, small_disk: Path
) -> None:
    """Bob's store is on a disk that fills up: nothing is lost, and he carries on after.

    A commit on a full disk used to raise "cannot rollback - no transaction is
    active" (SQLite had rolled back already), hiding the cause.
    """
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(small_disk, relay, "bob", reconnect_max_delay=0.5) as bob,
    ):
        await alice.send_direct("bob", b"before")
        assert (await next_matching(bob, MessageReceived)).body == b"before"
        # The WAL must grow for the next write. Not while the client commits (its
        # receipt to alice, say) on the same connection: SQLite would refuse the
        # checkpoint as "database table is locked".
        async with bob._store_lock:
            bob.store.checkpoint()
        filler = fill(small_disk)
        with pytest.raises(StoreFull) as raised:
            await bob.send_direct("alice", b"x" * 60_000)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        assert "full" in str(raised.value) and "rollback" not in str(raised.value)
        assert bob.pending_messages() == []
        # What arrives meanwhile cannot be stored: it stays at the relay.
        await alice.send_direct("bob", b"while full 1")
        await alice.send_direct("bob", b"while full 2")
        lost = await next_matching(bob, Disconnected)
        assert lost.reason == "STORE_FULL"
        filler.unlink()
        got = [(await next_matching(bob, MessageReceived)).body for _ in range(2)]
        assert got == [b"while full 1", b"while full 2"]
        await bob.send_direct("alice", b"back")
        assert (await next_matching(alice, MessageReceived)).body == b"back"


async def test_an_envelope_whose_outcome_cannot_be_stored_stays_at_the_relay(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's store cannot write what an envelope produced (a full disk, an I/O error),
    once. That envelope must not have been acknowledged: the relay still holds it, it
    comes again on the next connection, and its message reaches the app. (The full-disk
    test above does not show it: which write meets the full disk first varies, and it
    passed with the acknowledgement sent before the commit.)"""
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"first")
        assert (await next_matching(bob, MessageReceived)).body == b"first"
        real_commit = bob.store.commit
        refused: list[bytes] = []

        def commit(changes: Any, **kwargs: Any) -> Any:
            if kwargs.get("processed") is not None and not refused:
                refused.append(kwargs["processed"][0])
                raise StoreFull("the disk is full")
            return real_commit(changes, **kwargs)

        monkeypatch.setattr(bob.store, "commit", commit)
        await alice.send_direct("bob", b"not stored the first time")
        lost = await next_matching(bob, Disconnected)
        assert lost.reason == "STORE_FULL"
        received = await next_matching(bob, MessageReceived)
        assert received.body == b"not stored the first time"
        assert len(refused) == 1


def processed_rows(store: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM processed").fetchone()[0])


async def test_processed_guids_are_forgotten_after_the_relay_would_have_expired_them(
    tmp_path: Path, relay: Relay
) -> None:
    """One row per envelope received, kept forever before (about 5 MB a day, chatty)."""
    clock = {"now": float(NOW)}
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(tmp_path, relay, "bob", clock=lambda: clock["now"]) as bob,
    ):
        for n in range(3):
            await alice.send_direct("bob", b"day one %d" % n)
            await next_matching(bob, MessageReceived)
        assert processed_rows(tmp_path / "bob.db") == 3
        clock["now"] += PROCESSED_MEMORY + 3600  # past what any redelivery could reach
        await alice.send_direct("bob", b"days later")
        await next_matching(bob, MessageReceived)
        with trio.fail_after(TIMEOUT):
            while processed_rows(tmp_path / "bob.db") != 1:
                await trio.sleep(0.05)


async def test_the_wal_stays_small(tmp_path: Path, relay: Relay) -> None:
    """Each store's WAL settled at about 4 MB (SQLite's default checkpoint at 1,000 pages)."""
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        for n in range(60):
            await alice.send_direct("bob", b"%d " % n + b"x" * 60_000)  # about 7 MB in all
            await next_matching(bob, MessageReceived)
        sizes = {name: os.path.getsize(tmp_path / f"{name}.db-wal") for name in ("alice", "bob")}
    assert max(sizes.values()) <= WAL_SIZE_LIMIT + 512 * 1024, sizes


async def ready_at(c: Client, address: tuple[str, int]) -> None:
    with trio.fail_after(TIMEOUT):
        while not (c.status is Status.READY and c.relay == address):
            await trio.sleep(0.01)


async def test_a_client_follows_its_relay_to_a_second_address(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The operator moves the relay (its database) to another port; the clients know both.

    The address used to be fixed at open_client: a moved relay was never found again.
    """
    first = Relay(nursery, str(tmp_path / "relay.db"))
    await first.start()
    second = Relay(nursery, str(tmp_path / "relay.db"))
    second.port = free_port()
    addresses = [("127.0.0.1", second.port)]
    async with (
        client(tmp_path, first, "alice", relays=addresses) as alice,
        client(tmp_path, first, "bob", relays=addresses) as bob,
    ):
        await alice.send_direct("bob", b"at the first address")
        assert (await next_matching(bob, MessageReceived)).body == b"at the first address"
        await first.stop()
        await second.start()
        for c in (alice, bob):
            await ready_at(c, ("127.0.0.1", second.port))
        await alice.send_direct("bob", b"at the second address")
        assert (await next_matching(bob, MessageReceived)).body == b"at the second address"


async def test_a_resolver_tells_where_the_relay_is_now(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    first = Relay(nursery, str(tmp_path / "relay.db"))
    await first.start()
    where = {"now": [("127.0.0.1", first.port)]}
    asked: list[int] = []

    async def resolve() -> list[tuple[str, int]]:
        asked.append(1)
        return where["now"]

    async with client(tmp_path, first, "bob"):
        pass  # registered at the relay
    async with client(tmp_path, first, "alice", resolver=resolve) as alice:
        await first.stop()
        second = Relay(nursery, str(tmp_path / "relay.db"))
        await second.start()
        where["now"] = [("127.0.0.1", second.port)]
        await ready_at(alice, ("127.0.0.1", second.port))
        assert asked
        async with client(tmp_path, second, "bob") as bob:
            await alice.send_direct("bob", b"found you")
            assert (await next_matching(bob, MessageReceived)).body == b"found you"


def test_relay_addresses_are_checked(tmp_path: Path) -> None:
    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        device = ClientCore.create_primary("alice", 1, now=NOW)
        for relays in ([("", 7400)], [("relay", 0)], [("relay", "7400")], ["relay:7400"]):
            with pytest.raises(InvalidArgument):
                Client(store, device, "127.0.0.1", 7400, relays=relays)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            Client(store, device, "127.0.0.1", 70000)
    finally:
        store.close()


async def test_a_refusal_while_preparing_a_send_waits_and_never_ends_the_connection(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle the relay cannot give yet (here UNKNOWN_DEVICE, as for a device whose list
    is still on its way) used to end the connection from the sending task."""
    from hushchat.transport.wire.errors import UnknownDevice

    real = connection_module.RelayConnection.fetch_bundle
    refused: list[str] = []

    async def not_yet(self: Any, user_id: str, device_id: int) -> bytes:
        if user_id == "carol" and len(refused) < 2:
            refused.append(user_id)
            raise UnknownDevice("not listed yet")
        return await real(self, user_id, device_id)

    async with client(tmp_path, relay, "carol"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        monkeypatch.setattr(connection_module.RelayConnection, "fetch_bundle", not_yet)
        first = await alice.send_direct("carol", b"for when the relay can")
        assert alice.pending_messages() == [first] and alice.status is Status.READY
        with trio.fail_after(TIMEOUT):
            while alice.pending_messages():
                await trio.sleep(0.05)
        assert len(refused) == 2 and alice.status is Status.READY
        with trio.move_on_after(0.2):
            lost = await next_matching(alice, Disconnected)
            pytest.fail(f"the connection ended: {lost}")
    async with client(tmp_path, relay, "carol") as carol:
        assert (await next_matching(carol, MessageReceived)).body == b"for when the relay can"


async def until(condition: Callable[[], bool]) -> None:
    """Wait (polling) until ``condition`` holds, at most TIMEOUT."""
    with trio.fail_after(TIMEOUT):
        while not condition():
            await trio.sleep(0.05)


async def bob_still_reads(carol: Client, bob: Client) -> None:
    """Carol's message reaches bob: his client is connected and receiving."""
    await carol.send_direct("bob", b"still reading")
    received = await next_matching(bob, MessageReceived, sent_by("carol"))
    assert received.body == b"still reading" and bob.status is Status.READY


def bob_s_fetches_of_dave(
    monkeypatch: pytest.MonkeyPatch, answer: Callable[[int], Awaitable[None]]
) -> list[int]:
    """Count bob's fetches of dave's bundle (the list it returns); each first awaits
    ``answer`` with its number, which may raise the relay's refusal, or wait."""
    real = connection_module.RelayConnection.fetch_bundle
    fetches: list[int] = []

    async def fetch(self: Any, user_id: str, device_id: int) -> bytes:
        if self.user_id == "bob" and user_id == "dave":
            fetches.append(device_id)
            await answer(len(fetches))
        return await real(self, user_id, device_id)

    monkeypatch.setattr(connection_module.RelayConnection, "fetch_bundle", fetch)
    return fetches


async def bob_s_rename_loses_to_alice_adding_dave(
    tmp_path: Path, relay: Relay, alice: Client
) -> bytes:
    """Bob's rename, stored as his connection ends, loses its epoch to alice's adding dave
    meanwhile: at bob's next connection it waits for dave's bundle. The group's id
    (carol, a member, must be registered)."""
    async with client(tmp_path, relay, "dave"):
        pass
    async with client(tmp_path, relay, "bob") as bob:
        group_id = await alice.create_group("race", ["bob", "carol"])
        await next_matching(bob, GroupUpdated)
        await alice.set_admin(group_id, "bob", True)
        await next_matching(bob, GroupUpdated, lambda e: e.author.user_id == "alice")
        await bob.send_group(group_id, b"sessions with everyone")
        bob._connection = None
        sends = bob.core.set_title(group_id, "bob's", now=bob.now())
        bob.store.commit(bob.core.take_changes(), sends=sends)
    await alice.add_member(group_id, "dave")
    return group_id


async def test_a_refusal_while_proposing_a_change_again_neither_ends_the_connection_nor_loses_it(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proposing bob's rename again needs dave's bundle. The relay refusing it (here
    NO_PREKEYS, as for a device that has not published its keys yet) ended bob's
    connection, and at every reconnect before any mail was read: bob received nothing
    until the relay gave the bundle. Now the change waits (the outbox's backoff) and
    goes once the bundle comes."""
    refusing = True

    async def not_yet(number: int) -> None:
        if refusing:
            raise NoPreKeys("the device has no prekeys")

    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "carol") as carol:
        group_id = await bob_s_rename_loses_to_alice_adding_dave(tmp_path, relay, alice)
        fetches = bob_s_fetches_of_dave(monkeypatch, not_yet)
        async with client(tmp_path, relay, "bob") as bob:
            await until(lambda: bool(fetches))
            await bob_still_reads(carol, bob)
            assert bob.core.waiting_changes() == (group_id,)
            refusing = False
            await until(lambda: alice.group(group_id).title == "bob's")
            assert set(alice.group(group_id).user_ids) == {"alice", "bob", "carol", "dave"}
            assert bob.status is Status.READY and bob.core.waiting_changes() == ()


async def test_a_waiting_change_that_mail_settles_while_it_is_proposed_again_is_let_be(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backoff's retry of bob's rename waits for dave's bundle; meanwhile alice
    removes bob, which drops the change. The retry then finds nothing waiting and lets
    it be (asked to propose it, the core would refuse: no change waits)."""
    removed = trio.Event()

    async def refused_then_slow(number: int) -> None:
        if number == 1:
            raise NoPreKeys("the device has no prekeys")
        await removed.wait()

    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "carol") as carol:
        group_id = await bob_s_rename_loses_to_alice_adding_dave(tmp_path, relay, alice)
        fetches = bob_s_fetches_of_dave(monkeypatch, refused_then_slow)
        async with client(tmp_path, relay, "bob") as bob:
            await until(lambda: len(fetches) == 2)  # the backoff's retry is fetching
            await alice.remove_member(group_id, "bob")
            failed = await next_matching(bob, GroupChangeFailed)
            assert failed.reason == "NOT_A_MEMBER" and bob.core.waiting_changes() == ()
            removed.set()
            await bob_still_reads(carol, bob)
            # The backoff it had is forgotten: the retry task goes quiet, rather than
            # finding a time long past and proposing nothing again and again.
            with trio.fail_after(TIMEOUT):
                await trio.testing.wait_all_tasks_blocked()


async def test_a_session_still_missing_when_the_change_is_proposed_again_leaves_it_waiting(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between fetching what bob's rename needs and proposing it, a member may gain a
    device (its list came with mail meanwhile): the core then answers MissingSessions,
    a local error, which must leave the change waiting, not end bob's run(). Played by
    bob starting no session with dave's device while the test says so."""
    from hushchat.transport.client.client import Client as ClientClass

    real = ClientClass._start_sessions
    skipped: list[list[Any]] = []
    skipping = True

    async def not_dave(self: Any, connection: Any, addresses: Any) -> None:
        addresses = list(addresses)
        if skipping and self.core.user_id == "bob" and any(a.user_id == "dave" for a in addresses):
            skipped.append(addresses)
            return
        await real(self, connection, addresses)

    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "carol") as carol:
        group_id = await bob_s_rename_loses_to_alice_adding_dave(tmp_path, relay, alice)
        monkeypatch.setattr(ClientClass, "_start_sessions", not_dave)
        async with client(tmp_path, relay, "bob") as bob:
            await until(lambda: bool(skipped))
            await bob_still_reads(carol, bob)
            assert bob.core.waiting_changes() == (group_id,)
            skipping = False
            await until(lambda: alice.group(group_id).title == "bob's")
            assert bob.status is Status.READY and bob.core.waiting_changes() == ()


async def test_a_relay_that_says_retry_at_once_does_not_spin_the_change_s_retry(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay (hostile or broken) refuses dave's bundle with RATE_LIMITED and a
    retry_after of 0, every time: bob's client must not ask again as fast as it can
    (it did: 8,171 refused fetches in one second, a core busy)."""

    async def at_once(number: int) -> None:
        raise RateLimited("ask again now", retry_after_ms=0)

    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "carol"):
        group_id = await bob_s_rename_loses_to_alice_adding_dave(tmp_path, relay, alice)
        refused = bob_s_fetches_of_dave(monkeypatch, at_once)
        async with client(tmp_path, relay, "bob") as bob:
            await until(lambda: bool(refused))
            with trio.fail_after(TIMEOUT):
                await trio.testing.wait_all_tasks_blocked()  # never, while it spins
            # One fetch, or a second one 2 s later on a slow machine; thousands when it spun.
            assert set(refused) == {1} and len(refused) <= 3
            assert bob.core.waiting_changes() == (group_id,) and bob.status is Status.READY


def test_reconnect_waits_are_spread_around_the_backoff() -> None:
    """Clients that lost one relay at once do not all come back at the same instant."""
    from hushchat.protocol.primitives import SeededRandom
    from hushchat.transport.client.client import RECONNECT_JITTER, jittered

    rng = SeededRandom(b"jitter")
    waits = [jittered(10.0, rng) for _ in range(200)]
    assert all(10 * (1 - RECONNECT_JITTER) <= w <= 10 * (1 + RECONNECT_JITTER) for w in waits)
    assert max(waits) - min(waits) > 10 * RECONNECT_JITTER  # spread over most of the range


async def test_a_group_change_whose_bundle_fetch_is_rate_limited_is_paced_not_raised(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay refuses a bundle a group change needs (its per-pair limit), saying when
    to ask again: the change waits that long and goes on, as messages do."""
    async with client(tmp_path, relay, "bob"):
        pass
    real_fetch = connection_module.RelayConnection.fetch_bundle
    refused: list[tuple[str, int]] = []

    async def limited_once(self: Any, user_id: str, device_id: int) -> Any:
        if not refused:
            refused.append((user_id, device_id))
            raise RateLimited("too many bundle fetches", retry_after_ms=200)
        return await real_fetch(self, user_id, device_id)

    monkeypatch.setattr(connection_module.RelayConnection, "fetch_bundle", limited_once)
    async with client(tmp_path, relay, "alice") as alice:
        with trio.fail_after(TIMEOUT):
            group_id = await alice.create_group("paced", ["bob"])
        assert refused == [("bob", 1)]
        assert alice.group(group_id).user_ids == ("alice", "bob")


async def test_a_group_change_is_refused_when_the_relay_asks_to_wait_too_long(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wait beyond the call's ready_timeout is the app's to decide: RateLimited, nothing sent."""
    async with client(tmp_path, relay, "bob"):
        pass

    async def limited(self: Any, user_id: str, device_id: int) -> Any:
        raise RateLimited("too many bundle fetches", retry_after_ms=3_600_000)

    monkeypatch.setattr(connection_module.RelayConnection, "fetch_bundle", limited)
    async with client(tmp_path, relay, "alice") as alice:
        with trio.fail_after(TIMEOUT), pytest.raises(RateLimited) as refused:
            await alice.create_group("too soon", ["bob"])
        assert refused.value.retry_after_ms == 3_600_000
        assert alice.core.group_ids == () and alice.store.outbox() == []


# A relay (hostile or broken) that answers RATE_LIMITED with a retry_after of 0, every
# time: the client must not ask it again as fast as it can. Each test counts the
# refused requests within a few seconds, raised locally (no round trip slows a spin).
WINDOW = 3.0


def refuse_at_once(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    wanted: Callable[..., bool] = lambda *args: True,
    *,
    retry_after_ms: int = 0,
) -> list[tuple[Any, ...]]:
    """RelayConnection.``method`` refused to alice with RATE_LIMITED, retry_after 0 (or
    ``retry_after_ms``), when ``wanted`` (given its arguments); the refused calls'
    arguments."""
    real = getattr(connection_module.RelayConnection, method)
    refused: list[tuple[Any, ...]] = []

    async def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.user_id == "alice" and wanted(*args):
            refused.append(args)
            raise RateLimited("ask again later", retry_after_ms=retry_after_ms)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(connection_module.RelayConnection, method, refuse)
    return refused


async def sends_to_bob_for_a_window(
    alice: Client, body: bytes, refused: list[tuple[Any, ...]]
) -> None:
    """alice sends ``body`` to bob and runs on for WINDOW: the relay's refusals, told to
    retry at once, come a few times only, and the message waits in the outbox."""
    with trio.move_on_after(WINDOW):
        await alice.send_direct("bob", body)
        await trio.sleep_forever()
    assert 1 < len(refused) <= 5
    assert len(alice.pending_messages()) == 1


async def test_a_group_change_the_relay_tells_to_retry_at_once_does_not_spin(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle a group change needs is refused with retry_after 0: the call waits
    between its fetches, and gives up (RateLimited) at its ready_timeout as before."""
    async with client(tmp_path, relay, "bob"):
        pass
    refused = refuse_at_once(monkeypatch, "fetch_bundle")
    async with client(tmp_path, relay, "alice", ready_timeout=WINDOW) as alice:
        with trio.fail_after(TIMEOUT), pytest.raises(RateLimited):
            await alice.create_group("at once", ["bob"])
        assert 1 < len(refused) <= 3
        assert alice.core.group_ids == () and alice.store.outbox() == []


async def test_a_send_the_relay_tells_to_retry_at_once_does_not_spin(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send refused with retry_after 0, again and again: the outbox waits between its
    attempts, says the message is pending, and sends it once the relay takes it."""
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"sessions up")
        await next_matching(bob, MessageReceived)
        refused = refuse_at_once(monkeypatch, "send_direct")
        with trio.move_on_after(WINDOW):
            await alice.send_direct("bob", b"refused for now")
            await trio.sleep_forever()
        assert 1 < len(refused) <= 5
        pending = await next_matching(alice, MessagePending)
        assert pending.reason == "RATE_LIMITED"
        assert alice.pending_messages() == [pending.message_id]
        monkeypatch.undo()
        got = await next_matching(bob, MessageReceived)
        assert (got.message_id, got.body) == (pending.message_id, b"refused for now")


async def test_a_send_the_relay_tells_to_wait_for_weeks_does_not_hold_the_call(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send refused with a retry_after of 2^32 ms (49 days): the call returns, the
    message waits in the outbox, pending, instead of the flusher sleeping that long."""
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"sessions up")
        await next_matching(bob, MessageReceived)
        refuse_at_once(monkeypatch, "send_direct", retry_after_ms=2**32)
        with trio.fail_after(WINDOW):
            message_id = await alice.send_direct("bob", b"kept")
        pending = await next_matching(alice, MessagePending)
        assert (pending.message_id, pending.reason) == (message_id, "RATE_LIMITED")
        assert alice.pending_messages() == [message_id]


async def test_a_send_the_relay_tells_to_wait_for_weeks_goes_after_retry_max_delay(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, once: the client waits what the relay says, but never more than
    RETRY_MAX_DELAY (here made 0.5 s), and then the send goes. A relay (hostile, or
    with a broken clock) must not park a message for 49 days."""
    monkeypatch.setattr(client_module, "RETRY_MAX_DELAY", 0.5)
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"sessions up")
        await next_matching(bob, MessageReceived)
        refused = refuse_at_once(
            monkeypatch, "send_direct", lambda *args: not refused, retry_after_ms=2**32
        )
        await alice.send_direct("bob", b"kept")
        received = await next_matching(bob, MessageReceived, timeout=WINDOW)
        assert received.body == b"kept" and len(refused) == 1


async def test_a_message_whose_preparation_the_relay_tells_to_retry_at_once_does_not_spin(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first message to bob waits for his bundle, refused with retry_after 0: the
    outbox must not make bob's destination due again at once."""
    async with client(tmp_path, relay, "bob"):
        pass
    refused = refuse_at_once(monkeypatch, "fetch_bundle")
    async with client(tmp_path, relay, "alice") as alice:
        await sends_to_bob_for_a_window(alice, b"first contact", refused)


async def test_a_rebuilt_send_whose_bundle_the_relay_tells_to_retry_at_once_does_not_spin(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob linked a second device: alice's send is refused for her old list, and the
    bundle of the new device, needed to rebuild it, with retry_after 0. The rebuilt
    send's destination must not be due again at once (each time: a send refused for
    the list, a fetch refused)."""
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"before the desktop")
        await next_matching(bob, MessageReceived)
        desktop = ClientCore.create_linked("bob", 2, bob.core.user_identity_public, now=bob.now())
        await bob.link_device(desktop.device_entry)
        refused = refuse_at_once(monkeypatch, "fetch_bundle", lambda user, device: device == 2)
        await sends_to_bob_for_a_window(alice, b"to both of bob's devices", refused)


async def test_an_app_that_reads_and_sends_in_one_task_is_not_stuck_by_its_full_queue(
    tmp_path: Path, relay: Relay
) -> None:
    """The app reads its events and sends from one task, and has not read for a while:
    its event queue is full. Bob linked a second device, so alice's send is refused for
    her old list of his devices and rebuilt by the flusher, which learns DeviceAdded.
    The send must return (the flusher must not wait for the app to read while the app
    waits for the flusher), and every event come when the app reads: nothing lost."""
    queue_size = 4
    unread = [b"unread %d" % n for n in range(queue_size + 2)]
    async with client(tmp_path, relay, "bob") as bob:
        async with client(tmp_path, relay, "alice", event_queue_size=queue_size) as alice:
            await alice.send_direct("bob", b"before the desktop")
            await next_matching(bob, MessageReceived)
            for body in unread:
                await bob.send_direct("alice", body)
            await until(lambda: alice._events_in.statistics().current_buffer_used == queue_size)
            desktop = ClientCore.create_linked(
                "bob", 2, bob.core.user_identity_public, now=bob.now()
            )
            await bob.link_device(desktop.device_entry)
            async with client(tmp_path, relay, "bob-desktop", device=desktop):
                pass  # its prekeys are at the relay
            with trio.fail_after(TIMEOUT):
                await alice.send_direct("bob", b"to both of bob's devices")
            received: list[bytes] = []
            added: list[DeviceAdded] = []
            with trio.fail_after(TIMEOUT):
                async for event in alice.events():
                    if isinstance(event, MessageReceived):
                        received.append(event.body)
                    elif isinstance(event, DeviceAdded):
                        added.append(event)
                    if received == unread and added:
                        break
            assert [a.address for a in added] == [Address("bob", 2)]
        got = await next_matching(bob, MessageReceived, sent_by("alice"))
        assert got.body == b"to both of bob's devices"


async def bodies_read(alice: Client, count: int) -> list[bytes]:
    """The bodies of the next ``count`` messages alice reads (other events passed over)."""
    received: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async for event in alice.events():
            if isinstance(event, MessageReceived):
                received.append(event.body)
                if len(received) == count:
                    break
    return received


async def stop_with_mail_untaken(
    tmp_path: Path, relay: Relay, bob: Client, unread: list[bytes]
) -> None:
    """Alice connects, takes what came before, and stops with ``unread`` from bob stored
    in her inbox and not taken."""
    async with client(tmp_path, relay, "alice") as alice:
        await alice.send_direct("bob", b"sessions up")
        await next_matching(alice, MessageDelivered)  # what came before is taken
        for body in unread:
            await bob.send_direct("alice", body)
        await until(
            lambda: (
                sum(isinstance(e, MessageReceived) for _, e in alice.store.inbox()) == len(unread)
            )
        )


async def test_an_app_that_reads_and_sends_in_one_task_can_send_with_a_queue_full_at_start(
    tmp_path: Path, relay: Relay
) -> None:
    """The events stored and not taken when the app stopped come first at the next start.
    As many as the queue holds: connected, the client waited for room for its Connected
    notice before it started its flusher, so the app's first send, from the task that
    reads, waited for a flush pass that never came."""
    unread = [b"unread %d" % n for n in range(4)]
    async with client(tmp_path, relay, "bob") as bob:
        await stop_with_mail_untaken(tmp_path, relay, bob, unread)
        store = ClientStore.open(str(tmp_path / "alice.db"))
        stored = len(store.inbox())
        store.close()
        async with client(tmp_path, relay, "alice", event_queue_size=stored) as alice:
            with trio.fail_after(TIMEOUT):
                await alice.send_direct("bob", b"after the restart")
            assert await bodies_read(alice, len(unread)) == unread
        await next_matching(bob, MessageReceived, lambda e: e.body == b"after the restart")


async def test_outages_while_the_app_does_not_read_pile_up_no_notices_without_bound(
    tmp_path: Path, relay: Relay
) -> None:
    """The app does not read its events for a while, but sends; meanwhile its relay
    (hostile, or a flapping network) is gone, comes back and goes again. Each turn, and
    each round of connection attempts while it is gone, is a notice for the app
    (Disconnected, Connected): while it does not read they must not pile up without
    bound (the relay's outages last as long as they like). When it reads, it learns that
    the connection went and came back, and that it is connected now; nothing is lost.

    Bob's receipts for alice's sends are events too, and they may come between two
    turns' notices (when depends on the scheduling): notices fold only while nothing
    else waits between them, so what is bounded is each run of them in a row."""
    queue_size, turns = 4, 5
    async with (
        client(tmp_path, relay, "bob") as bob,
        client(
            tmp_path, relay, "alice", event_queue_size=queue_size, reconnect_max_delay=0.05
        ) as alice,
    ):
        sent = []
        for n in range(turns):
            await until(lambda: alice.pending_messages() == [])  # no send cut short
            await relay.stop()
            # Its send finds the connection gone (nothing else would, the app not reading).
            sent.append(await alice.send_direct("bob", b"turn %d" % n))
            await until(lambda: alice.status is not Status.READY)
            await trio.sleep(0.5)  # rounds of connection attempts
            await relay.start()
            await until(lambda: alice.status is Status.READY)
        await bob.send_direct("alice", b"after the turns")
        read: list[ClientEvent] = []
        with trio.fail_after(TIMEOUT):
            async for event in alice.events():
                read.append(event)
                if isinstance(event, MessageReceived):
                    assert event.body == b"after the turns"
                    break
        status = [e for e in read if is_notice(e)]
        assert isinstance(status[-1], Connected)
        assert any(isinstance(s, Disconnected) for s in status)
        # The queue's events went in as they came; what waited behind, folded: each
        # run of notices there at most 3, however many rounds of attempts were made.
        waited = read[queue_size:]
        runs = [len(list(run)) for notice, run in groupby(waited, is_notice) if notice]
        assert all(run <= 3 for run in runs), [type(e).__name__ for e in read]
        got = [(await next_matching(bob, MessageReceived, sent_by("alice"))).body for _ in sent]
        assert got == [b"turn %d" % n for n in range(turns)]


def test_notices_waiting_for_the_app_fold_from_the_first_two(tmp_path: Path) -> None:
    """The fold of Client._queue_status, as its docstring says, from the first notices
    that wait on: of two alike in a row the later stands for both; of went, came, went,
    came the first and the last stay."""
    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        device = ClientCore.create_primary("alice", 1, now=NOW)
        alice = Client(store, device, "127.0.0.1", 1, event_queue_size=0)  # all must wait
        alice._queue_status(Disconnected("CONNECT_FAILED"))
        alice._queue_status(Disconnected("CONNECTION_REFUSED"))
        assert [e for _, e in alice._backlog] == [Disconnected("CONNECTION_REFUSED")]
        alice._queue_status(Connected())
        alice._queue_status(Disconnected("CONNECT_FAILED"))
        alice._queue_status(Connected())
        assert [e for _, e in alice._backlog] == [
            Disconnected("CONNECTION_REFUSED"),
            Connected(),
        ]
    finally:
        store.close()


def is_notice(event: ClientEvent) -> bool:
    return isinstance(event, Connected | Disconnected)


async def in_a_group_with_a_full_queue(alice: Client, bob: Client, unread: list[bytes]) -> bytes:
    """Alice makes a group with bob, then her queue fills (fill_the_queue). The group."""
    group_id = await alice.create_group("titles", ["bob"])
    await next_matching(bob, GroupUpdated)
    await until(lambda: not alice.core.has_pending_change(group_id))
    await fill_the_queue(alice, bob, unread)
    return group_id


async def fill_the_queue(alice: Client, bob: Client, unread: list[bytes]) -> None:
    """Bob sends alice ``unread``, more than her event queue holds while she does not
    read: the queue is full and mail waits."""
    for body in unread:
        await bob.send_direct("alice", body)
    await until(lambda: len(alice._backlog) > 0)


async def test_an_app_that_reads_and_changes_a_group_in_one_task_is_not_stuck_by_its_full_queue(
    tmp_path: Path, relay: Relay
) -> None:
    """The app reads its events and changes a group from one task, and has not read for
    a while: its event queue is full, so the client takes no more mail. Its second
    change of the group waits for the first to take effect, which the relay's receipt,
    mail, tells. The change must not wait for the app to read while the app waits for
    the change (it timed out with RelayTimeout), and every event come when the app
    reads: nothing lost, in order."""
    queue_size = 2
    unread = [b"unread %d" % n for n in range(queue_size + 2)]
    async with (
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "alice", event_queue_size=queue_size, ready_timeout=10) as alice,
    ):
        group_id = await in_a_group_with_a_full_queue(alice, bob, unread)
        with trio.fail_after(TIMEOUT):
            await alice.set_title(group_id, "first")
            await alice.set_title(group_id, "second")  # once "first" took effect
        received: list[bytes] = []
        changes = 0
        with trio.fail_after(TIMEOUT):
            async for event in alice.events():
                if isinstance(event, MessageReceived):
                    received.append(event.body)
                elif isinstance(event, GroupUpdated) and event.author.user_id == "alice":
                    changes += 1
                    if changes == 2:
                        break
        assert received == unread
        assert alice.group(group_id).title == "second"
        await until(lambda: bob.group(group_id).title == "second")


async def test_mail_taken_for_a_waiting_change_while_the_app_does_not_read_is_bounded(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but more mail comes before the receipt than the client takes for a
    waiting change beyond the app's full queue (a flood from a hostile member, say): the
    events waiting for the app must stay within that bound, the change time out as it
    did before, and every event still come, in order, when the app reads."""
    bound, queue_size = 3, 2
    monkeypatch.setattr(client_module, "MAX_BACKLOG_FOR_AWAITED_MAIL", bound)
    unread = [b"unread %d" % n for n in range(queue_size + bound + 4)]
    async with (
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "alice", event_queue_size=queue_size, ready_timeout=2) as alice,
    ):
        group_id = await in_a_group_with_a_full_queue(alice, bob, unread)
        longest = 0

        async def watch() -> None:
            nonlocal longest
            while True:
                longest = max(longest, len(alice._backlog))
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await alice.set_title(group_id, "first")
            with pytest.raises(RelayTimeout):
                await alice.set_title(group_id, "second")
            nursery.cancel_scope.cancel()
        assert longest <= bound
        assert await bodies_read(alice, len(unread)) == unread
        await until(lambda: not alice.core.has_pending_change(group_id))
        assert alice.group(group_id).title == "first"


async def test_a_client_run_again_hands_each_stored_event_once(
    tmp_path: Path, relay: Relay
) -> None:
    """The app builds its Client and runs it in a nursery of its own; it stops the run
    (going to the background, say, or after RelayNameMismatch) and runs it again. The
    events stored and not yet taken when it started must come once each, not once per
    run, and a second run at the same time is refused: one client, one connection."""
    unread = [b"unread 1", b"unread 2"]
    async with client(tmp_path, relay, "bob") as bob:
        await stop_with_mail_untaken(tmp_path, relay, bob, unread)
        store = ClientStore.open(str(tmp_path / "alice.db"))
        try:
            device = load_or_create_core(store)
            alice = Client(store, device, "127.0.0.1", relay.port, reconnect_first_delay=0.05)
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as first_run:
                    await first_run.start(alice.run)
                    first_run.cancel_scope.cancel()
                await nursery.start(alice.run)
                await bob.send_direct("alice", b"after the second start")
                received = await bodies_read(alice, len(unread) + 1)
                assert received == [*unread, b"after the second start"]
                with trio.fail_after(TIMEOUT), pytest.raises(InvalidArgument):
                    await alice.run()
                nursery.cancel_scope.cancel()
        finally:
            store.close()


async def test_an_event_the_app_failed_while_handling_comes_again(
    tmp_path: Path, relay: Relay
) -> None:
    """The app is handed a message and fails while handling it (an exception leaves
    open_client's block; its process dying is the same to the store). The event must
    come again on the next start: a stored event is deleted only when the app asks for
    the next one or leaves the block normally, never when it is handed over."""

    class AppFailed(Exception):
        pass

    async with client(tmp_path, relay, "bob") as bob:
        with pytest.raises(AppFailed):
            async with client(tmp_path, relay, "alice") as alice:
                await bob.send_direct("alice", b"being handled")
                await next_matching(alice, MessageReceived)
                raise AppFailed
        async with client(tmp_path, relay, "alice") as alice:
            await bob.send_direct("alice", b"after the restart")
            got = [(await next_matching(alice, MessageReceived)).body for _ in range(2)]
    assert got == [b"being handled", b"after the restart"]


async def test_an_operation_that_needs_the_relay_gives_up_after_ready_timeout(
    tmp_path: Path, relay: Relay
) -> None:
    """The relay is gone. An app call that needs it (fetching a device list, a group
    change, linking a device) waits for a connection at most ready_timeout, then raises
    RelayTimeout: it must not hang for as long as the outage lasts."""
    async with client(tmp_path, relay, "alice", ready_timeout=0.5) as alice:
        await relay.stop()
        await until(lambda: alice.status is not Status.READY)
        start = trio.current_time()
        with trio.fail_after(5), pytest.raises(RelayTimeout):
            await alice.refresh_device_list("bob")
        assert trio.current_time() - start >= 0.5
        await relay.start()


async def test_a_connection_lost_while_the_app_does_not_read_is_noticed(
    tmp_path: Path, relay: Relay
) -> None:
    """The app has not read for a while (its queue is full, the client takes no mail)
    and sends nothing; meanwhile the relay goes. The client's status must say so, and the
    client reconnect when the relay is back, without waiting for the app to read or send
    (it stayed READY over a dead connection). Reading, the app learns it all, nothing
    lost."""
    queue_size = 2
    unread = [b"unread %d" % n for n in range(queue_size + 2)]
    async with (
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "alice", event_queue_size=queue_size) as alice,
    ):
        await fill_the_queue(alice, bob, unread)
        await relay.stop()
        await until(lambda: alice.status is not Status.READY)
        await relay.start()
        await until(lambda: alice.status is Status.READY)
        received: list[bytes] = []
        status: list[Connected | Disconnected] = []
        with trio.fail_after(TIMEOUT):
            async for event in alice.events():
                if isinstance(event, Connected | Disconnected):
                    status.append(event)
                elif isinstance(event, MessageReceived):
                    received.append(event.body)
                    if len(received) == len(unread):
                        break
        assert received == unread
        assert any(isinstance(s, Disconnected) for s in status)


async def test_an_app_with_an_unbuffered_event_queue_gets_its_events(
    tmp_path: Path, relay: Relay
) -> None:
    """``event_queue_size`` 0: nothing is buffered, every event is handed over as the app
    asks for it (a trio channel without a buffer). The app, reading, gets each in order."""
    async with (
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "alice", event_queue_size=0) as alice,
    ):
        await bob.send_direct("alice", b"first")
        await bob.send_direct("alice", b"second")
        with trio.fail_after(TIMEOUT):
            got = [(await next_matching(alice, MessageReceived)).body for _ in range(2)]
        assert got == [b"first", b"second"]
