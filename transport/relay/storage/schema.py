"""The relay database's SQL schema and its version.

The version is SQLite's ``user_version``: 0 is a new file, which gets the
schema; any other version than :data:`SCHEMA_VERSION` is refused (a newer
relay's file, or one that needs a migration this version does not have).

Device-list counters are u64 and SQLite integers are i64, so counters are
stored as 8-byte big-endian blobs (compared only for equality).

A device's ``queued`` count is kept by triggers on ``deliveries``, which
also delete a payload with its last delivery.
"""

from __future__ import annotations

import sqlite3

from hushchat.protocol.errors import UnknownStateVersion

SCHEMA_VERSION = 1

SCHEMA = """
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
    queued INTEGER NOT NULL DEFAULT 0,
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
CREATE TABLE IF NOT EXISTS payloads (
    id INTEGER PRIMARY KEY,
    sender_user TEXT NOT NULL,
    sender_device INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    server_ts INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    guid BLOB NOT NULL UNIQUE,
    payload_id INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_mailbox ON deliveries (user_id, device_id, seq);
CREATE INDEX IF NOT EXISTS deliveries_expiry ON deliveries (expires_at);
CREATE INDEX IF NOT EXISTS deliveries_payload ON deliveries (payload_id);
CREATE TRIGGER IF NOT EXISTS deliveries_counted AFTER INSERT ON deliveries BEGIN
    UPDATE devices SET queued = queued + 1
        WHERE user_id = NEW.user_id AND device_id = NEW.device_id;
END;
CREATE TRIGGER IF NOT EXISTS deliveries_removed AFTER DELETE ON deliveries BEGIN
    UPDATE devices SET queued = queued - 1
        WHERE user_id = OLD.user_id AND device_id = OLD.device_id;
    DELETE FROM payloads WHERE id = OLD.payload_id
        AND NOT EXISTS (SELECT 1 FROM deliveries WHERE payload_id = OLD.payload_id);
END;
"""

# The tables holding a device's prekeys (all wiped when the device is removed).
PREKEY_TABLES = (
    "signed_prekeys",
    "last_resort_kem_prekeys",
    "one_time_prekeys",
    "one_time_kem_prekeys",
)


def counter_blob(counter: int) -> bytes:
    """A device-list counter as stored."""
    return counter.to_bytes(8, "big")


def create_or_check_schema(conn: sqlite3.Connection) -> None:
    """Give a new database the schema; UnknownStateVersion for another version than ours."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        # IF NOT EXISTS throughout: two relays creating one file at once both succeed.
        conn.executescript(
            f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )
    elif version != SCHEMA_VERSION:
        raise UnknownStateVersion(f"relay database schema version {version}")
