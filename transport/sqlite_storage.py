"""The relay's storage on one SQLite file.

* WAL journal with ``synchronous=FULL``: a transaction is on disk (WAL
  fsynced) when COMMIT returns, so "accepted" survives a crash or power
  loss, not only a process exit (NORMAL would lose the last commits on
  power loss).
* ``secure_delete=ON`` and a WAL truncation on every purge and on close:
  acknowledged or expired ciphertext is overwritten, not left in free pages.
* One connection, used by one thread at a time (a trio CapacityLimiter of
  1 around ``trio.to_thread.run_sync``), so the event loop never blocks on
  disk and every method is one serial ``BEGIN IMMEDIATE`` transaction.
  Take-once of prekeys is a single ``DELETE ... RETURNING`` inside it, so
  even several relay processes sharing the file hand out a key only once.

Device-list counters are u64 and SQLite integers are i64, so counters are
stored as 8-byte big-endian blobs (compared only for equality).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import trio

from protocol.errors import UnknownStateVersion
from protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic

from .errors import MailboxFull, PreKeyIdInUse, PreKeyStockFull, UnknownDevice
from .records import Envelope, PreKeyCounts
from .storage import (
    EnvelopeBatch,
    QueuedEnvelope,
    StorageConflict,
    StoredDeviceList,
    TakenBundle,
)

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
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

_PREKEY_TABLES = (
    "signed_prekeys",
    "last_resort_kem_prekeys",
    "one_time_prekeys",
    "one_time_kem_prekeys",
)


def _counter_blob(counter: int) -> bytes:
    return counter.to_bytes(8, "big")


class SqliteDatabase:
    """The synchronous implementation; :class:`SqliteStorage` runs it off the event loop.

    Not thread-safe by itself: one call at a time.
    """

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA secure_delete=ON")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # IF NOT EXISTS throughout: two relays creating one file at once both succeed.
                self._conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            elif version != SCHEMA_VERSION:
                raise UnknownStateVersion(f"relay database schema version {version}")
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ---------------------------------------------------------------- users and devices

    def device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        found: dict[str, StoredDeviceList] = {}
        with self._transaction() as db:
            for user_id in dict.fromkeys(user_ids):
                row = db.execute(
                    "SELECT user_identity, counter, signed FROM users WHERE user_id = ?",
                    (user_id,),
                ).fetchone()
                if row is None:
                    continue
                devices = db.execute(
                    "SELECT device_id, identity FROM devices WHERE user_id = ? ORDER BY device_id",
                    (user_id,),
                ).fetchall()
                found[user_id] = StoredDeviceList(
                    user_id,
                    row[0],
                    int.from_bytes(row[1], "big"),
                    row[2],
                    tuple((d, i) for d, i in devices),
                )
        return found

    def store_device_list(
        self, new: StoredDeviceList, *, previous_counter: int | None
    ) -> tuple[int, ...]:
        with self._transaction() as db:
            row = db.execute(
                "SELECT counter FROM users WHERE user_id = ?", (new.user_id,)
            ).fetchone()
            stored = None if row is None else int.from_bytes(row[0], "big")
            if stored != previous_counter:
                raise StorageConflict("the device list changed meanwhile")
            old = dict(
                db.execute(
                    "SELECT device_id, identity FROM devices WHERE user_id = ?", (new.user_id,)
                ).fetchall()
            )
            wanted = dict(new.devices)
            removed = tuple(sorted(d for d, ident in old.items() if wanted.get(d) != ident))
            for device_id in removed:
                self._wipe_device(db, new.user_id, device_id)
            db.executemany(
                "INSERT INTO devices (user_id, device_id, identity) VALUES (?, ?, ?)",
                [
                    (new.user_id, d, ident)
                    for d, ident in new.devices
                    if d not in old or d in removed
                ],
            )
            db.execute(
                "INSERT OR REPLACE INTO users (user_id, user_identity, counter, signed) "
                "VALUES (?, ?, ?, ?)",
                (new.user_id, new.user_identity, _counter_blob(new.counter), new.signed),
            )
        return removed

    @staticmethod
    def _wipe_device(db: sqlite3.Connection, user_id: str, device_id: int) -> None:
        key = (user_id, device_id)
        db.execute("DELETE FROM deliveries WHERE user_id = ? AND device_id = ?", key)
        for table in _PREKEY_TABLES:
            db.execute(f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?", key)
        db.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", key)

    # ---------------------------------------------------------------- prekeys

    def store_prekeys(
        self,
        user_id: str,
        device_id: int,
        *,
        signed_prekey: SignedPreKeyPublic | None,
        last_resort_kem: KemPreKeyPublic | None,
        one_time: Sequence[OneTimePreKeyPublic],
        one_time_kem: Sequence[KemPreKeyPublic],
        max_stored: int,
    ) -> PreKeyCounts:
        key = (user_id, device_id)
        with self._transaction() as db:
            if (
                db.execute(
                    "SELECT 1 FROM devices WHERE user_id = ? AND device_id = ?", key
                ).fetchone()
                is None
            ):
                raise UnknownDevice("the device is not in its user's list")
            if signed_prekey is not None:
                db.execute(
                    "INSERT OR REPLACE INTO signed_prekeys VALUES (?, ?, ?, ?, ?)",
                    (*key, signed_prekey.key_id, signed_prekey.public, signed_prekey.signature),
                )
            if last_resort_kem is not None:
                db.execute(
                    "INSERT OR REPLACE INTO last_resort_kem_prekeys VALUES (?, ?, ?, ?, ?)",
                    (
                        *key,
                        last_resort_kem.key_id,
                        last_resort_kem.public,
                        last_resort_kem.signature,
                    ),
                )
            try:
                db.executemany(
                    "INSERT INTO one_time_prekeys VALUES (?, ?, ?, ?)",
                    [(*key, k.key_id, k.public) for k in one_time],
                )
                db.executemany(
                    "INSERT INTO one_time_kem_prekeys VALUES (?, ?, ?, ?, ?)",
                    [(*key, k.key_id, k.public, k.signature) for k in one_time_kem],
                )
            except sqlite3.IntegrityError:
                raise PreKeyIdInUse("a one-time prekey id is already in use") from None
            counts = self._counts(db, key)
            if max(counts.one_time, counts.one_time_kem) > max_stored:
                raise PreKeyStockFull(f"at most {max_stored} one-time prekeys of a kind")
        return counts

    @staticmethod
    def _counts(db: sqlite3.Connection, key: tuple[str, int]) -> PreKeyCounts:
        where = "WHERE user_id = ? AND device_id = ?"
        (one_time,) = db.execute(f"SELECT COUNT(*) FROM one_time_prekeys {where}", key).fetchone()
        (kem,) = db.execute(f"SELECT COUNT(*) FROM one_time_kem_prekeys {where}", key).fetchone()
        return PreKeyCounts(one_time, kem)

    def prekey_counts(self, user_id: str, device_id: int) -> PreKeyCounts:
        with self._transaction() as db:
            return self._counts(db, (user_id, device_id))

    def take_bundle(self, user_id: str, device_id: int) -> TakenBundle | None:
        key = (user_id, device_id)
        where = "WHERE user_id = ? AND device_id = ?"
        with self._transaction() as db:
            device = db.execute(f"SELECT identity FROM devices {where}", key).fetchone()
            spk = db.execute(
                f"SELECT key_id, public, signature FROM signed_prekeys {where}", key
            ).fetchone()
            if device is None or spk is None:
                return None
            # Take-once: the row is deleted and returned by one statement.
            kem = db.execute(
                f"DELETE FROM one_time_kem_prekeys {where} AND key_id = "
                f"(SELECT MIN(key_id) FROM one_time_kem_prekeys {where}) "
                "RETURNING key_id, public, signature",
                key + key,
            ).fetchone()
            last_resort = kem is None
            if last_resort:
                kem = db.execute(
                    f"SELECT key_id, public, signature FROM last_resort_kem_prekeys {where}", key
                ).fetchone()
                if kem is None:
                    return None
            opk = db.execute(
                f"DELETE FROM one_time_prekeys {where} AND key_id = "
                f"(SELECT MIN(key_id) FROM one_time_prekeys {where}) RETURNING key_id, public",
                key + key,
            ).fetchone()
            remaining = self._counts(db, key)
        return TakenBundle(
            identity=device[0],
            signed_prekey=SignedPreKeyPublic(*spk),
            one_time=None if opk is None else OneTimePreKeyPublic(*opk),
            kem=KemPreKeyPublic(*kem),
            kem_is_last_resort=last_resort,
            remaining=remaining,
        )

    # ---------------------------------------------------------------- mailboxes

    def enqueue(self, batch: EnvelopeBatch, *, max_mailbox_size: int) -> None:
        with self._transaction() as db:
            for user_id, counter in batch.device_list_counters.items():
                row = db.execute(
                    "SELECT counter FROM users WHERE user_id = ?", (user_id,)
                ).fetchone()
                if row is None or int.from_bytes(row[0], "big") != counter:
                    raise StorageConflict("a recipient's device list changed meanwhile")
            full = []
            for d in batch.deliveries:
                row = db.execute(
                    "SELECT queued FROM devices WHERE user_id = ? AND device_id = ?",
                    (d.user_id, d.device_id),
                ).fetchone()
                if row is None:
                    raise StorageConflict("a recipient device is gone")
                if row[0] >= max_mailbox_size:
                    full.append((d.user_id, d.device_id))
            if full:
                raise MailboxFull(f"{len(full)} recipient mailboxes are full", devices=full)
            payload_ids = [
                db.execute(
                    "INSERT INTO payloads (sender_user, sender_device, kind, server_ts, data) "
                    "VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (batch.sender_user, batch.sender_device, batch.kind, batch.server_ts, data),
                ).fetchone()[0]
                for data in batch.payloads
            ]
            db.executemany(
                "INSERT INTO deliveries (user_id, device_id, guid, payload_id, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (d.user_id, d.device_id, d.guid, payload_ids[d.payload_index], batch.expires_at)
                    for d in batch.deliveries
                ],
            )

    def pending(
        self, user_id: str, device_id: int, *, after_seq: int, limit: int, now: int
    ) -> list[QueuedEnvelope]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT d.seq, d.guid, p.server_ts, p.sender_user, p.sender_device, p.kind, "
                "p.data FROM deliveries AS d JOIN payloads AS p ON p.id = d.payload_id "
                "WHERE d.user_id = ? AND d.device_id = ? AND d.seq > ? AND d.expires_at > ? "
                "ORDER BY d.seq LIMIT ?",
                (user_id, device_id, after_seq, now, limit),
            ).fetchall()
        return [QueuedEnvelope(row[0], Envelope(*row[1:])) for row in rows]

    def acknowledge(self, user_id: str, device_id: int, guid: bytes) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM deliveries WHERE user_id = ? AND device_id = ? AND guid = ?",
                (user_id, device_id, guid),
            )
            return cursor.rowcount > 0

    def purge_expired(self, now: int) -> int:
        with self._transaction() as db:
            count = db.execute("DELETE FROM deliveries WHERE expires_at <= ?", (now,)).rowcount
        self._truncate_wal()
        return count

    def _truncate_wal(self) -> None:
        # Old page images (deleted ciphertext) live in the WAL until it is reset.
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self._truncate_wal()
        self._conn.close()


class SqliteStorage:
    """:class:`~transport.storage.RelayStorage` on a SQLite file, off the event loop."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: str) -> SqliteStorage:
        """Open (creating if needed) the database at ``path`` (``":memory:"``: a temporary one)."""
        return cls(await trio.to_thread.run_sync(SqliteDatabase, path))

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # One thread at a time; the call completes even if the caller is
        # cancelled, so a commit is never half-observed.
        return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self._limiter)

    async def device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        return await self._run(self._db.device_lists, user_ids)

    async def store_device_list(
        self, new: StoredDeviceList, *, previous_counter: int | None
    ) -> tuple[int, ...]:
        return await self._run(self._db.store_device_list, new, previous_counter=previous_counter)

    async def store_prekeys(
        self,
        user_id: str,
        device_id: int,
        *,
        signed_prekey: SignedPreKeyPublic | None,
        last_resort_kem: KemPreKeyPublic | None,
        one_time: Sequence[OneTimePreKeyPublic],
        one_time_kem: Sequence[KemPreKeyPublic],
        max_stored: int,
    ) -> PreKeyCounts:
        return await self._run(
            self._db.store_prekeys,
            user_id,
            device_id,
            signed_prekey=signed_prekey,
            last_resort_kem=last_resort_kem,
            one_time=one_time,
            one_time_kem=one_time_kem,
            max_stored=max_stored,
        )

    async def prekey_counts(self, user_id: str, device_id: int) -> PreKeyCounts:
        return await self._run(self._db.prekey_counts, user_id, device_id)

    async def take_bundle(self, user_id: str, device_id: int) -> TakenBundle | None:
        return await self._run(self._db.take_bundle, user_id, device_id)

    async def enqueue(self, batch: EnvelopeBatch, *, max_mailbox_size: int) -> None:
        await self._run(self._db.enqueue, batch, max_mailbox_size=max_mailbox_size)

    async def pending(
        self, user_id: str, device_id: int, *, after_seq: int, limit: int, now: int
    ) -> list[QueuedEnvelope]:
        return await self._run(
            self._db.pending, user_id, device_id, after_seq=after_seq, limit=limit, now=now
        )

    async def acknowledge(self, user_id: str, device_id: int, guid: bytes) -> bool:
        return await self._run(self._db.acknowledge, user_id, device_id, guid)

    async def purge_expired(self, now: int) -> int:
        return await self._run(self._db.purge_expired, now)

    async def aclose(self) -> None:
        await self._run(self._db.close)
