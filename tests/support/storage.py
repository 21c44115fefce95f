"""Rows for the relay's storage, written straight into a database (no relay, no checks),
and a running relay's files copied as at one moment.

No tests here; the storage and group-commit tests import it.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.transport.relay.storage.interface import Delivery, EnvelopeBatch, StoredDeviceList
from hushchat.transport.relay.storage.schema import QUEUE_SCHEMA
from hushchat.transport.relay.storage.sqlite import SqliteDatabase
from hushchat.transport.wire.records import EnvelopeKind

# Stands in for every signature: storage keeps signatures, it never checks them.
SIGNATURE = b"\x05" * 64


def copy_at_one_moment(relay_db: Path, into: Path) -> Path:
    """Copy a running relay's files as a disk image would hold them at one moment:
    database, WAL, key file (into the new folder ``into``, named ``relay.db*``).

    Copying file after file is not one moment. The relay's sweep checkpoints
    and truncates the WAL: between the database's copy and the WAL's, that
    would lose from the copy what was committed to the WAL only. A read
    transaction held meanwhile keeps the WAL from being reset; a checkpoint
    may still copy frames into the database, but only frames the WAL's copy
    holds too, so the copy opens as one state.
    """
    into.mkdir()
    with contextlib.closing(sqlite3.connect(f"file:{relay_db}?mode=ro", uri=True)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the snapshot begins
        for suffix in ("", "-wal", ".keys"):
            source = Path(f"{relay_db}{suffix}")
            if source.exists():
                shutil.copy(source, into / f"relay.db{suffix}")
    return into / "relay.db"


def device_list(user_id: str, counter: int, *devices: tuple[int, bytes]) -> StoredDeviceList:
    """``user_id``'s list of ``devices`` (device id, identity key) at ``counter``."""
    return StoredDeviceList(user_id, b"U" * 32, counter, f"{user_id}#{counter}".encode(), devices)


def register_devices(db: SqliteDatabase, user_id: str, *device_ids: int, key_base: int = 0) -> None:
    """``user_id``'s first list (counter 0); device ``d`` has the key
    ``bytes([key_base + d]) * 32`` (a device key is one user's: give users distinct bases)."""
    keys = ((d, bytes([key_base + d]) * 32) for d in device_ids)
    db.store_device_list(device_list(user_id, 0, *keys), previous_counter=None)


def upload_prekeys(
    db: SqliteDatabase, user_id: str, device_id: int, *, one_time: int, kem: int
) -> None:
    """A signed prekey, a last-resort KEM key, and one-time keys numbered from 1."""
    db.store_prekeys(
        user_id,
        device_id,
        signed_prekey=SignedPreKeyPublic(1, b"S" * 32, SIGNATURE),
        last_resort_kem=KemPreKeyPublic(999, b"L" * 1184, SIGNATURE),
        one_time=[OneTimePreKeyPublic(i, bytes([i % 256]) * 32) for i in range(1, one_time + 1)],
        one_time_kem=[
            KemPreKeyPublic(i, bytes([i % 256]) * 1184, SIGNATURE) for i in range(1, kem + 1)
        ],
        max_stored=1000,
    )


def batch(
    deliveries: list[tuple[str, int]],
    payloads: tuple[bytes, ...],
    *,
    counters: dict[str, int],
    server_ts: int = 1000,
    expires_at: int = 2000,
    kind: EnvelopeKind = EnvelopeKind.DIRECT,
) -> EnvelopeBatch:
    """A send from alice's device 1: delivery ``i`` carries payload ``i`` (or the last one)."""
    return EnvelopeBatch(
        sender_user="alice",
        sender_device=1,
        server_ts=server_ts,
        expires_at=expires_at,
        payloads=tuple((kind, payload) for payload in payloads),
        deliveries=tuple(
            Delivery(u, d, secrets.token_bytes(16), min(i, len(payloads) - 1))
            for i, (u, d) in enumerate(deliveries)
        ),
        device_list_counters=counters,
    )


# The directory tables of schema 2, as relays of protocol version 1 created
# them (main at 3282965); the queue tables of schema 2 are today's.
SCHEMA_2_DIRECTORY = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    user_identity BLOB NOT NULL,
    counter BLOB NOT NULL,
    signed BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    identity BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS signed_prekeys (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_resort_kem_prekeys (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_kem_prekeys (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
) WITHOUT ROWID;
"""


def schema_2_database(
    path: Path, users: Sequence[tuple[str, bytes, int, bytes, Sequence[tuple[int, bytes]]]]
) -> None:
    """A relay database of schema 2 holding ``users`` (user id, user identity, counter,
    signed list, devices), as a relay of protocol version 1 stored them, and no mail."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        f"BEGIN; {SCHEMA_2_DIRECTORY} {QUEUE_SCHEMA} PRAGMA user_version = 2; COMMIT;"
    )
    for user_id, user_identity, counter, signed, devices in users:
        conn.execute(
            "INSERT INTO users VALUES (?, ?, ?, ?)",
            (user_id, user_identity, counter.to_bytes(8, "big"), signed),
        )
        conn.executemany(
            "INSERT INTO devices (user_id, device_id, identity) VALUES (?, ?, ?)",
            [(user_id, device_id, identity) for device_id, identity in devices],
        )
    conn.close()
