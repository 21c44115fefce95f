"""The sender learns which of its messages were delivered, and which never were.

Mail that waited longer than the relay's retention was deleted without a word
to anyone. Now the relay tells the recipient's device (MailExpired), and each
recipient device confirms what it received with a delivery receipt inside the
encryption (spec/07-relay-protocol.md, section 7.14): the sender gets
MessageDelivered once every device confirmed, or MessageNotDelivered, naming
the devices that never did, once the retention (and a margin) has passed.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from hushchat.protocol.client_core import GroupUpdated, MessageReceived
from hushchat.transport.client.client import (
    DELIVERY_DEADLINE,
    MailExpired,
    MessageDelivered,
    MessageNotDelivered,
)
from hushchat.transport.relay.config import RelayLimits, wall_clock_ms
from tests.support.clients import TIMEOUT, Relay, client, next_matching
from tests.support.harness import A


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: Path) -> Relay:
    server = Relay(nursery, str(tmp_path / "relay.db"))
    await server.start()
    return server


async def test_the_sender_learns_its_message_was_delivered(tmp_path: Path, relay: Relay) -> None:
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(tmp_path, relay, "bob") as bob,
        client(tmp_path, relay, "carol") as carol,
    ):
        direct = await alice.send_direct("bob", b"hi bob")
        await next_matching(bob, MessageReceived)
        assert (await next_matching(alice, MessageDelivered)).message_id == direct
        group_id = await alice.create_group("three", ["bob", "carol"])
        for member in (bob, carol):
            await next_matching(member, GroupUpdated)
        in_group = await alice.send_group(group_id, b"hi both")
        for member in (bob, carol):
            await next_matching(member, MessageReceived)
        # Once, when both members' devices confirmed.
        assert (await next_matching(alice, MessageDelivered)).message_id == in_group
        with trio.move_on_after(0.5):
            extra = await next_matching(alice, MessageDelivered)
            pytest.fail(f"delivered twice: {extra}")


def deliveries_left(relay_db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{relay_db}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])


async def test_an_expired_message_is_reported_to_both_ends(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Bob stays away past the retention: the relay deletes alice's message unread."""
    relay_now = [wall_clock_ms()]
    relay = Relay(
        nursery,
        str(tmp_path / "relay.db"),
        clock=lambda: relay_now[0],
        limits=RelayLimits(sweep_interval=0.05),
    )
    await relay.start()
    alice_now = [relay_now[0] / 1000]
    async with client(tmp_path, relay, "bob"):
        pass  # registered, then away
    async with client(tmp_path, relay, "alice", clock=lambda: alice_now[0]) as alice:
        lost = await alice.send_direct("bob", b"never read")
        relay_now[0] += (72 + 1) * 3600 * 1000  # the retention, and the epoch it was filed in
        with trio.fail_after(TIMEOUT):
            while deliveries_left(tmp_path / "relay.db"):
                await trio.sleep(0.01)
        async with client(tmp_path, relay, "bob") as bob:
            told = await next_matching(bob, MailExpired)
            assert told.count == 1
        # The sender's deadline passes with no receipt from bob's device.
        alice_now[0] += DELIVERY_DEADLINE + 1
        await alice.send_direct("bob", b"are you there?")  # any activity looks at deadlines
        reported = await next_matching(alice, MessageNotDelivered)
        assert (reported.message_id, reported.devices) == (lost, (A("bob"),))


async def test_an_idle_sender_reports_at_the_deadline(tmp_path: Path, relay: Relay) -> None:
    """Nothing else happens after the send: the deadline alone brings the report."""
    async with client(tmp_path, relay, "bob"):
        pass  # registered, then away
    async with client(tmp_path, relay, "alice", delivery_deadline=1) as alice:
        lost = await alice.send_direct("bob", b"unread")
        reported = await next_matching(alice, MessageNotDelivered)
        assert (reported.message_id, reported.devices) == (lost, (A("bob"),))


