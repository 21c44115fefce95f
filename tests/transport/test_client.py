"""The client library end to end against an in-process relay on 127.0.0.1, port 0."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from hushchat.protocol.client_core import (
    ClientCore,
    GroupUpdated,
    MessageReceived,
    MessageSentByOtherDevice,
    RecordKey,
)
from hushchat.protocol.consts import MAX_PLAINTEXT_SIZE, SIGNED_PREKEY_ROTATION_AGE
from hushchat.protocol.errors import InvalidArgument, LimitExceeded
from hushchat.transport.client.client import (
    MAX_SEND_ATTEMPTS,
    Client,
    ClientEvent,
    MailExpired,
    SendDropped,
    SendFailed,
    load_or_create_core,
    open_client,
)
from hushchat.transport.client.store import ClientStore, StoreFailed, StoreLocked
from hushchat.transport.relay.config import RelayLimits, wall_clock_ms
from hushchat.transport.wire.errors import ConnectionClosed
from tests.support.clients import TIMEOUT, Relay, client, next_matching
from tests.support.clock import NOW
from tests.support.paths import REPO


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: Path) -> Relay:
    server = Relay(nursery, str(tmp_path / "relay.db"))
    await server.start()
    return server


def texts(event: ClientEvent) -> bool:
    return isinstance(event, MessageReceived)


async def test_direct_and_group_flows(tmp_path: Path, relay: Relay) -> None:
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "carol") as carol,
    ):
        await alice.send_direct("bob", b"hello bob")
        got = await next_matching(bob, MessageReceived)
        assert (got.sender.user_id, got.body, got.group_id) == ("alice", b"hello bob", None)

        group_id = await alice.create_group("trio", ["bob", "carol"])
        for member in (bob, carol):
            update = await next_matching(member, GroupUpdated)
            assert update.joined and update.group_id == group_id
        await alice.send_group(group_id, b"hello group")
        for member in (bob, carol):
            got = await next_matching(member, MessageReceived)
            assert (got.body, got.group_id) == (b"hello group", group_id)

        await bob.send_group(group_id, b"bob here")
        for member in (alice, carol):
            got = await next_matching(member, MessageReceived)
            assert (got.sender.user_id, got.body) == ("bob", b"bob here")

        # Removal: carol reads nothing bob sends afterwards.
        await alice.remove_member(group_id, "carol")
        await next_matching(bob, GroupUpdated)
        await next_matching(carol, GroupUpdated)
        await bob.send_group(group_id, b"after carol left")
        got = await next_matching(alice, MessageReceived)
        assert got.body == b"after carol left"
        assert group_id not in carol.core.group_ids


async def test_two_admins_changing_at_once_end_in_one_state(tmp_path: Path, relay: Relay) -> None:
    # Each admin makes two changes in a row (the second waits for the first to take
    # effect) while the other does the same; every change goes through the relay's
    # order, the losers are proposed again, and all three end in one state.
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "carol") as carol,
        client(tmp_path, relay, "dave") as dave,
    ):
        group_id = await alice.create_group("race", ["bob", "carol"])
        for member in (bob, carol):
            await next_matching(member, GroupUpdated)
        await alice.set_admin(group_id, "bob", True)
        await next_matching(bob, GroupUpdated, lambda e: e.author.user_id == "alice")

        async def alice_changes() -> None:
            await alice.set_title(group_id, "alice's")
            await alice.add_member(group_id, "dave")

        async def bob_changes() -> None:
            await bob.set_title(group_id, "bob's")
            await bob.set_admin(group_id, "carol", True)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice_changes)
                nursery.start_soon(bob_changes)
            await next_matching(dave, GroupUpdated, lambda e: e.joined)
            while True:
                views = {
                    (c.group(group_id).epoch, c.group(group_id).state_hash)
                    for c in (alice, bob, carol, dave)
                }
                epochs = {epoch for epoch, _ in views}
                if len(views) == 1 and epochs == {5}:
                    break
                await trio.sleep(0.05)
        state = alice.group(group_id)
        assert set(state.user_ids) == {"alice", "bob", "carol", "dave"}
        assert set(state.admins) == {"alice", "bob", "carol"}
        assert state.title in {"alice's", "bob's"}


async def test_offline_delivery_and_relay_restart(tmp_path: Path, relay: Relay) -> None:
    async with client(tmp_path, relay, "bob"):
        pass  # registered, prekeys published, then offline
    async with client(tmp_path, relay, "alice") as alice:
        await alice.send_direct("bob", b"while you were away")
        await alice.send_direct("bob", b"second")
    # The relay restarts with the envelopes queued in its database.
    await relay.stop()
    await relay.start()
    async with client(tmp_path, relay, "bob") as bob:
        first = await next_matching(bob, MessageReceived)
        second = await next_matching(bob, MessageReceived)
        assert [first.body, second.body] == [b"while you were away", b"second"]


async def test_restarted_client_sends_its_pending_outbox(tmp_path: Path, relay: Relay) -> None:
    async with client(tmp_path, relay, "bob"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        await alice.send_direct("bob", b"session warm-up")
        # Encrypted and persisted, but the process "dies" before sending.
        core = alice.core
        _, sends = core.send_direct("bob", b"pending across a restart", now=alice.now())
        alice.store.commit(core.take_changes(), sends=sends)
        alice._connection = None
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        bodies = [(await next_matching(bob, MessageReceived)).body for _ in range(2)]
        assert bodies == [b"session warm-up", b"pending across a restart"]
        assert alice.store.outbox() == []


async def mail_for_offline_bob(tmp_path: Path, relay: Relay, *bodies: bytes) -> None:
    """Bob registered and offline; alice sends him ``bodies``."""
    async with client(tmp_path, relay, "bob"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        for body in bodies:
            await alice.send_direct("bob", body)


async def test_redelivery_after_lost_ack_reaches_the_app_once(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    await mail_for_offline_bob(tmp_path, relay, b"exactly once", b"and the next")
    from hushchat.transport.client import connection as connection_module

    real_ack = connection_module.RelayConnection.ack
    failed: list[bytes] = []

    async def flaky_ack(self: Any, *guids: bytes) -> None:
        if not failed:
            failed.extend(guids)
            await self.aclose()  # the connection dies after the commit, before the ack
            raise ConnectionClosed("simulated crash before ack")
        await real_ack(self, *guids)

    monkeypatch.setattr(connection_module.RelayConnection, "ack", flaky_ack)
    async with client(tmp_path, relay, "bob") as bob:
        bodies = [(await next_matching(bob, MessageReceived)).body for _ in range(2)]
    assert bodies == [b"exactly once", b"and the next"]
    assert failed


async def test_a_backlog_is_acknowledged_in_batches(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = [b"offline %d" % index for index in range(20)]
    await mail_for_offline_bob(tmp_path, relay, *sent)
    from hushchat.transport.client import connection as connection_module

    real_ack = connection_module.RelayConnection.ack
    acks: list[int] = []

    async def counted_ack(self: Any, *guids: bytes) -> None:
        acks.append(len(guids))
        await real_ack(self, *guids)

    monkeypatch.setattr(connection_module.RelayConnection, "ack", counted_ack)
    async with client(tmp_path, relay, "bob") as bob:
        bodies = [(await next_matching(bob, MessageReceived)).body for _ in range(20)]
        with trio.fail_after(5):
            while sum(acks) < 20:
                await trio.sleep(0.01)
    assert bodies == sent
    assert sum(acks) == 20 and len(acks) < 20  # every envelope once, in fewer round trips


async def test_receiving_does_not_wait_for_an_acks_reply(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay answers a connection's requests in order, so an ACK's reply can wait for
    the commit of a send before it: messages that arrive meanwhile reach the app at once,
    and are acknowledged together once that reply came."""
    from hushchat.transport.client import connection as connection_module

    real_ack = connection_module.RelayConnection.ack
    acks: list[int] = []
    reply = trio.Event()

    async def late_ack(self: Any, *guids: bytes) -> None:
        if self.user_id == "bob":
            acks.append(len(guids))
            if len(acks) == 1:
                await reply.wait()  # bob's first ACK's reply is held back
        await real_ack(self, *guids)

    monkeypatch.setattr(connection_module.RelayConnection, "ack", late_ack)
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"first")
        assert (await next_matching(bob, MessageReceived)).body == b"first"
        for body in (b"second", b"third"):
            await alice.send_direct("bob", body)
            assert (await next_matching(bob, MessageReceived)).body == body
        assert acks == [1]  # both received while the first ACK waits for its reply
        reply.set()
        with trio.fail_after(TIMEOUT):
            while sum(acks) < 3:
                await trio.sleep(0.01)
        assert acks == [1, 2]  # what was received meanwhile, in one ACK


