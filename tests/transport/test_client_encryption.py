"""The client store encrypted at rest with a key the app provides.

Anyone who copied a store read the account's private keys, every session,
sender key and group, and the message history in the inbox. Opened with a
key, a store holds none of it in clear, a wrong key is said as such, a
value moved to another row does not open there, and a store written
without a key is encrypted (and left without plaintext) when first opened
with one.
"""

from __future__ import annotations

import contextlib
import hmac
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hushchat.protocol.client_core import DirectSend, MessageReceived, RecordKey
from hushchat.protocol.errors import InvalidArgument
from hushchat.transport.client.cipher import StoreCipher
from hushchat.transport.client.client import Client, Status, StoredItemSetAside, open_client
from hushchat.transport.client.events import QueuedMessage
from hushchat.transport.client.store import ClientStore, WrongStoreKey
from tests.support.clients import Relay, next_matching

KEY = bytes(range(32))
# Long names and markers, so that none occurs in ciphertext by chance.
ALICE, BOB = "alice-7f3a91c4", "bob-2c9e44d1"
MARKERS = [b"PLAINTEXT-MARKER-one-8d2f61", b"PLAINTEXT-MARKER-two-04be93"]


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: Path) -> Relay:
    server = Relay(nursery, str(tmp_path / "relay.db"))
    await server.start()
    return server


@asynccontextmanager
async def client(
    folder: Path, relay: Relay, name: str, key: bytes | None = KEY, **options: Any
) -> AsyncIterator[Client]:
    store = ClientStore.open(str(folder / f"{name}.db"), key=key)
    try:
        options.setdefault("reconnect_first_delay", 0.05)
        async with open_client(store, "127.0.0.1", relay.port, user_id=name, **options) as c:
            yield c
    finally:
        store.close()


def files_of(folder: Path, name: str) -> bytes:
    """Every byte of a store's files (database, WAL)."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob(f"{name}.db*")) if p.is_file())


def secrets_of(c: Client) -> list[bytes]:
    """What must not be found in a store's files: names, private keys, message bodies."""
    state = c.core._state
    assert state.user_identity is not None
    return [
        c.core.user_id.encode(),
        state.user_identity.seed,
        state.account.identity.seed,
        *MARKERS,
    ]


async def talk(alice: Client, bob: Client) -> None:
    for marker in MARKERS:
        await alice.send_direct(BOB, marker)
        await bob.send_direct(ALICE, marker)
        await next_matching(bob, MessageReceived)
        await next_matching(alice, MessageReceived)


async def test_an_encrypted_store_holds_nothing_in_clear(tmp_path: Path, relay: Relay) -> None:
    async with client(tmp_path, relay, ALICE) as alice, client(tmp_path, relay, BOB) as bob:
        assert alice.store.encrypted
        await talk(alice, bob)
        await alice.send_direct(BOB, MARKERS[0])  # bob leaves it in his inbox
        with trio.fail_after(10):
            while not any(getattr(e, "body", None) == MARKERS[0] for _, e in bob.store.inbox()):
                await trio.sleep(0.01)
        secrets = {ALICE: secrets_of(alice), BOB: secrets_of(bob)}
    for name, found in secrets.items():
        stored = files_of(tmp_path, name)
        assert len(stored) > 10_000
        assert [s for s in found if s in stored] == []
        assert BOB.encode() not in stored and ALICE.encode() not in stored


async def test_a_wrong_key_is_said_as_such_and_changes_nothing(
    tmp_path: Path, relay: Relay
) -> None:
    async with client(tmp_path, relay, ALICE):
        pass
    before = files_of(tmp_path, ALICE)
    path = str(tmp_path / f"{ALICE}.db")
    with pytest.raises(WrongStoreKey, match="does not open"):
        ClientStore.open(path, key=bytes(32))
    with pytest.raises(WrongStoreKey, match="encrypted"):
        ClientStore.open(path)
    with pytest.raises(InvalidArgument):
        ClientStore.open(path, key=KEY[:16])
    assert files_of(tmp_path, ALICE) == before
    async with client(tmp_path, relay, ALICE) as alice:  # the right key still opens it
        assert alice.status is Status.READY


