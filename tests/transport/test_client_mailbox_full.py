"""A full mailbox delays only what is addressed to it (issue 17; spec 07, 7.8 and 7.14).

The relay stores a send for every device with room and names the full ones
(relay protocol 6). The client keeps, in its outbox, only what those devices
missed, and sends it again later to them alone (``resend``). Before, the row
stayed whole: it held back every later row to its user and group, and went
again to every device, so the others got it twice. The first test runs the
relay as an operator would: ``hushchat relay --max-mailbox 50``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import trio

from hushchat.protocol.client_core import GroupUpdated, MessageReceived, Undecryptable
from hushchat.transport.client import client as client_module
from hushchat.transport.client.client import Client, MessageSent
from hushchat.transport.relay.config import RelayLimits
from tests.support.clients import TIMEOUT, Relay, RelayProcess, client, next_matching

MAILBOX = 50


async def received(c: Client, count: int, timeout: float = TIMEOUT) -> list[MessageReceived]:
    """The next ``count`` messages ``c`` receives; AssertionError on anything undecryptable."""
    got: list[MessageReceived] = []
    with trio.fail_after(timeout):
        async for event in c.events():
            assert not isinstance(event, Undecryptable), event
            if isinstance(event, MessageReceived):
                got.append(event)
                if len(got) == count:
                    return got
    raise AssertionError("event stream ended")


async def nothing_more(c: Client) -> None:
    """No further message, and nothing undecryptable (a duplicate would be one or the other)."""
    with trio.move_on_after(1.0):
        async for event in c.events():
            assert not isinstance(event, MessageReceived | Undecryptable), event


def queued(relay_db: Path) -> int:
    """Envelopes the relay holds, for any device."""
    with contextlib.closing(sqlite3.connect(f"file:{relay_db}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])


def bodies(events: list[MessageReceived], group_id: bytes | None) -> list[bytes]:
    return [e.body for e in events if e.group_id == group_id]


async def test_a_full_mailbox_delays_only_what_is_addressed_to_it(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay.db")
    await relay.start("--max-mailbox", str(MAILBOX))
    try:
        await talk_past_a_full_mailbox(tmp_path, relay)
    finally:
        await relay.kill()


async def talk_past_a_full_mailbox(tmp_path: Path, relay: RelayProcess) -> None:
    async with (
        client(tmp_path, relay, "alice") as alice,
        client(tmp_path, relay, "carol") as carol,
    ):
        async with client(tmp_path, relay, "bob") as bob:
            group_id = await alice.create_group("three", ["bob", "carol"])
            for member in (bob, carol):
                await next_matching(member, GroupUpdated)
        # Bob stops reading; alice keeps writing to him until his mailbox is full and past it.
        to_bob = [b"to bob %d" % n for n in range(MAILBOX + 5)]
        for body in to_bob:
            await alice.send_direct("bob", body)
        # Then she talks to carol and to the group (bob's device is full for both).
        to_carol = [b"to carol %d" % n for n in range(10)]
        to_group = [b"to the group %d" % n for n in range(10)]
        for direct, in_group in zip(to_carol, to_group, strict=True):
            await alice.send_direct("carol", direct)
            await alice.send_group(group_id, in_group)
        # Carol gets everything while bob is away, once each, in order.
        got = await received(carol, len(to_carol) + len(to_group))
        assert bodies(got, None) == to_carol
        assert bodies(got, group_id) == to_group
        await nothing_more(carol)
        # What bob's device missed waits for it alone.
        pending = set(alice.pending_messages())
        assert len(pending) == 5 + len(to_group), len(pending)

        # Bob reads again: everything reaches him, once, each conversation in order.
        async with client(tmp_path, relay, "bob") as bob:
            got = await received(bob, len(to_bob) + len(to_group))
            assert bodies(got, None) == to_bob
            assert bodies(got, group_id) == to_group
            await nothing_more(bob)
        with trio.fail_after(TIMEOUT):
            while alice.pending_messages():
                await next_matching(alice, MessageSent)


async def test_what_a_device_missed_goes_before_anything_newer(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's device reads again while what it missed still waits for its retry: alice's next
    message to him must not overtake it (spec 07, 7.8: resend first)."""
    monkeypatch.setattr(client_module, "RETRY_FIRST_DELAY", 3600.0)  # only order may bring it
    monkeypatch.setattr(Client, "_device_reads", lambda self, device: None)  # nor a receipt
    relay = Relay(nursery, str(tmp_path / "relay.db"), limits=RelayLimits(max_mailbox_size=3))
    await relay.start()
    async with client(tmp_path, relay, "bob"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        for n in range(4):
            await alice.send_direct("bob", b"before %d" % n)
        assert len(alice.pending_messages()) == 1  # the fourth waits for bob's device
        async with client(tmp_path, relay, "bob") as bob:
            got = await received(bob, 3)
            assert [e.body for e in got] == [b"before 0", b"before 1", b"before 2"]
            with trio.fail_after(TIMEOUT):  # bob acknowledged them: his mailbox has room
                while queued(tmp_path / "relay.db"):
                    await trio.sleep(0.01)
            await alice.send_direct("bob", b"after")
            got = await received(bob, 2)
            assert [e.body for e in got] == [b"before 3", b"after"]
            await nothing_more(bob)


async def test_more_messages_for_a_full_device_do_not_push_its_retry_back(
    tmp_path: Path,
) -> None:
    """Each message a full device misses used to double its backoff: ten messages in a
    second put its next try minutes away. They wait for the retry already set."""
    from hushchat.protocol.client_core import ClientCore, DirectSend
    from hushchat.transport.client.store import ClientStore

    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        core = ClientCore.create_primary("alice", 1, now=1_700_000_000)
        alice = Client(store, core, "127.0.0.1", 1)
        for n in range(5):
            send = DirectSend("bob", ((1, b"payload"),), b"content", bytes([n + 1]) * 16)
            (row_id,), _ = await alice._commit({}, sends=[send])
            await alice._keep_for_full(row_id, send, [("bob", 1)])
        assert alice._retry_delay == {"d:1:bob": client_module.RETRY_FIRST_DELAY}
        assert len(alice.pending_messages()) == 5
    finally:
        store.close()