async def test_second_device_gets_messages_and_copies(tmp_path: Path, relay: Relay) -> None:
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"before the desktop")
        await next_matching(bob, MessageReceived)
        desktop_core = ClientCore.create_linked(
            "bob", 2, bob.core.user_identity_public, now=bob.now()
        )
        await bob.link_device(desktop_core.device_entry)
        store = ClientStore.open(str(tmp_path / "bob-desktop.db"))
        try:
            async with open_client(store, "127.0.0.1", relay.port, device=desktop_core) as desktop:
                # Alice's cached list is stale: the relay refuses, she rebuilds for both devices.
                await alice.send_direct("bob", b"to both of bob's devices")
                for device in (bob, desktop):
                    got = await next_matching(device, MessageReceived)
                    assert got.body == b"to both of bob's devices"
                await bob.send_direct("alice", b"from the phone")
                copy = await next_matching(desktop, MessageSentByOtherDevice)
                assert (copy.to_user, copy.body) == ("alice", b"from the phone")
        finally:
            store.close()


def test_a_store_has_one_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "one.db")
    store = ClientStore.open(path)
    try:
        with pytest.raises(StoreLocked):
            ClientStore.open(path)
        probe = (
            "import sys; from hushchat.transport.client.store import ClientStore, StoreLocked\n"
            "try:\n    ClientStore.open(sys.argv[1])\nexcept StoreLocked:\n    sys.exit(3)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, "-c", probe, path], env=env, check=False)
        assert result.returncode == 3
    finally:
        store.close()
    ClientStore.open(path).close()  # free again once closed


def test_a_write_that_fails_midway_leaves_the_store_as_it_was_and_usable(
    tmp_path: Path,
) -> None:
    """A commit fails after part of its transaction was written, with an error SQLite
    does not roll back by itself (a trigger refuses the inbox row here; a statement's
    I/O error is the same to it). It raises StoreFailed, and none of it may stay: not
    the record it wrote first, not even once a later commit succeeds, and that later
    commit must succeed (before, a transaction left open refused every write after)."""
    path = str(tmp_path / "s.db")
    store = ClientStore.open(path)
    try:
        store._db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON inbox BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        with pytest.raises(StoreFailed):
            store.commit(
                {RecordKey.SYNCED: b"\x01"}, events=[SendFailed(bytes(16), "MAILBOX_FULL")]
            )
        store._db.execute("DROP TRIGGER refuse")
        store.commit({RecordKey.PUBLISHED_PREKEYS: bytes(4)})
        assert store.record(RecordKey.SYNCED) is None
    finally:
        store.close()
    reopened = ClientStore.open(path)
    try:
        assert reopened.record(RecordKey.SYNCED) is None
        assert reopened.record(RecordKey.PUBLISHED_PREKEYS) == bytes(4)
        assert reopened.inbox() == []
    finally:
        reopened.close()


async def test_relay_database_holds_no_plaintext(tmp_path: Path, relay: Relay) -> None:
    markers = [b"PLAINTEXT-MARKER-direct-7f3a", b"PLAINTEXT-MARKER-group-91c2"]
    async with client(tmp_path, relay, "bob"):
        pass
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "carol"):
        await alice.send_direct("bob", markers[0])
        group_id = await alice.create_group("g", ["bob", "carol"])
        await alice.send_group(group_id, markers[1])
    await relay.stop()  # flush and close the database
    stored = b"".join(
        Path(relay.db_path + suffix).read_bytes()
        for suffix in ("", "-wal")
        if Path(relay.db_path + suffix).exists()
    )
    assert len(stored) > 0
    for marker in markers:
        assert marker not in stored


