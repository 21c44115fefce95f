"""A client's durable state: one SQLite file, one writer.

Tables:

* ``records``: the :class:`~hushchat.protocol.client_core.ClientCore` records
  (account, device lists, sessions, sender keys, groups) and the client's
  own, keyed by their encoded :class:`~hushchat.protocol.client_core.RecordKey`;
* ``outbox``: sends encrypted but not yet accepted by the relay (sent again
  after a restart, in order), one versioned row each (:mod:`.rows`);
* ``inbox``: events not yet taken by the app (a crash after the relay was
  acknowledged loses no message), likewise;
* ``processed``: guids of envelopes already processed, so one delivered
  again (our acknowledgement was lost) is acknowledged without processing.

Each :meth:`ClientStore.commit` is one transaction: records, outbox rows,
inbox rows and the processed guid change together or not at all, which is
what "persist before acknowledging" needs. A second process opening the
same store fails with :class:`StoreLocked` (an exclusive ``flock`` on a lock
file beside the database), because two writers would fork the ratchets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from hushchat.protocol import client_core as core
from hushchat.protocol.errors import StateError, UnknownStateVersion

from ..wire.errors import TransportError
from . import rows


class StoreLocked(TransportError):
    """Another process has this client store open."""

    code = "STORE_LOCKED"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (key BLOB PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, send BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS processed (guid BLOB PRIMARY KEY, at INTEGER NOT NULL);
"""

# Every file of a store holds secrets (the WAL the newest state): its owner
# alone may read it, whatever the process's umask.
PRIVATE_FILE: Final = 0o600


def _open_private(path: str) -> int:
    """A descriptor of ``path``, created if needed, whose mode is PRIVATE_FILE."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # an existing file, or a umask that removed nothing
    except BaseException:
        os.close(fd)
        raise
    return fd


# Version of the store's layout, kept in PRAGMA user_version: 0 (the first
# client) stored inbox and outbox rows by class name and field order; 1 stores
# them as versioned rows (rows.py). open() migrates an older store.
STORE_VERSION: Final = 1


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the store to STORE_VERSION in one transaction; refuse a newer one."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > STORE_VERSION:
            raise UnknownStateVersion(
                f"client store version {version} is newer than {STORE_VERSION}"
            )
        if version < 1:
            _version_rows(db, "outbox", "send", _send_from_unversioned)
            _version_rows(db, "inbox", "event", _event_from_unversioned)
        if version != STORE_VERSION:
            db.execute(f"PRAGMA user_version = {STORE_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _version_rows(
    db: sqlite3.Connection, table: str, column: str, convert: Callable[[bytes], bytes]
) -> None:
    """Rewrite a table's unversioned rows as versioned ones.

    A row that does not decode stays as it was: reading it fails as it
    did before (StateError), and the rest is migrated.
    """
    stored = db.execute(f"SELECT id, {column} FROM {table}").fetchall()
    for row_id, data in stored:
        try:
            versioned = convert(data)
        except StateError:
            continue
        db.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", (versioned, row_id))


def _send_from_unversioned(data: bytes) -> bytes:
    send = rows.decode_unversioned(data)
    if not isinstance(send, core.DirectSend | core.GroupSend):
        raise StateError("an outbox row that is not a send")
    versioned = rows.encode_send(send)
    rows.decode_send(versioned)  # every field checked
    return versioned


def _event_from_unversioned(data: bytes) -> bytes:
    event = rows.decode_unversioned(data)
    if isinstance(event, core.DirectSend | core.GroupSend | core.ChangeSend):
        raise StateError("an inbox row that is not an event")
    versioned = rows.encode_event(event)
    rows.decode_event(versioned)  # every field checked
    return versioned


class ClientStore:
    """The SQLite file behind one client device. Use :meth:`open`; close when done."""

    def __init__(self, connection: sqlite3.Connection, lock_fd: int, path: str) -> None:
        self._db = connection
        self._lock_fd = lock_fd
        self.path = path

    @classmethod
    def open(cls, path: str) -> ClientStore:
        """Open (creating if needed) the store at ``path``; StoreLocked if in use.

        A store an older client wrote is migrated first; one a newer client
        wrote is refused (UnknownStateVersion).
        """
        lock_fd = _open_private(path + ".lock")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreLocked(f"the client store {path} is open in another process") from None
        db = None
        try:
            # SQLite gives the WAL and shared-memory files the database file's
            # permissions: a database created private keeps them private too.
            os.close(_open_private(path))
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path + suffix, PRIVATE_FILE)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transaction survives power loss, as the relay's
            # acknowledgement that follows it deletes the only other copy.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            _migrate(db)
        except BaseException:
            if db is not None:
                db.close()
            os.close(lock_fd)
            raise
        return cls(db, lock_fd, path)

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)

    # ------------------------------------------------------------ reads

    def records(self) -> list[tuple[core.RecordKey, bytes]]:
        rows = self._db.execute("SELECT key, value FROM records").fetchall()
        return [(core.RecordKey.decode(key), value) for key, value in rows]

    def record(self, key: core.RecordKey) -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM records WHERE key = ?", (key.encode(),)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def has_state(self) -> bool:
        return self._db.execute("SELECT 1 FROM records LIMIT 1").fetchone() is not None

    def outbox(self) -> list[tuple[int, core.Send]]:
        stored = self._db.execute("SELECT id, send FROM outbox ORDER BY id").fetchall()
        return [(row_id, rows.decode_send(data)) for row_id, data in stored]

    def inbox(self) -> list[tuple[int, core.Event]]:
        stored = self._db.execute("SELECT id, event FROM inbox ORDER BY id").fetchall()
        return [(row_id, rows.decode_event(data)) for row_id, data in stored]

    def was_processed(self, guid: bytes) -> bool:
        row = self._db.execute("SELECT 1 FROM processed WHERE guid = ?", (guid,)).fetchone()
        return row is not None

    # ------------------------------------------------------------ writes

    def commit(
        self,
        changes: dict[core.RecordKey, bytes | None],
        *,
        sends: Sequence[core.Send] = (),
        events: Sequence[core.Event] = (),
        processed: tuple[bytes, int] | None = None,
        sent: Iterable[int] = (),
        taken: Iterable[int] = (),
    ) -> tuple[list[int], list[int]]:
        """Apply everything in one transaction; the new outbox and inbox row ids."""
        cursor = self._db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for key, value in changes.items():
                packed_key = key.encode()
                if value is None:
                    cursor.execute("DELETE FROM records WHERE key = ?", (packed_key,))
                else:
                    cursor.execute(
                        "INSERT OR REPLACE INTO records (key, value) VALUES (?, ?)",
                        (packed_key, value),
                    )
            outbox_ids = []
            for send in sends:
                cursor.execute("INSERT INTO outbox (send) VALUES (?)", (rows.encode_send(send),))
                outbox_ids.append(int(cursor.lastrowid or 0))
            inbox_ids = []
            for event in events:
                cursor.execute("INSERT INTO inbox (event) VALUES (?)", (rows.encode_event(event),))
                inbox_ids.append(int(cursor.lastrowid or 0))
            if processed is not None:
                cursor.execute(
                    "INSERT OR IGNORE INTO processed (guid, at) VALUES (?, ?)", processed
                )
            cursor.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in sent])
            cursor.executemany("DELETE FROM inbox WHERE id = ?", [(i,) for i in taken])
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        return outbox_ids, inbox_ids

    def forget_processed_before(self, cutoff: int) -> None:
        """Drop processed guids older than ``cutoff`` (the relay keeps nothing longer)."""
        self._db.execute("DELETE FROM processed WHERE at < ?", (cutoff,))
