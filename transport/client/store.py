"""A client's durable state: one SQLite file, one writer.

Tables:

* ``records``: the :class:`~hushchat.protocol.client_core.ClientCore` records
  (account, device lists, sessions, sender keys, groups) and the client's
  own, keyed by their encoded :class:`~hushchat.protocol.client_core.RecordKey`;
* ``outbox``: sends encrypted but not yet accepted by the relay, and
  messages the app sent that are not encrypted yet (sent after a restart,
  in order of ``position``), one versioned row each (:mod:`.rows`);
* ``inbox``: events not yet taken by the app (a crash after the relay was
  acknowledged loses no message), likewise;
* ``processed``: guids of envelopes already processed, so one delivered
  again (our acknowledgement was lost) is acknowledged without processing;
* ``deliveries``: the app's messages sent whose delivery receipts have not
  all come, with the devices still to confirm and the deadline after which
  the missing ones are reported (MessageNotDelivered);
* ``set_aside``: rows of the other tables that could not be read (a bug, a
  disk error), moved there with their bytes so that they never stop the
  client; each is reported once, by a StoredItemSetAside event in the inbox.
  The store moves unreadable outbox and inbox rows and record keys when it
  opens, and any it meets later when asked (:meth:`ClientStore.set_aside`);
  the client moves the records the core cannot load
  (:meth:`ClientStore.set_aside_records`).

Each :meth:`ClientStore.commit` is one transaction: records, outbox rows,
inbox rows and the processed guid change together or not at all, which is
what "persist before acknowledging" needs. A second process opening the
same store fails with :class:`StoreLocked` (an exclusive ``flock`` on a lock
file beside the database), because two writers would fork the ratchets.

A write that fails (a full disk, an I/O error) raises :class:`StoreFull` or
:class:`StoreFailed` with SQLite's error as the cause, and changes nothing:
the store stays usable, and the same write succeeds once space returns.

Opened with a key (:meth:`ClientStore.open`), a store keeps every value
sealed and its identifiers keyed-hashed (:mod:`.cipher`); a store written
without one is encrypted when it is first opened with one. A key that does
not open the store is :class:`WrongStoreKey`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar, cast, get_args

from hushchat.protocol import client_core as core
from hushchat.protocol.client_core.arguments import check_now
from hushchat.protocol.consts import MAX_STATE_SIZE
from hushchat.protocol.content import MESSAGE_ID_SIZE
from hushchat.protocol.devices import read_user_id
from hushchat.protocol.encoding import Fields, pack
from hushchat.protocol.errors import DecodeError, InvalidArgument, StateError, UnknownStateVersion

from ..wire.errors import TransportError
from ..wire.limits import MAX_RECIPIENTS_PER_SEND
from ..wire.records import GUID_SIZE
from . import rows
from .cipher import (
    KEY_CHECK,
    SALT_SIZE,
    PlainCodec,
    StoreCipher,
    StoreCodec,
    check_store_key,
)
from .events import (
    OutboxItem,
    QueuedMessage,
    QueuedReceipt,
    Resend,
    StoredEvent,
    StoredItemSetAside,
)

_Item = TypeVar("_Item")


class StoreLocked(TransportError):
    """Another process has this client store open."""

    code = "STORE_LOCKED"


class WrongStoreKey(TransportError):
    """The key given does not open this store (or it is encrypted and none was given)."""

    code = "WRONG_STORE_KEY"


class StoreFailed(TransportError):
    """The store could not be read or written (its cause is SQLite's error); nothing changed."""

    code = "STORE_FAILED"


class StoreFull(StoreFailed):
    """The disk (or the store's quota) is full; nothing changed. Free space and retry."""

    code = "STORE_FULL"


def _store_error(exc: sqlite3.Error, doing: str) -> StoreFailed:
    """The StoreFailed (StoreFull for SQLITE_FULL) that says what ``exc`` means."""
    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    error = (StoreFull if full else StoreFailed)(f"{doing}: {exc}")
    error.__cause__ = exc
    return error


_SCHEMA = """
CREATE TABLE records (key BLOB PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, send BLOB NOT NULL, position INTEGER NOT NULL
);
CREATE INDEX outbox_order ON outbox (position, id);
CREATE TABLE inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL);
CREATE TABLE processed (guid BLOB PRIMARY KEY, at INTEGER NOT NULL);
CREATE INDEX processed_at ON processed (at);
CREATE TABLE set_aside (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL, row BLOB NOT NULL, data BLOB NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE deliveries (message BLOB PRIMARY KEY, data BLOB NOT NULL, deadline INTEGER NOT NULL);
CREATE INDEX deliveries_deadline ON deliveries (deadline);
"""

# The WAL's bound. SQLite checkpoints it into the database every
# WAL_AUTOCHECKPOINT_PAGES pages (4 KiB each) and then truncates it to
# WAL_SIZE_LIMIT; with SQLite's defaults (1,000 pages, no limit) each store's
# WAL settled at about 4 MB. One transaction larger than the limit (a batch of
# large messages) grows it past, until the next checkpoint.
WAL_SIZE_LIMIT: Final = 1024 * 1024
WAL_AUTOCHECKPOINT_PAGES: Final = 256

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
# them as versioned rows (rows.py); 2 orders the outbox by a position (a
# message encrypted late takes the place it was queued at) and writes rows of
# ROW_VERSION 2; 3 sets unreadable rows aside; 4 may be encrypted (a meta
# table holds the salt and the key check); 5 tracks delivery receipts.
# open() migrates an older store.
STORE_VERSION: Final = 5


def _migrate(db: sqlite3.Connection) -> None:
    """Create the store, or bring it to STORE_VERSION, in one transaction; refuse a newer one."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > STORE_VERSION:
            raise UnknownStateVersion(
                f"client store version {version} is newer than {STORE_VERSION}"
            )
        fresh = not db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
        ).fetchone()
        if fresh:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        else:
            if version < 1:
                _version_rows(db, "outbox", "send", _send_from_unversioned)
                _version_rows(db, "inbox", "event", _event_from_unversioned)
            if version < 2:
                db.execute("ALTER TABLE outbox ADD COLUMN position INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE outbox SET position = id")
                db.execute("CREATE INDEX outbox_order ON outbox (position, id)")
                db.execute("CREATE INDEX processed_at ON processed (at)")
                _version_rows(db, "outbox", "send", rows.upgrade_send)
                _version_rows(db, "inbox", "event", rows.upgrade_event)
            if version < 3:
                db.execute(
                    "CREATE TABLE set_aside (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "source TEXT NOT NULL, row BLOB NOT NULL, data BLOB NOT NULL, "
                    "reason TEXT NOT NULL)"
                )
            if version < 4:
                db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
            if version < 5:
                db.execute(
                    "CREATE TABLE deliveries (message BLOB PRIMARY KEY, data BLOB NOT NULL, "
                    "deadline INTEGER NOT NULL)"
                )
                db.execute("CREATE INDEX deliveries_deadline ON deliveries (deadline)")
        if version != STORE_VERSION:
            db.execute(f"PRAGMA user_version = {STORE_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _version_rows(
    db: sqlite3.Connection, table: str, column: str, convert: Callable[[bytes], bytes]
) -> None:
    """Rewrite a table's rows with ``convert`` (unversioned or older rows to current ones).

    A row that does not convert (corrupt, or already current) stays as it
    was: reading a corrupt one fails as it did before (StateError), and the
    rest is migrated.
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

    def __init__(
        self, connection: sqlite3.Connection, lock_fd: int, path: str, codec: StoreCodec
    ) -> None:
        self._db = connection
        self._lock_fd = lock_fd
        self._codec = codec
        self.path = path
        # Unreadable rows met by a read, to move by set_aside(): (table, row id, reason).
        self._unreadable: dict[tuple[str, int], str] = {}

    @classmethod
    def open(cls, path: str, *, key: bytes | None = None) -> ClientStore:
        """Open (creating if needed) the store at ``path``; StoreLocked if in use.

        ``key`` (32 bytes, kept by the app, say in the operating system's key
        store or derived from a passphrase) encrypts everything stored: a new
        store is created encrypted, one written without a key is encrypted
        now. WrongStoreKey if it does not open the store, or if the store is
        encrypted and no key is given.

        A store an older client wrote is migrated first; one a newer client
        wrote is refused (UnknownStateVersion). StoreFailed (StoreFull) if the
        file cannot be created, read or migrated.
        """
        if not isinstance(path, str) or not path:
            raise InvalidArgument("a client store's path is a non-empty string")
        if key is not None:
            check_store_key(key)
        try:
            lock_fd = _open_private(path + ".lock")
        except OSError as exc:
            raise StoreFailed(f"cannot create the client store {path}: {exc.strerror}") from exc
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
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            # What is deleted is overwritten, not left in free pages.
            db.execute("PRAGMA secure_delete=ON")
            _migrate(db)
            store = cls(db, lock_fd, path, _codec(db, path, key))
            store._find_unreadable()
            store.set_aside()
        except BaseException as exc:
            if db is not None:
                db.close()
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise _store_error(exc, f"opening the client store {path}") from exc
            if isinstance(exc, OSError):
                raise StoreFailed(f"cannot open the client store {path}: {exc.strerror}") from exc
            raise
        return store

    @property
    def encrypted(self) -> bool:
        return self._codec.encrypted

    def close(self) -> None:
        """Close the store, its WAL emptied into the database first (as far as it can be)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self._db.close()
        os.close(self._lock_fd)

    # ------------------------------------------------------------ reads

    def _read(self, sql: str, parameters: tuple[object, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            raise _store_error(exc, "reading the client store") from exc

    def records(self) -> list[tuple[core.RecordKey, bytes]]:
        """Every record that reads (the others wait for :meth:`set_aside`)."""
        readable = []
        for rowid, key, value in self._read("SELECT rowid, key, value FROM records"):
            try:
                readable.append(self._open_record(key, value))
            except StateError as exc:
                self._unreadable[("records", rowid)] = exc.code
        return readable

    def _open_record(self, stored_key: bytes, stored: bytes) -> tuple[core.RecordKey, bytes]:
        if not self._codec.encrypted:
            return core.RecordKey.decode(stored_key), stored
        opened = self._codec.open("records", stored_key, stored)
        try:
            f = Fields.decode(opened, what="sealed record", count=2, max_size=MAX_STATE_SIZE)
            key, value = f.bin(), f.bin()
        except DecodeError as exc:
            raise StateError(f"a sealed record does not decode ({exc.message})") from exc
        if not hmac.compare_digest(self._codec.index(key), stored_key):
            raise StateError("a sealed record is stored under another key")
        return core.RecordKey.decode(key), value

    def _seal_record(self, key: bytes, value: bytes) -> tuple[bytes, bytes]:
        """A record's stored key and value."""
        if not self._codec.encrypted:
            return key, value
        stored_key = self._codec.index(key)
        return stored_key, self._codec.seal("records", stored_key, pack([key, value]))

    def record(self, key: core.RecordKey) -> bytes | None:
        if not isinstance(key, core.RecordKey):
            raise InvalidArgument("a record is named by a RecordKey")
        stored_key = self._codec.index(key.encode())
        stored = self._read("SELECT value FROM records WHERE key = ?", (stored_key,))
        return self._open_record(stored_key, stored[0][0])[1] if stored else None

    def has_state(self) -> bool:
        return bool(self._read("SELECT 1 FROM records LIMIT 1"))

    def outbox(self) -> list[tuple[int, OutboxItem]]:
        """What waits to be sent, in order: sends, and messages still to encrypt.

        A row that does not read is left out (and waits for :meth:`set_aside`).
        """
        stored = self._read("SELECT id, send FROM outbox ORDER BY position, id")
        return self._readable("outbox", stored, rows.decode_send)

    def inbox(self) -> list[tuple[int, StoredEvent]]:
        """The events the app has not taken, in order (unreadable ones left out, as outbox())."""
        stored = self._read("SELECT id, event FROM inbox ORDER BY id")
        return self._readable("inbox", stored, rows.decode_event)

    def _readable(
        self, table: str, stored: list[Any], decode: Callable[[bytes], _Item]
    ) -> list[tuple[int, _Item]]:
        readable = []
        for row_id, data in stored:
            try:
                readable.append((row_id, decode(self._codec.open(table, _row(row_id), data))))
            except StateError as exc:
                self._unreadable[(table, row_id)] = exc.code
        return readable

    @property
    def has_unreadable(self) -> bool:
        """Whether a read met rows that :meth:`set_aside` should move."""
        return bool(self._unreadable)

    def _find_unreadable(self) -> None:
        self.records()
        self.outbox()
        self.inbox()
        self.deliveries()

    def set_aside(self) -> list[int]:
        """Move the unreadable rows reads met into ``set_aside``, each reported by an event.

        One transaction; the new inbox rows (StoredItemSetAside events).
        """
        found, self._unreadable = self._unreadable, {}
        moves = [(table, row_id, "", reason) for (table, row_id), reason in found.items()]
        try:
            return self._move_aside(moves)
        except BaseException:
            self._unreadable.update(found)
            raise

    def set_aside_records(self, corrupt: Mapping[core.RecordKey, str]) -> list[int]:
        """Move records the core could not load (with their error codes) into ``set_aside``."""
        if not all(isinstance(key, core.RecordKey) for key in corrupt):
            raise InvalidArgument("records are named by RecordKeys")
        moves = []
        for key, reason in corrupt.items():
            stored_key = self._codec.index(key.encode())
            found = self._read("SELECT rowid FROM records WHERE key = ?", (stored_key,))
            if found:
                moves.append(("records", int(found[0][0]), key.kind.value, str(reason)))
        return self._move_aside(moves)

    def _move_aside(self, moves: list[tuple[str, int, str, str]]) -> list[int]:
        """Each row as stored (sealed, in an encrypted store) into set_aside, an event for each."""
        if not moves:
            return []
        key_column = {"records": "rowid", "outbox": "id", "inbox": "id", "deliveries": "rowid"}
        data_column = {
            "records": "key, value",
            "outbox": "send",
            "inbox": "event",
            "deliveries": "message, data",
        }
        inbox_ids = []
        cursor = self._db.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            for table, row_id, kind, reason in moves:
                where = f"FROM {table} WHERE {key_column[table]} = ?"
                stored = cursor.execute(f"SELECT {data_column[table]} {where}", (row_id,))
                row = stored.fetchone()
                if row is None:
                    continue
                data = pack(list(row)) if len(row) > 1 else row[0]
                cursor.execute(
                    "INSERT INTO set_aside (source, row, data, reason) VALUES (?, ?, ?, ?)",
                    (table, _row(row_id), data, reason),
                )
                cursor.execute(f"DELETE {where}", (row_id,))
                event = rows.encode_event(StoredItemSetAside(table, kind, reason))
                inbox_ids.append(self._insert(cursor, "inbox", event))
            cursor.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                cursor.execute("ROLLBACK")
            raise _store_error(exc, "writing the client store") from exc
        return inbox_ids

    def deliveries(self) -> dict[bytes, tuple[int, tuple[core.Address, ...]]]:
        """The messages awaiting delivery receipts: their deadline and the devices yet to confirm.

        A row that does not read is left out (and waits for :meth:`set_aside`).
        """
        tracked = {}
        for rowid, message, data, deadline in self._read(
            "SELECT rowid, message, data, deadline FROM deliveries"
        ):
            try:
                message_id, devices = _open_delivery(self._codec.open("deliveries", message, data))
                if not hmac.compare_digest(self._codec.index(message_id), message):
                    raise StateError("a delivery row is stored under another message")
            except StateError as exc:
                self._unreadable[("deliveries", rowid)] = exc.code
                continue
            tracked[message_id] = (int(deadline), devices)
        return tracked

    def was_processed(self, guid: bytes) -> bool:
        _check_guid(guid)
        found = self._read("SELECT 1 FROM processed WHERE guid = ?", (self._codec.index(guid),))
        return bool(found)

    # ------------------------------------------------------------ writes

    def commit(
        self,
        changes: Mapping[core.RecordKey, bytes | None],
        *,
        sends: Sequence[OutboxItem] = (),
        position: int | None = None,
        events: Sequence[StoredEvent] = (),
        processed: tuple[bytes, int] | None = None,
        sent: Iterable[int] = (),
        taken: Iterable[int] = (),
        deliveries: Mapping[bytes, tuple[int, tuple[core.Address, ...]] | None] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Apply everything in one transaction; the new outbox and inbox row ids.

        ``sends`` join the outbox at its end, or at ``position`` (where the
        queued message they encrypt was: :meth:`position_of`). ``sent`` and
        ``taken`` are outbox and inbox rows to delete. ``deliveries`` sets
        (deadline, devices) or deletes (None) the delivery tracked for each
        message id. Every argument is checked before anything is written;
        StoreFailed (StoreFull) if the write fails, with nothing changed.
        """
        delivery_rows = _checked_deliveries(deliveries or {})
        records = _checked_changes(changes)
        outbox_rows = [rows.encode_send(_checked_send(send)) for send in sends]
        inbox_rows = [rows.encode_event(_checked_event(event)) for event in events]
        if processed is not None:
            guid, at = (
                processed
                if isinstance(processed, tuple) and len(processed) == 2
                else (
                    None,
                    None,
                )
            )
            processed = (self._codec.index(_check_guid(guid)), check_now(at))
        sent_ids, taken_ids = _checked_ids(sent), _checked_ids(taken)
        if position is not None:
            _checked_ids([position])
        try:
            return self._write(
                records,
                outbox_rows,
                position,
                inbox_rows,
                processed,
                sent_ids,
                taken_ids,
                delivery_rows,
            )
        except sqlite3.Error as exc:
            raise _store_error(exc, "writing the client store") from exc

    def _write(
        self,
        records: list[tuple[bytes, bytes | None]],
        outbox_rows: list[bytes],
        position: int | None,
        inbox_rows: list[bytes],
        processed: tuple[bytes, int] | None,
        sent: list[int],
        taken: list[int],
        deliveries: list[tuple[bytes, bytes | None, int]],
    ) -> tuple[list[int], list[int]]:
        cursor = self._db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for key, value in records:
                if value is None:
                    stored_key = self._codec.index(key)
                    cursor.execute("DELETE FROM records WHERE key = ?", (stored_key,))
                else:
                    cursor.execute(
                        "INSERT OR REPLACE INTO records (key, value) VALUES (?, ?)",
                        self._seal_record(key, value),
                    )
            outbox_ids = [
                self._insert(cursor, "outbox", data, position=position) for data in outbox_rows
            ]
            inbox_ids = [self._insert(cursor, "inbox", data) for data in inbox_rows]
            if processed is not None:
                cursor.execute(
                    "INSERT OR IGNORE INTO processed (guid, at) VALUES (?, ?)", processed
                )
            cursor.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in sent])
            cursor.executemany("DELETE FROM inbox WHERE id = ?", [(i,) for i in taken])
            for message_id, data, deadline in deliveries:
                message = self._codec.index(message_id)
                if data is None:
                    cursor.execute("DELETE FROM deliveries WHERE message = ?", (message,))
                else:
                    cursor.execute(
                        "INSERT OR REPLACE INTO deliveries (message, data, deadline) "
                        "VALUES (?, ?, ?)",
                        (message, self._codec.seal("deliveries", message, data), deadline),
                    )
            cursor.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself after some errors (a full disk among them):
            # a ROLLBACK then would fail, and hide the real cause.
            if self._db.in_transaction:
                cursor.execute("ROLLBACK")
            raise
        return outbox_ids, inbox_ids

    def _insert(
        self, cursor: sqlite3.Cursor, table: str, data: bytes, *, position: int | None = None
    ) -> int:
        """Add a row to the outbox or inbox, sealed with its id; its id."""
        row_id = _next_id(cursor, table)
        sealed = self._codec.seal(table, _row(row_id), data)
        if table == "outbox":
            cursor.execute(
                "INSERT INTO outbox (id, send, position) VALUES (?, ?, ?)",
                (row_id, sealed, row_id if position is None else position),
            )
        else:
            cursor.execute("INSERT INTO inbox (id, event) VALUES (?, ?)", (row_id, sealed))
        return row_id

    def position_of(self, row_id: int) -> int | None:
        """Where an outbox row stands in the outbox's order (None if it is gone)."""
        _checked_ids([row_id])
        stored = self._read("SELECT position FROM outbox WHERE id = ?", (row_id,))
        return int(stored[0][0]) if stored else None

    def checkpoint(self) -> None:
        """Copy the WAL into the database and empty it (its file shrinks to nothing)."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            raise _store_error(exc, "writing the client store") from exc

    def forget_processed_before(self, cutoff: int) -> int:
        """Drop processed guids older than ``cutoff`` (the relay keeps nothing longer); how many.

        Then the WAL is emptied into the database, so what was deleted does
        not keep its space there.
        """
        check_now(cutoff)
        try:
            forgotten = self._db.execute("DELETE FROM processed WHERE at < ?", (cutoff,)).rowcount
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            raise _store_error(exc, "writing the client store") from exc
        return int(forgotten)


def _row(row_id: int) -> bytes:
    """An outbox or inbox row's identity in associated data and in set_aside."""
    return row_id.to_bytes(8, "big")


def _next_id(cursor: sqlite3.Cursor, table: str) -> int:
    """The id AUTOINCREMENT would give the next row of ``table`` (never one used before)."""
    found = cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return (0 if found is None else int(found[0])) + 1


def _codec(db: sqlite3.Connection, path: str, key: bytes | None) -> StoreCodec:
    """How this store's values are kept: the key checked, a plaintext store encrypted."""
    meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
    salt = meta.get("salt")
    if salt is None:
        return PlainCodec() if key is None else _encrypt(db, key)
    if key is None:
        raise WrongStoreKey(f"the client store {path} is encrypted: open it with its key")
    cipher = StoreCipher(key, salt)
    try:
        if cipher.open("meta", b"key_check", meta.get("key_check", b"")) != KEY_CHECK:
            raise StateError("the key check holds something else")
    except StateError:
        raise WrongStoreKey(f"this key does not open the client store {path}") from None
    return cipher


def _encrypt(db: sqlite3.Connection, key: bytes) -> StoreCipher:
    """Encrypt a store written without a key, in one transaction; then leave no plaintext.

    Every record, outbox, inbox, delivery and set-aside row is sealed and
    every guid and tracked message id replaced by its keyed hash. VACUUM then
    rewrites the database file, so no free page keeps an old plaintext row,
    and the WAL is emptied.
    """
    salt = os.urandom(SALT_SIZE)
    cipher = StoreCipher(key, salt)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("INSERT INTO meta (name, value) VALUES ('salt', ?)", (salt,))
        check = cipher.seal("meta", b"key_check", KEY_CHECK)
        db.execute("INSERT INTO meta (name, value) VALUES ('key_check', ?)", (check,))
        records = db.execute("SELECT key, value FROM records").fetchall()
        db.execute("DELETE FROM records")
        for key_bytes, value in records:
            stored_key = cipher.index(key_bytes)
            sealed = cipher.seal("records", stored_key, pack([bytes(key_bytes), bytes(value)]))
            db.execute("INSERT INTO records (key, value) VALUES (?, ?)", (stored_key, sealed))
        for table, column in (("outbox", "send"), ("inbox", "event"), ("set_aside", "data")):
            for row_id, data in db.execute(f"SELECT id, {column} FROM {table}").fetchall():
                sealed = cipher.seal(table, _row(row_id), bytes(data))
                db.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", (sealed, row_id))
        deliveries = db.execute("SELECT message, data, deadline FROM deliveries").fetchall()
        db.execute("DELETE FROM deliveries")
        for message, data, deadline in deliveries:
            stored = cipher.index(bytes(message))
            db.execute(
                "INSERT INTO deliveries (message, data, deadline) VALUES (?, ?, ?)",
                (stored, cipher.seal("deliveries", stored, bytes(data)), deadline),
            )
        processed = db.execute("SELECT guid, at FROM processed").fetchall()
        db.execute("DELETE FROM processed")
        db.executemany(
            "INSERT INTO processed (guid, at) VALUES (?, ?)",
            [(cipher.index(bytes(guid)), at) for guid, at in processed],
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("VACUUM")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return cipher


def _check_guid(guid: object) -> bytes:
    if not isinstance(guid, bytes) or len(guid) != GUID_SIZE:
        raise InvalidArgument(f"an envelope guid is {GUID_SIZE} bytes")
    return guid


def _checked_changes(changes: object) -> list[tuple[bytes, bytes | None]]:
    if not isinstance(changes, Mapping):
        raise InvalidArgument("changes map record keys to bytes or None")
    checked = []
    for key, value in changes.items():
        if not isinstance(key, core.RecordKey) or not (value is None or isinstance(value, bytes)):
            raise InvalidArgument("changes map record keys to bytes or None")
        checked.append((key.encode(), value))
    return checked


def _checked_deliveries(
    deliveries: Mapping[bytes, tuple[int, tuple[core.Address, ...]] | None],
) -> list[tuple[bytes, bytes | None, int]]:
    """Each (message id, sealed-to-be row data or None, deadline), checked."""
    checked: list[tuple[bytes, bytes | None, int]] = []
    for message_id, tracked in deliveries.items():
        if not isinstance(message_id, bytes) or len(message_id) != MESSAGE_ID_SIZE:
            raise InvalidArgument(f"a message id is {MESSAGE_ID_SIZE} bytes")
        if tracked is None:
            checked.append((message_id, None, 0))
            continue
        deadline, devices = tracked
        check_now(deadline)
        if not all(isinstance(a, core.Address) for a in devices):
            raise InvalidArgument("a delivery is tracked for device addresses")
        data = pack([message_id, [[a.user_id, a.device_id] for a in devices]])
        checked.append((message_id, data, deadline))
    return checked


def _open_delivery(data: bytes) -> tuple[bytes, tuple[core.Address, ...]]:
    try:
        f = Fields.decode(data, what="delivery", count=2, max_size=MAX_STATE_SIZE)
        message_id = f.bin(MESSAGE_ID_SIZE)
        devices = []
        for item in f.array(max_len=MAX_RECIPIENTS_PER_SEND):
            address = Fields(item, what="delivery device", count=2)
            devices.append(core.Address(read_user_id(address, stored=True), address.uint()))
    except DecodeError as exc:
        raise StateError(f"a delivery row does not decode ({exc.message})") from exc
    return message_id, tuple(devices)


def _checked_send(send: object) -> OutboxItem:
    if not isinstance(
        send,
        core.DirectSend | core.GroupSend | core.ChangeSend | QueuedMessage | QueuedReceipt | Resend,
    ):
        raise InvalidArgument("the outbox holds sends and queued messages")
    if isinstance(send, Resend) and not isinstance(send.send, core.DirectSend | core.GroupSend):
        raise InvalidArgument("only a direct or group send is sent again")
    return send


def _checked_event(event: object) -> StoredEvent:
    if not isinstance(event, get_args(StoredEvent)):
        raise InvalidArgument("the inbox holds events")
    return cast(StoredEvent, event)


def _checked_ids(ids: Iterable[object]) -> list[int]:
    checked = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in checked):
        raise InvalidArgument("row ids are integers from 0")
    return cast(list[int], checked)