async def test_linked_device_receives_existing_groups(tmp_path: Path, relay: Relay) -> None:
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        group_id = await alice.create_group("before the desktop", ["bob"])
        await next_matching(bob, GroupUpdated)
        await alice.send_group(group_id, b"old news")
        await next_matching(bob, MessageReceived)

        desktop_core = ClientCore.create_linked(
            "alice", 2, alice.core.user_identity_public, now=alice.now()
        )
        await alice.link_device(desktop_core.device_entry)
        store = ClientStore.open(str(tmp_path / "alice-desktop.db"))
        try:
            async with open_client(store, "127.0.0.1", relay.port, device=desktop_core) as desktop:
                synced = await next_matching(desktop, GroupUpdated)
                assert synced.joined and synced.group_id == group_id
                assert desktop.group(group_id) == alice.group(group_id)
                # The phone shared its sender key with the sync; bob sends his on first use.
                await alice.send_group(group_id, b"from alice's phone")
                got = await next_matching(desktop, MessageReceived)
                assert (got.sender.device_id, got.body) == (1, b"from alice's phone")
                await bob.send_group(group_id, b"from bob")
                got = await next_matching(desktop, MessageReceived)
                assert (got.sender.user_id, got.body) == ("bob", b"from bob")
        finally:
            store.close()


