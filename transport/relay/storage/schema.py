"""The relay database's SQL schema, its version, and the schema it migrates from.

The version is SQLite's ``user_version``: 0 is a new file, which gets the
schema; 1 is the schema before queued mail was sealed at rest, which
:mod:`.migration` converts in place to 2; from 2 on, the steps of
:data:`MIGRATIONS` bring a file to :data:`SCHEMA_VERSION`, in the same
transaction; a newer version is refused (a newer relay's file).

Device-list counters are u64 and SQLite integers are i64, so counters are
stored as 8-byte big-endian blobs (compared only for equality).

The directory (users, devices, prekeys) is public and stored as it is, and
so are the invitations (``invites``: a token's SHA-256, never the token). The
queue (payloads, deliveries, mailboxes) keeps in clear only an epoch, an
opaque mailbox index and row ids; the rest is sealed (:mod:`.rows`). A
trigger on ``deliveries`` deletes a payload with its last delivery; a
payload's id is the ``seq`` of its first delivery, so neither is ever
reused. ``meta``
holds the key chain's id, its epoch length, and the newest epoch mail was
filed under (``epoch``), which only grows.
"""

from __future__ import annotations

import logging
import sqlite3

from hushchat.protocol.errors import UnknownStateVersion

logger = logging.getLogger("hushchat.relay")

SCHEMA_VERSION = 5
# The schema of relays before queued mail was sealed at rest (see migration.py).
UNSEALED_SCHEMA_VERSION = 1
# The schema migration.py converts a version-1 file to.
SEALED_SCHEMA_VERSION = 2
# The first schema with one_time_budgets (spec 07 section 7.7).
BUDGETS_SCHEMA_VERSION = 5

# The first protocol version whose device lists prove that each device is the
# user's (spec/11-devices.md). Device keys of older lists, kept from before an
# upgrade, may have been listed by a user they do not belong to: they do not
# make a key taken (``users.protocol_version``).
PROVEN_LISTS_VERSION = 2

DIRECTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    user_identity BLOB NOT NULL,
    counter BLOB NOT NULL,
    signed BLOB NOT NULL,
    protocol_version INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    identity BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS devices_identity ON devices (identity);
CREATE TABLE IF NOT EXISTS invites (
    token_hash BLOB PRIMARY KEY,
    expires_at INTEGER NOT NULL
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

# The one-time prekey budget of each target device (spec 07 section 7.7): a
# token bucket, ``tokens`` as of ``updated_ms`` (the relay's wall clock), kept
# in the database so that every relay process on it spends the same budget.
# No row: a full bucket.
ONE_TIME_BUDGETS_TABLE = """
CREATE TABLE IF NOT EXISTS one_time_budgets (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    tokens REAL NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID
"""

QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS payloads (
    id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch INTEGER NOT NULL,
    mailbox BLOB NOT NULL,
    payload_id INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_mailbox ON deliveries (mailbox, seq);
CREATE INDEX IF NOT EXISTS deliveries_epoch ON deliveries (epoch);
CREATE INDEX IF NOT EXISTS deliveries_payload ON deliveries (payload_id);
CREATE TABLE IF NOT EXISTS mailboxes (
    mailbox BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    queued INTEGER NOT NULL,
    noticed INTEGER NOT NULL,
    sealed BLOB NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS deliveries_removed AFTER DELETE ON deliveries BEGIN
    DELETE FROM payloads WHERE id = OLD.payload_id
        AND NOT EXISTS (SELECT 1 FROM deliveries WHERE payload_id = OLD.payload_id);
END;
"""

# The current schema, for a new file; a migrated file ends up with the same.
SCHEMA = DIRECTORY_SCHEMA + ONE_TIME_BUDGETS_TABLE + ";\n" + QUEUE_SCHEMA

# Statements taking a file from schema version N (the key) to N + 1, from
# SEALED_SCHEMA_VERSION on.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Protocol version 2: device lists carry device proofs. Lists stored before
    # are of protocol version 1; a device key is looked up to refuse it under a
    # second user.
    2: (
        "ALTER TABLE users ADD COLUMN protocol_version INTEGER NOT NULL DEFAULT 1",
        "CREATE INDEX IF NOT EXISTS devices_identity ON devices (identity)",
    ),
    # Registration by invitation: the SHA-256 of each token the operator issued
    # (never the token), until it is used or expires.
    3: (
        "CREATE TABLE IF NOT EXISTS invites (token_hash BLOB PRIMARY KEY, "
        "expires_at INTEGER NOT NULL) WITHOUT ROWID",
    ),
    # The one-time prekey budget per target device, shared by the relay
    # processes on one database (it was counted in each process's memory).
    4: (ONE_TIME_BUDGETS_TABLE,),
}

# The tables holding a device's prekeys and their budget (all wiped when the
# device is removed). The budget first: a take locks its row before the keys
# (PostgreSQL), and a wipe taking them in the same order never deadlocks it.
PREKEY_TABLES = (
    "one_time_budgets",
    "signed_prekeys",
    "last_resort_kem_prekeys",
    "one_time_prekeys",
    "one_time_kem_prekeys",
)


def counter_blob(counter: int) -> bytes:
    """A device-list counter as stored."""
    return counter.to_bytes(8, "big")


def create_or_check_schema(conn: sqlite3.Connection) -> int:
    """Give a new database the schema; the version found (0: new); UnknownStateVersion if newer.

    An older version is returned as it is: the caller migrates it under the
    write lock (:data:`UNSEALED_SCHEMA_VERSION` with the relay's keys, then
    :func:`migrate_directory`).
    """
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        # IF NOT EXISTS throughout: two relays creating one file at once both succeed.
        conn.executescript(
            f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )
    elif version > SCHEMA_VERSION:
        raise UnknownStateVersion(f"relay database schema version {version}")
    return version


def sqlite_schema_version(path: str) -> int:
    """The schema version of the SQLite file at ``path``, read only (0: new or empty)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        return version
    finally:
        conn.close()


def migrate_directory(conn: sqlite3.Connection) -> None:
    """Bring a file of SEALED_SCHEMA_VERSION or later to SCHEMA_VERSION, in the open transaction.

    The caller holds the write lock and has read the version under it
    (another relay opening the same file may have migrated it meanwhile).
    """
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if not SEALED_SCHEMA_VERSION <= version < SCHEMA_VERSION:
        raise UnknownStateVersion(f"relay database schema version {version}")
    for step in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[step]:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    logger.info("relay database migrated from schema %d to %d", version, SCHEMA_VERSION)


def meta_value(conn: sqlite3.Connection, name: str) -> bytes | None:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else bytes(row[0])


def meta_int(conn: sqlite3.Connection, name: str) -> int | None:
    value = meta_value(conn, name)
    return None if value is None else int.from_bytes(value, "big")


def set_meta(conn: sqlite3.Connection, name: str, value: bytes | int) -> None:
    if isinstance(value, int):
        value = value.to_bytes(8, "big")
    conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