def test_stray_receipts_never_crowd_out_one_that_overtook_its_acceptance(tmp_path: Path) -> None:
    """A contact confirming made-up message ids (1,000 of them) must not make the client drop
    a real receipt that arrives before the relay's ACCEPTED for its message is recorded
    (the message would then be reported as never delivered)."""
    from hushchat.protocol.client_core import ClientCore, DeliveryConfirmed, DirectSend
    from hushchat.transport.client.client import MAX_EARLY_RECEIPTS, Client
    from hushchat.transport.client.store import ClientStore

    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        core = ClientCore.create_primary("alice", 1, now=1_700_000_000)
        alice = Client(store, core, "127.0.0.1", 1)
        for batch in range(MAX_EARLY_RECEIPTS // 100):
            stray = tuple(bytes([batch, n]) + bytes(14) for n in range(100))
            assert alice._confirm(DeliveryConfirmed(A("mallory"), stray), {}) == []
        message_id = b"\xaa" * 16
        assert alice._confirm(DeliveryConfirmed(A("bob"), (message_id,)), {}) == []
        # The relay's ACCEPTED for it is recorded after: bob's device has confirmed already.
        send = DirectSend("bob", ((1, b"payload"),), b"content", message_id)
        assert alice._expect_receipts(send) == {}
    finally:
        store.close()


def test_stray_receipts_take_bounded_memory(tmp_path: Path) -> None:
    """A contact confirming made-up message ids for as long as it likes: the client keeps
    at most MAX_EARLY_RECEIPTS of them waiting for an ACCEPTED that never comes."""
    from hushchat.protocol.client_core import ClientCore, DeliveryConfirmed
    from hushchat.transport.client.client import MAX_EARLY_RECEIPTS, Client
    from hushchat.transport.client.store import ClientStore

    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        core = ClientCore.create_primary("alice", 1, now=1_700_000_000)
        alice = Client(store, core, "127.0.0.1", 1)
        for batch in range(2 * MAX_EARLY_RECEIPTS // 100):
            stray = tuple(bytes([batch, n]) + bytes(14) for n in range(100))
            alice._confirm(DeliveryConfirmed(A("mallory"), stray), {})
        assert len(alice._early_receipts) == MAX_EARLY_RECEIPTS
    finally:
        store.close()


def test_a_device_confirms_only_for_itself(tmp_path: Path) -> None:
    """Mallory's device confirming alice's message to bob changes nothing: only bob's
    device (its receipt authenticated by its session) can say that bob's device has it."""
    from hushchat.protocol.client_core import ClientCore, DeliveryConfirmed, DirectSend
    from hushchat.transport.client.client import Client
    from hushchat.transport.client.store import ClientStore

    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        core = ClientCore.create_primary("alice", 1, now=1_700_000_000)
        alice = Client(store, core, "127.0.0.1", 1)
        message_id = b"\xbb" * 16
        send = DirectSend("bob", ((1, b"payload"),), b"content", message_id)
        alice._apply_deliveries(alice._expect_receipts(send))
        for liar in (A("mallory"), A("bob", 2), A("alice", 2)):
            deliveries: dict[bytes, Any] = {}
            assert alice._confirm(DeliveryConfirmed(liar, (message_id,)), deliveries) == []
            alice._apply_deliveries(deliveries)
        assert alice.awaiting_receipts() == [message_id]
        deliveries = {}
        assert alice._confirm(DeliveryConfirmed(A("bob"), (message_id,)), deliveries) == [
            MessageDelivered(message_id)
        ]
    finally:
        store.close()


def test_a_device_reached_late_has_its_full_deadline(tmp_path: Path) -> None:
    """Bob's device was full: the relay took alice's message for it a day later, and kept it
    for its whole retention from then. Alice must not report it undelivered a day early."""
    from hushchat.protocol.client_core import ClientCore, DirectSend
    from hushchat.transport.client.client import Client
    from hushchat.transport.client.events import Resend
    from hushchat.transport.client.store import ClientStore

    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        now = [1_700_000_000.0]
        core = ClientCore.create_primary("alice", 1, now=int(now[0]))
        alice = Client(store, core, "127.0.0.1", 1, clock=lambda: now[0], delivery_deadline=100)
        message_id = b"\xcc" * 16
        send = DirectSend("bob", ((1, b"one"), (2, b"two")), b"content", message_id)
        alice._apply_deliveries(alice._expect_receipts(send))  # bob.2 took it; bob.1 was full
        now[0] += 60
        late = Resend(DirectSend("bob", ((1, b"one"),), b"content", message_id))
        alice._apply_deliveries(alice._expect_receipts(late.send))  # bob.1 took it now
        deadline, devices = alice._deliveries[message_id]
        assert deadline == int(now[0]) + 100 and devices == {A("bob", 1), A("bob", 2)}
    finally:
        store.close()
