"""A stored row that cannot be decoded never stops the client.

A row can be unreadable because of a bug, a disk error or a foreign write.
Before, one such outbox row (a direct message over the plaintext limit left
one) made every later start of the client fail with CORRUPT_STATE, for good.
Now each is moved out of the way (the set_aside table keeps its bytes),
reported once as a StoredItemSetAside event, and the rest works on.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import trio

from hushchat.protocol.client_core import MessageReceived, RecordKey
from hushchat.protocol.encoding import pack
from hushchat.transport.client.client import StoredItemSetAside
from tests.support.clients import Relay, client, next_matching


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: Path) -> Relay:
    server = Relay(nursery, str(tmp_path / "relay.db"))
    await server.start()
    return server


def poison(store: Path, sql: str, *parameters: object) -> None:
    """Write to a closed store behind the client's back."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute(sql, parameters)
        db.commit()


def set_aside_rows(store: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(store)) as db:
        return [(s, r) for s, r in db.execute("SELECT source, reason FROM set_aside ORDER BY id")]


async def no_more_set_aside(c: object) -> None:
    """No StoredItemSetAside among the events that come within a short while."""
    with trio.move_on_after(0.5):
        event = await next_matching(c, StoredItemSetAside)  # type: ignore[arg-type]
        raise AssertionError(f"reported again: {event}")


@pytest.mark.parametrize(
    "row",
    [
        b"\x95\x02\x01\xa3bob",  # truncated
        pack([99, 1, "bob", [[1, b"p"]], b"", None]),  # a row version from the future
        b"\x00" * 300_000,  # what an unchecked long message left
    ],
    ids=["truncated", "future-version", "garbage"],
)
async def test_a_client_restarted_after_a_poisoned_outbox_row_starts_reports_it_and_sends(
    tmp_path: Path, relay: Relay, row: bytes
) -> None:
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"sessions up")
        await next_matching(bob, MessageReceived)
    poison(tmp_path / "alice.db", "INSERT INTO outbox (send, position) VALUES (?, 0)", row)
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        reported = await next_matching(alice, StoredItemSetAside)
        assert (reported.table, reported.reason) == ("outbox", reported.reason)
        assert reported.reason in ("CORRUPT_STATE", "UNKNOWN_STATE_VERSION")
        await alice.send_direct("bob", b"the next message")
        assert (await next_matching(bob, MessageReceived)).body == b"the next message"
    assert [source for source, _ in set_aside_rows(tmp_path / "alice.db")] == ["outbox"]
    async with client(tmp_path, relay, "alice") as alice:
        await no_more_set_aside(alice)


async def test_a_poisoned_inbox_row_is_set_aside_and_the_others_come(
    tmp_path: Path, relay: Relay
) -> None:
    async with client(tmp_path, relay, "bob"):
        pass
    async with client(tmp_path, relay, "alice") as alice:
        for body in (b"one", b"two"):
            await alice.send_direct("bob", body)
    async with client(tmp_path, relay, "bob") as bob:
        with trio.fail_after(10):  # both stored in bob's inbox; the app takes neither
            while len(stored := bob.store.inbox()) < 2:
                await trio.sleep(0.01)
    [first] = [row_id for row_id, e in stored if getattr(e, "body", None) == b"one"]
    poison(tmp_path / "bob.db", "UPDATE inbox SET event = ? WHERE id = ?", b"\xc1", first)
    async with client(tmp_path, relay, "bob") as bob:
        events = []
        with trio.fail_after(10):
            async for event in bob.events():
                if isinstance(event, StoredItemSetAside | MessageReceived):
                    events.append(event)
                if len(events) == 2:
                    break
    [reported] = [e for e in events if isinstance(e, StoredItemSetAside)]
    assert reported.table == "inbox"
    assert [e.body for e in events if isinstance(e, MessageReceived)] == [b"two"]


async def test_a_poisoned_session_record_costs_the_session_not_the_device(
    tmp_path: Path, relay: Relay
) -> None:
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        await alice.send_direct("bob", b"hello")
        await next_matching(bob, MessageReceived)
    key = RecordKey.session(bob.address).encode()
    poison(tmp_path / "alice.db", "UPDATE records SET value = ? WHERE key = ?", b"\x92\x01", key)
    poison(tmp_path / "alice.db", "INSERT INTO records (key, value) VALUES (?, ?)", b"\xc1", b"x")
    async with client(tmp_path, relay, "alice") as alice, client(tmp_path, relay, "bob") as bob:
        reported = [await next_matching(alice, StoredItemSetAside) for _ in range(2)]
        assert sorted((r.table, r.kind) for r in reported) == [
            ("records", ""),
            ("records", "session"),
        ]
        await alice.send_direct("bob", b"a new session")
        assert (await next_matching(bob, MessageReceived)).body == b"a new session"