async def test_a_bad_device_list_from_the_relay_does_not_stop_the_client(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hushchat.protocol.client_core import Undecryptable
    from hushchat.transport.client import connection as connection_module

    real_fetch = connection_module.RelayConnection.fetch_device_list
    served: list[str] = []

    async def forged_once(self: Any, user_id: str) -> bytes:
        if user_id == "alice" and not served:
            served.append(user_id)
            return b"\x92\xc4\x01x\xc4\x01y"  # a "signed list" that does not verify
        return await real_fetch(self, user_id)

    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        monkeypatch.setattr(connection_module.RelayConnection, "fetch_device_list", forged_once)
        await alice.send_direct("bob", b"first")
        refused = await next_matching(bob, Undecryptable)
        assert (refused.sender.user_id, refused.reason) == ("alice", "UNKNOWN_DEVICE")
        await alice.send_direct("bob", b"second")  # still carries the handshake
        got = await next_matching(bob, MessageReceived)
        assert got.body == b"second"


async def test_a_send_refused_for_its_device_list_each_time_is_dropped(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hushchat.protocol.client_core import Send
    from hushchat.transport.client import connection as connection_module
    from hushchat.transport.wire.errors import DeviceListMismatch

    tries: list[bytes] = []

    async def refused(self: Any, *args: Any, **kwargs: Any) -> int:
        tries.append(args[1][0][1])
        raise DeviceListMismatch("the devices named are not the current ones")

    async def rebuilt_alike(self: Any, connection: Any, send: Send, mismatch: Any) -> list[Send]:
        return [send]  # as when the lists the relay returned cannot be used yet

    async with client(tmp_path, relay, "bob"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        # Sessions up, and the connection's first flush of the outbox behind us.
        await alice.send_direct("bob", b"delivered")
        monkeypatch.setattr(connection_module.RelayConnection, "send_direct", refused)
        monkeypatch.setattr(Client, "_rebuild", rebuilt_alike)
        message_id = await alice.send_direct("bob", b"never delivered")
        assert alice.store.outbox() == []  # it holds back no later send
        assert alice.pending_messages() == []
        failed = await next_matching(alice, SendFailed)
        assert (failed.message_id, failed.reason) == (message_id, SendDropped.code)
        assert len(tries) == MAX_SEND_ATTEMPTS  # rebuilt and tried again, so often only


def test_a_new_store_needs_a_user_id(tmp_path: Path) -> None:
    store = ClientStore.open(str(tmp_path / "new.db"))
    try:
        with pytest.raises(InvalidArgument):
            load_or_create_core(store)
    finally:
        store.close()


async def test_replaced_signed_prekeys_are_deleted_after_the_grace_period(
    tmp_path: Path, relay: Relay
) -> None:
    """Forward secrecy of the handshake: a device restarted over weeks keeps at most the
    current signed prekey and the one it replaced, never every key it ever had."""
    week = SIGNED_PREKEY_ROTATION_AGE + 1
    seen: list[tuple[int, ...]] = []
    for weeks in range(4):
        async with client(tmp_path, relay, "alice", clock=lambda w=weeks: NOW + w * week) as c:
            seen.append(c.core.account.signed_prekey_ids)
    assert [len(ids) for ids in seen] == [1, 2, 2, 2]
    assert seen[1][0] == seen[0][0] and seen[3][0] not in (seen[0] + seen[1][:1])


def deliveries_left(relay_db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{relay_db}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])


async def test_mail_that_expired_unread_is_told_to_the_app(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    now = [wall_clock_ms()]
    limits = RelayLimits(sweep_interval=0.05)
    relay = Relay(nursery, str(tmp_path / "relay.db"), clock=lambda: now[0], limits=limits)
    await relay.start()
    async with client(tmp_path, relay, "bob"):
        pass  # registered, then away
    async with client(tmp_path, relay, "alice") as alice:
        sent = now[0]
        await alice.send_direct("bob", b"never read")
    now[0] += (72 + 1) * 3600 * 1000  # the retention, and the epoch it was filed under
    # The relay tells a device at its login what expired before: let the sweep run
    # first (bob logging in before it was told only at his next login).
    with trio.fail_after(TIMEOUT):
        while deliveries_left(tmp_path / "relay.db"):
            await trio.sleep(0.01)
    async with client(tmp_path, relay, "bob") as bob:
        told = await next_matching(bob, MailExpired)
        assert (told.count, told.first_ts, told.last_ts) == (1, sent, sent)
        with trio.move_on_after(0.5):
            got = await next_matching(bob, MessageReceived)
            pytest.fail(f"expired mail was delivered: {got}")


async def test_a_message_over_the_limit_is_refused_with_nothing_stored(
    tmp_path: Path, relay: Relay
) -> None:
    async with client(tmp_path, relay, "bob"), client(tmp_path, relay, "alice") as alice:
        await alice.send_direct("bob", b"sessions up")
        records = alice.store.records()
        for size in (MAX_PLAINTEXT_SIZE + 1, 300_000, 1_000_000):
            with pytest.raises(LimitExceeded, match="MAX_PLAINTEXT_SIZE"):
                await alice.send_direct("bob", b"x" * size)
        assert alice.store.outbox() == [] and alice.store.records() == records
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"x" * MAX_PLAINTEXT_SIZE)
        bodies = [(await next_matching(bob, MessageReceived)).body for _ in range(2)]
        assert [len(b) for b in bodies] == [11, MAX_PLAINTEXT_SIZE]


async def test_every_client_file_is_private_whatever_the_umask(
    tmp_path: Path, relay: Relay
) -> None:
    """The WAL holds the newest state (private keys included): it was 0644 under umask 022."""
    folder = tmp_path / "alice-files"
    folder.mkdir(mode=0o700)
    old = os.umask(0o022)
    try:
        async with client(tmp_path, relay, "bob"):
            pass
        store = ClientStore.open(str(folder / "alice.db"))
        try:
            async with open_client(store, "127.0.0.1", relay.port, user_id="alice") as alice:
                await alice.send_direct("bob", b"written to the WAL")
                modes = file_modes(folder)
        finally:
            store.close()
        modes.update(file_modes(folder))
    finally:
        os.umask(old)
    names = {Path(path).name for path in modes}
    assert {"alice.db", "alice.db-wal", "alice.db-shm", "alice.db.lock"} <= names, modes
    assert {path: mode for path, mode in modes.items() if mode != 0o600} == {}


def file_modes(folder: Path) -> dict[str, int]:
    """The permission bits of every file under ``folder``."""
    return {str(path): path.stat().st_mode & 0o777 for path in folder.rglob("*") if path.is_file()}


async def test_a_send_stored_to_a_user_id_with_u0000_fails_alone(
    tmp_path: Path, relay: Relay
) -> None:
    """An outbox row to "bob\\x00evil", stored before a user id could not contain U+0000
    (spec/11-devices.md section 11.1): the relay protocol cannot carry it, so the row
    fails (SendFailed) instead of stopping the client, and alice's next message flows."""
    from hushchat.protocol.client_core import DirectSend

    async with client(tmp_path, relay, "bob"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        await alice.send_direct("bob", b"session warm-up")
        stale = DirectSend("bob\x00evil", ((1, b"payload"),), b"content", b"\xcc" * 16)
        alice.store.commit({}, sends=[stale])
        alice._connection = None
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        failed = await next_matching(alice, SendFailed)
        assert failed == SendFailed(b"\xcc" * 16, SendDropped.code)
        await alice.send_direct("bob", b"after it")
        bodies = [(await next_matching(bob, MessageReceived)).body for _ in range(2)]
        assert bodies == [b"session warm-up", b"after it"]
        assert alice.store.outbox() == []