async def test_a_plaintext_store_is_encrypted_when_first_opened_with_a_key(
    tmp_path: Path, relay: Relay
) -> None:
    """Every table is carried over; no plaintext is left in the files."""
    async with client(tmp_path, relay, BOB) as bob:
        pass
    async with client(tmp_path, relay, ALICE, key=None) as alice:
        await alice.send_direct(BOB, b"warm-up")
        await relay.stop()
        with trio.fail_after(10):
            while alice.status is Status.READY:
                await trio.sleep(0.01)
        pending = await alice.send_direct(BOB, MARKERS[1])  # stays in the outbox
        secrets = [s for s in secrets_of(alice) if s != MARKERS[0]]
    stored = files_of(tmp_path, ALICE)
    assert [s for s in secrets if s in stored] == secrets  # all in clear
    store = ClientStore.open(str(tmp_path / f"{ALICE}.db"), key=KEY)
    try:
        assert store.encrypted
        [(_, queued)] = store.outbox()
        assert isinstance(queued, DirectSend | QueuedMessage) and queued.message_id == pending
        assert store.record(RecordKey.META) is not None
    finally:
        store.close()
    stored = files_of(tmp_path, ALICE)
    assert [s for s in secrets if s in stored] == []
    await relay.start()
    async with client(tmp_path, relay, ALICE) as alice, client(tmp_path, relay, BOB) as bob:
        got = [(await next_matching(bob, MessageReceived)).body for _ in range(2)]
        assert got == [b"warm-up", MARKERS[1]]


def swap(store: Path, table: str, column: str, key: str) -> None:
    """Exchange the stored values of the first two rows of ``table``."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        (k1, v1), (k2, v2) = db.execute(f"SELECT {key}, {column} FROM {table} LIMIT 2")
        db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (v2, k1))
        db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (v1, k2))
        db.commit()


async def test_a_value_moved_to_another_row_does_not_open_there(
    tmp_path: Path, relay: Relay
) -> None:
    """Each value is sealed with its row's identity: a swap is set aside, never misread."""
    async with client(tmp_path, relay, ALICE) as alice, client(tmp_path, relay, BOB) as bob:
        await talk(alice, bob)
        await relay.stop()
        with trio.fail_after(10):
            while alice.status is Status.READY:
                await trio.sleep(0.01)
        for n in range(2):
            await alice.send_direct(BOB, b"pending %d" % n)
    path = tmp_path / f"{ALICE}.db"
    swap(path, "outbox", "send", "id")
    swap(path, "records", "value", "key")
    store = ClientStore.open(str(path), key=KEY)
    try:
        reported = [e for _, e in store.inbox() if isinstance(e, StoredItemSetAside)]
        assert sorted(e.table for e in reported) == ["outbox", "outbox", "records", "records"]
        assert {e.reason for e in reported} == {"CORRUPT_STATE"}
        assert store.outbox() == []
    finally:
        store.close()


def test_the_sealing_is_the_one_spec_readme_describes() -> None:
    """An independent rebuild of the construction, and one pinned value."""
    key, salt, nonce = bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 76))
    material = HKDF(hashes.SHA256(), 64, salt, b"hushchat_client_store").derive(key)
    cipher = StoreCipher(key, salt)
    row = (7).to_bytes(8, "big")
    sealed = cipher.seal("outbox", row, b"a row", nonce=nonce)
    associated = b"hushchat_client_store_row" + b"outbox" + b"\x00" + row
    assert sealed == b"\x01" + nonce + AESGCM(material[:32]).encrypt(nonce, b"a row", associated)
    assert cipher.index(b"an id") == hmac.digest(material[32:], b"an id", "sha256")
    assert sealed.hex() == PINNED_SEALED
    assert cipher.open("outbox", row, sealed) == b"a row"


PINNED_SEALED = "01404142434445464748494a4b4e8a88d17c8de4da28a4e96dda386d9bd35fcc6531"
