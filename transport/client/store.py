"""A client's durable state: one SQLite file, one writer.

Tables:

* ``records``: the :class:`~hushchat.protocol.client_core.ClientCore` records
  (account, device lists, sessions, sender keys, groups) and the client's
  own, keyed by their encoded :class:`~hushchat.protocol.client_core.RecordKey`;
* ``outbox``: sends encrypted but not yet accepted by the relay (sent again
  after a restart, in order);
* ``inbox``: events not yet taken by the app (a crash after the relay was
  acknowledged loses no message);
* ``processed``: guids of envelopes already processed, so one delivered
  again (our acknowledgement was lost) is acknowledged without processing.

Each :meth:`ClientStore.commit` is one transaction: records, outbox rows,
inbox rows and the processed guid change together or not at all, which is
what "persist before acknowledging" needs. A second process opening the
same store fails with :class:`StoreLocked` (an exclusive ``flock`` on a lock
file beside the database), because two writers would fork the ratchets.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

from hushchat.protocol import client_core as core
from hushchat.protocol import group
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import ProtocolError, StateError

from ..wire.errors import TransportError


class StoreLocked(TransportError):
    """Another process has this client store open."""

    code = "STORE_LOCKED"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (key BLOB PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, send BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS processed (guid BLOB PRIMARY KEY, at INTEGER NOT NULL);
"""

# Event and send classes a store can hold, by name (the names are stored).
_CLASSES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        core.Address,
        core.MessageReceived,
        core.MessageSentByOtherDevice,
        core.DeviceAdded,
        core.DeviceRemoved,
        core.IdentityChanged,
        core.Undecryptable,
        core.GroupUpdated,
        core.RetryRequested,
        core.DirectSend,
        core.GroupSend,
        group.MemberAdded,
        group.MemberRemoved,
        group.AdminChanged,
        group.TitleChanged,
    )
}


def _to_wire(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _CLASSES.get(name) is not type(value):
            raise TypeError(f"{name} cannot be stored")
        return ["d", name, [_to_wire(getattr(value, f.name)) for f in fields(value)]]
    if isinstance(value, tuple):
        return ["t", [_to_wire(item) for item in value]]
    return ["v", value]


def _from_wire(value: Any) -> Any:
    # Exactly the shapes _to_wire makes; anything else is corrupt (ValueError).
    if not isinstance(value, list) or len(value) != (3 if value[:1] == ["d"] else 2):
        raise ValueError("not a stored item")
    tag = value[0]
    if tag == "d" and isinstance(value[2], list):
        return _CLASSES[value[1]](*[_from_wire(item) for item in value[2]])
    if tag == "t" and isinstance(value[1], list):
        return tuple(_from_wire(item) for item in value[1])
    if tag == "v":
        return value[1]
    raise ValueError("not a stored item")


def encode_item(value: core.Event | core.Send) -> bytes:
    """Serialize an event or a send for the inbox or outbox."""
    return pack(_to_wire(value))


def decode_item(data: bytes) -> Any:
    """Inverse of :func:`encode_item`; StateError if the bytes are not one."""
    try:
        return _from_wire(unpack(data, what="stored item"))
    except (ProtocolError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise StateError("stored item is corrupt") from exc


class ClientStore:
    """The SQLite file behind one client device. Use :meth:`open`; close when done."""

    def __init__(self, connection: sqlite3.Connection, lock_fd: int, path: str) -> None:
        self._db = connection
        self._lock_fd = lock_fd
        self.path = path

    @classmethod
    def open(cls, path: str) -> ClientStore:
        """Open (creating if needed) the store at ``path``; StoreLocked if in use."""
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreLocked(f"the client store {path} is open in another process") from None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transaction survives power loss, as the relay's
            # acknowledgement that follows it deletes the only other copy.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            os.chmod(path, 0o600)
        except BaseException:
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
        rows = self._db.execute("SELECT id, send FROM outbox ORDER BY id").fetchall()
        return [(row_id, decode_item(data)) for row_id, data in rows]

    def inbox(self) -> list[tuple[int, core.Event]]:
        rows = self._db.execute("SELECT id, event FROM inbox ORDER BY id").fetchall()
        return [(row_id, decode_item(data)) for row_id, data in rows]

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
                cursor.execute("INSERT INTO outbox (send) VALUES (?)", (encode_item(send),))
                outbox_ids.append(int(cursor.lastrowid or 0))
            inbox_ids = []
            for event in events:
                cursor.execute("INSERT INTO inbox (event) VALUES (?)", (encode_item(event),))
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
