"""The relay's storage on one SQLite file: :class:`SqliteStorage`.

* WAL journal with ``synchronous=FULL``: a transaction is on disk (WAL
  fsynced) when COMMIT returns, so "accepted" survives a crash or power
  loss, not only a process exit (NORMAL would lose the last commits on
  power loss).
* ``secure_delete=ON`` and a WAL truncation on every purge and on close:
  acknowledged or expired ciphertext is overwritten, not left in free pages
  (a reader of another process can put a truncation off to the next one).
* Group commit (:mod:`.writer`): every call runs in one writer thread, the
  calls queued together as one transaction with a savepoint each, so a
  batch shares one fsync and a returned value means "committed".
* Take-once of prekeys is a single ``DELETE ... RETURNING`` inside the
  transaction, so even several relay processes sharing the file (each
  batch holds the write lock from BEGIN IMMEDIATE to COMMIT) hand out a
  key only once.

:class:`SqliteDatabase` holds the queries, synchronous; :class:`SqliteStorage`
is the :class:`~.interface.RelayStorage` that runs them in the writer. The
tables are in :mod:`.schema`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TypeVar, cast

import trio

from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic

from ...wire.errors import MailboxFull, PreKeyIdInUse, PreKeyStockFull, UnknownDevice
from ...wire.records import Envelope, PreKeyCounts
from .interface import (
    EnvelopeBatch,
    QueuedEnvelope,
    StorageConflict,
    StoredDeviceList,
    TakenBundle,
)
from .schema import PREKEY_TABLES, counter_blob, create_or_check_schema
from .writer import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUED,
    DatabaseCall,
    GroupCommitWriter,
    run_batch,
)

T = TypeVar("T")
S = TypeVar("S")

# How long a transaction waits for another process holding the database's
# write lock (several relays may share the file) before it fails (SQLite
# busy timeout; Python's default).
BUSY_TIMEOUT_MS = 5000

# How long closing waits for readers of other processes before it leaves
# the WAL untruncated (it is truncated at the next sweep or close): a
# shell left open on the file must not hold up a relay's shutdown.
CLOSE_CHECKPOINT_WAIT_MS = 1000

# Rows one statement reads or inserts at most when a send names many devices:
# SQLite binds at most 32,766 variables per statement (5 per delivery row).
ROWS_PER_STATEMENT = 1000


class SqliteDatabase:
    """The synchronous implementation; :class:`SqliteStorage` runs it in its writer thread.

    Not thread-safe by itself: one call at a time. The public methods each
    run as one transaction (a batch of one call); :meth:`run_batch` runs
    many in one.
    """

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(
            path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA secure_delete=ON")
            create_or_check_schema(self._conn)
        except BaseException:
            self._conn.close()
            raise

    # ---------------------------------------------------------------- transactions

    def run_batch(self, calls: Sequence[DatabaseCall]) -> None:
        """Run ``calls`` as one transaction, each in a savepoint (:func:`.writer.run_batch`)."""
        run_batch(self._conn, calls)

    def _single(
        self,
        run: Callable[[], T],
        *,
        savepoint: bool = True,
        after_commit: Callable[[], None] | None = None,
    ) -> T:
        call = DatabaseCall(run, savepoint=savepoint, after_commit=after_commit)
        self.run_batch([call])
        return cast(T, call.outcome())

    # ---------------------------------------------------------------- one transaction per call

    def device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        return self._single(partial(self._device_lists, user_ids), savepoint=False)

    def store_device_list(
        self, new: StoredDeviceList, *, previous_counter: int | None
    ) -> tuple[int, ...]:
        return self._single(partial(self._store_device_list, new, previous_counter))

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
        return self._single(
            partial(
                self._store_prekeys,
                user_id,
                device_id,
                signed_prekey,
                last_resort_kem,
                one_time,
                one_time_kem,
                max_stored,
            )
        )

    def prekey_counts(self, user_id: str, device_id: int) -> PreKeyCounts:
        return self._single(partial(self._counts, (user_id, device_id)), savepoint=False)

    def take_bundle(self, user_id: str, device_id: int) -> TakenBundle | None:
        return self._single(partial(self._take_bundle, user_id, device_id))

    def enqueue(self, batch: EnvelopeBatch, *, max_mailbox_size: int) -> list[int]:
        """Store a send; the deliveries' mailbox positions (seq)."""
        return self._single(partial(self._enqueue, batch, max_mailbox_size))

    def pending(
        self, user_id: str, device_id: int, *, after_seq: int, limit: int, now: int
    ) -> list[QueuedEnvelope]:
        return self._single(
            partial(self._pending, user_id, device_id, after_seq, limit, now), savepoint=False
        )

    def acknowledge(self, user_id: str, device_id: int, guids: Sequence[bytes]) -> int:
        return self._single(partial(self._acknowledge, user_id, device_id, guids), savepoint=False)

    def purge_expired(self, now: int) -> int:
        return self._single(
            partial(self._purge_expired, now), savepoint=False, after_commit=self._truncate_wal
        )

    def close(self) -> None:
        self._truncate_wal(wait_ms=CLOSE_CHECKPOINT_WAIT_MS)
        self._conn.close()

    # ---------------------------------------------------------------- users and devices
    # The methods below run inside a transaction (run_batch); they never commit.

    def _device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        db = self._conn
        found: dict[str, StoredDeviceList] = {}
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

    def _store_device_list(
        self, new: StoredDeviceList, previous_counter: int | None
    ) -> tuple[int, ...]:
        db = self._conn
        row = db.execute("SELECT counter FROM users WHERE user_id = ?", (new.user_id,)).fetchone()
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
            self._wipe_device(new.user_id, device_id)
        db.executemany(
            "INSERT INTO devices (user_id, device_id, identity) VALUES (?, ?, ?)",
            [(new.user_id, d, ident) for d, ident in new.devices if d not in old or d in removed],
        )
        db.execute(
            "INSERT OR REPLACE INTO users (user_id, user_identity, counter, signed) "
            "VALUES (?, ?, ?, ?)",
            (new.user_id, new.user_identity, counter_blob(new.counter), new.signed),
        )
        return removed

    def _wipe_device(self, user_id: str, device_id: int) -> None:
        db, key = self._conn, (user_id, device_id)
        db.execute("DELETE FROM deliveries WHERE user_id = ? AND device_id = ?", key)
        for table in PREKEY_TABLES:
            db.execute(f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?", key)
        db.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", key)

    # ---------------------------------------------------------------- prekeys

    def _store_prekeys(
        self,
        user_id: str,
        device_id: int,
        signed_prekey: SignedPreKeyPublic | None,
        last_resort_kem: KemPreKeyPublic | None,
        one_time: Sequence[OneTimePreKeyPublic],
        one_time_kem: Sequence[KemPreKeyPublic],
        max_stored: int,
    ) -> PreKeyCounts:
        db, key = self._conn, (user_id, device_id)
        if (
            db.execute("SELECT 1 FROM devices WHERE user_id = ? AND device_id = ?", key).fetchone()
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
                (*key, last_resort_kem.key_id, last_resort_kem.public, last_resort_kem.signature),
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
        counts = self._counts(key)
        if max(counts.one_time, counts.one_time_kem) > max_stored:
            raise PreKeyStockFull(f"at most {max_stored} one-time prekeys of a kind")
        return counts

    def _counts(self, key: tuple[str, int]) -> PreKeyCounts:
        db, where = self._conn, "WHERE user_id = ? AND device_id = ?"
        (one_time,) = db.execute(f"SELECT COUNT(*) FROM one_time_prekeys {where}", key).fetchone()
        (kem,) = db.execute(f"SELECT COUNT(*) FROM one_time_kem_prekeys {where}", key).fetchone()
        return PreKeyCounts(one_time, kem)

    def _take_bundle(self, user_id: str, device_id: int) -> TakenBundle | None:
        db, key = self._conn, (user_id, device_id)
        where = "WHERE user_id = ? AND device_id = ?"
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
        return TakenBundle(
            identity=device[0],
            signed_prekey=SignedPreKeyPublic(*spk),
            one_time=None if opk is None else OneTimePreKeyPublic(*opk),
            kem=KemPreKeyPublic(*kem),
            kem_is_last_resort=last_resort,
            remaining=self._counts(key),
        )

    # ---------------------------------------------------------------- mailboxes

    def _enqueue(self, batch: EnvelopeBatch, max_mailbox_size: int) -> list[int]:
        # A few statements per send, each over all its rows: a group send's
        # cost in the writer thread barely grows with its recipients.
        db = self._conn
        users = list(batch.device_list_counters)
        counters: dict[str, bytes] = {}
        for names in _parts(users):
            counters.update(
                db.execute(
                    "SELECT user_id, counter FROM users "
                    f"WHERE user_id IN ({_marks(len(names), 1)})",
                    names,
                )
            )
        for user_id, counter in batch.device_list_counters.items():
            stored = counters.get(user_id)
            if stored is None or int.from_bytes(stored, "big") != counter:
                raise StorageConflict("a recipient's device list changed meanwhile")
        queued: dict[tuple[str, int], int] = {}
        for part in _parts(batch.deliveries):
            rows = db.execute(
                "SELECT user_id, device_id, queued FROM devices "
                f"WHERE (user_id, device_id) IN (VALUES {_marks(len(part), 2)})",
                [value for d in part for value in (d.user_id, d.device_id)],
            )
            queued.update(((user_id, device_id), count) for user_id, device_id, count in rows)
        full = []
        for d in batch.deliveries:
            count = queued.get((d.user_id, d.device_id))
            if count is None:
                raise StorageConflict("a recipient device is gone")
            if count >= max_mailbox_size:
                full.append((d.user_id, d.device_id))
        if full:
            raise MailboxFull(f"{len(full)} recipient mailboxes are full", devices=full)
        if not batch.deliveries:
            # A send to no device (a group whose only member is the sender's only device):
            # accepted, and nothing stored. A payload no delivery refers to would never be
            # deleted, neither by an acknowledgement nor by the retention sweep.
            return []
        payload_ids = [
            db.execute(
                "INSERT INTO payloads (sender_user, sender_device, kind, server_ts, data) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (batch.sender_user, batch.sender_device, batch.kind, batch.server_ts, data),
            ).fetchone()[0]
            for data in batch.payloads
        ]
        seqs: dict[bytes, int] = {}
        for part in _parts(batch.deliveries):
            seqs.update(
                db.execute(
                    "INSERT INTO deliveries (user_id, device_id, guid, payload_id, expires_at) "
                    f"VALUES {_marks(len(part), 5)} RETURNING guid, seq",
                    [
                        value
                        for d in part
                        for value in (
                            d.user_id,
                            d.device_id,
                            d.guid,
                            payload_ids[d.payload_index],
                            batch.expires_at,
                        )
                    ],
                )
            )
        return [seqs[d.guid] for d in batch.deliveries]  # RETURNING's row order is unspecified

    def _pending(
        self, user_id: str, device_id: int, after_seq: int, limit: int, now: int
    ) -> list[QueuedEnvelope]:
        rows = self._conn.execute(
            "SELECT d.seq, d.guid, p.server_ts, p.sender_user, p.sender_device, p.kind, "
            "p.data FROM deliveries AS d JOIN payloads AS p ON p.id = d.payload_id "
            "WHERE d.user_id = ? AND d.device_id = ? AND d.seq > ? AND d.expires_at > ? "
            "ORDER BY d.seq LIMIT ?",
            (user_id, device_id, after_seq, now, limit),
        ).fetchall()
        return [QueuedEnvelope(row[0], Envelope(*row[1:])) for row in rows]

    def _acknowledge(self, user_id: str, device_id: int, guids: Sequence[bytes]) -> int:
        deleted = 0
        for part in _parts(guids):
            deleted += self._conn.execute(
                "DELETE FROM deliveries WHERE user_id = ? AND device_id = ? "
                f"AND guid IN ({_marks(len(part), 1)})",
                [user_id, device_id, *part],
            ).rowcount
        return deleted

    def _purge_expired(self, now: int) -> int:
        cursor = self._conn.execute("DELETE FROM deliveries WHERE expires_at <= ?", (now,))
        return cursor.rowcount

    def _truncate_wal(self, *, wait_ms: int = 0) -> None:
        """Reset the WAL: old page images (deleted ciphertext) live in it until then.

        A reader in the middle of a transaction (another process, a shell on
        the file) holds the WAL. Waiting for it would hold every storage call
        of the relay, so a sweep tries once (the next sweep tries again) and
        closing waits at most ``wait_ms``.
        """
        self._conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _parts(rows: Sequence[S]) -> Iterator[Sequence[S]]:
    """``rows`` in slices of at most ROWS_PER_STATEMENT."""
    return (rows[i : i + ROWS_PER_STATEMENT] for i in range(0, len(rows), ROWS_PER_STATEMENT))


def _marks(rows: int, columns: int) -> str:
    """SQL parameters for ``rows`` rows of ``columns`` values: ``?`` or ``(?, ?), (?, ?)``."""
    row = "?" if columns == 1 else "(" + ", ".join(["?"] * columns) + ")"
    return ", ".join([row] * rows)


class SqliteStorage:
    """:class:`~.interface.RelayStorage` on a SQLite file, with group commit.

    Every call runs in the :class:`~.writer.GroupCommitWriter`'s thread,
    which owns the database (see :mod:`.writer` for ``max_batch`` and
    ``max_queued``). Calls are made from one trio run.
    """

    def __init__(
        self,
        database: SqliteDatabase,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self._db = database
        self._writer = GroupCommitWriter(database, max_batch=max_batch, max_queued=max_queued)

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> SqliteStorage:
        """Open (creating if needed) the database at ``path`` (``":memory:"``: a temporary one).

        ``max_batch``: calls committed in one transaction at most;
        ``max_queued``: calls waiting for the writer at most (further callers
        wait to queue).
        """
        database = await trio.to_thread.run_sync(SqliteDatabase, path)
        return cls(database, max_batch=max_batch, max_queued=max_queued)

    # ---------------------------------------------------------------- RelayStorage

    async def device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        return await self._writer.call(partial(self._db._device_lists, user_ids), savepoint=False)

    async def store_device_list(
        self, new: StoredDeviceList, *, previous_counter: int | None
    ) -> tuple[int, ...]:
        return await self._writer.call(partial(self._db._store_device_list, new, previous_counter))

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
        return await self._writer.call(
            partial(
                self._db._store_prekeys,
                user_id,
                device_id,
                signed_prekey,
                last_resort_kem,
                one_time,
                one_time_kem,
                max_stored,
            )
        )

    async def prekey_counts(self, user_id: str, device_id: int) -> PreKeyCounts:
        return await self._writer.call(
            partial(self._db._counts, (user_id, device_id)), savepoint=False
        )

    async def take_bundle(self, user_id: str, device_id: int) -> TakenBundle | None:
        return await self._writer.call(partial(self._db._take_bundle, user_id, device_id))

    async def enqueue(
        self,
        batch: EnvelopeBatch,
        *,
        max_mailbox_size: int,
        committed: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        await self._writer.call(
            partial(self._db._enqueue, batch, max_mailbox_size), reported=committed
        )

    async def pending(
        self, user_id: str, device_id: int, *, after_seq: int, limit: int, now: int
    ) -> list[QueuedEnvelope]:
        return await self._writer.call(
            partial(self._db._pending, user_id, device_id, after_seq, limit, now), savepoint=False
        )

    async def acknowledge(self, user_id: str, device_id: int, guids: Sequence[bytes]) -> int:
        return await self._writer.call(
            partial(self._db._acknowledge, user_id, device_id, guids), savepoint=False
        )

    async def purge_expired(self, now: int) -> int:
        return await self._writer.call(
            partial(self._db._purge_expired, now),
            savepoint=False,
            after_commit=self._db._truncate_wal,
        )

    async def aclose(self) -> None:
        """Let every queued call commit, truncate the WAL, close the file. Idempotent."""
        await self._writer.aclose(self._db.close)
