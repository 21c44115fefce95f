"""The relay's storage on one SQLite file: :class:`SqliteStorage`.

* WAL journal with ``synchronous=FULL``: a transaction is on disk (WAL
  fsynced) when COMMIT returns, so "accepted" survives a crash or power
  loss, not only a process exit (NORMAL would lose the last commits on
  power loss).
* Queued mail is sealed at rest (:mod:`.atrest`, :mod:`.rows`): every row
  of the queue keeps in clear only its epoch, an opaque mailbox index and
  row ids. A device's mail of epoch ``e`` is filed under its index of
  epoch ``e``; the count of its queued envelopes (for the mailbox bound)
  and an expiry notice not yet told are in one ``mailboxes`` row, under
  its index of the newest epoch (``meta`` ``epoch``), moved to the next
  epoch's index when that one starts. When an epoch leaves the retention
  window, its rows are deleted, their recipients get expiry notices, and
  its keys cease to exist (key file included).
* ``secure_delete=ON`` and a WAL truncation on every purge and on close:
  acknowledged or expired ciphertext is overwritten, not left in free pages
  (a reader of another process can put a truncation off to the next one).
  The WAL is bounded (:data:`WAL_SIZE_LIMIT`), and after a full disk it is
  folded in and truncated as soon as there is room, so freed space is not
  eaten by it; a full disk is :class:`~...wire.errors.StorageFull`.
  Copies made meanwhile (backups, snapshots) are what the sealing is for.
* Group commit (:mod:`.writer`): every call runs in one writer thread, the
  calls queued together as one transaction with a savepoint each, so a
  batch shares one fsync and a returned value means "committed".
* Take-once of prekeys is a single ``DELETE ... RETURNING`` inside the
  transaction, so even several relay processes sharing the file (each
  batch holds the write lock from BEGIN IMMEDIATE to COMMIT) hand out a
  key only once. Several processes sharing the file share its key chain
  (copies of the key file) and read the newest epoch inside each
  transaction, so a mailbox's epochs grow with ``seq`` whoever wrote it.

:class:`SqliteDatabase` holds the queries, synchronous; :class:`SqliteStorage`
is the :class:`~.interface.RelayStorage` that runs them in the writer. The
tables are in :mod:`.schema`, the migration from schema 1 in :mod:`.migration`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import trio

from hushchat.protocol.errors import DuplicateDeviceKey
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic

from ...wire.errors import (
    DeviceListRejected,
    InviteRefused,
    MailboxFull,
    PreKeyIdInUse,
    PreKeyStockFull,
    StorageFull,
    UnknownDevice,
)
from ...wire.limits import DEFAULT_RETENTION_SECONDS, WARNING_LOG_INTERVAL
from ...wire.records import Envelope, PreKeyCounts
from ..config import wall_clock_ms
from ..ratelimit import LogThrottle, RateLimit
from .atrest import (
    NONCE_SIZE,
    EpochKeys,
    KeyChain,
    KeyState,
    RelayKeysMissing,
    advance_key_file,
    create_key_file,
    default_key_file,
    epoch_seconds_for,
    make_key_file_private,
    read_key_file,
)
from .interface import (
    EnvelopeBatch,
    ExpiryNotice,
    MailboxPosition,
    MailboxRead,
    QueuedEnvelope,
    StorageConflict,
    StoredDeviceList,
    TakenBundle,
)
from .migration import migrate_unsealed
from .rows import (
    DeliveryContent,
    MailboxContent,
    PayloadContent,
    open_delivery,
    open_mailbox,
    open_payload,
    seal_delivery,
    seal_mailbox,
    seal_payload,
)
from .schema import (
    PREKEY_TABLES,
    PROVEN_LISTS_VERSION,
    SCHEMA_VERSION,
    UNSEALED_SCHEMA_VERSION,
    counter_blob,
    create_or_check_schema,
    meta_int,
    meta_value,
    migrate_directory,
    set_meta,
)
from .writer import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUED,
    DatabaseCall,
    GroupCommitWriter,
    is_storage_full,
    run_batch,
)

T = TypeVar("T")
S = TypeVar("S")

logger = logging.getLogger("hushchat.relay")

# How long a transaction waits for another process holding the database's
# write lock (several relays may share the file) before it fails (SQLite
# busy timeout; Python's default).
BUSY_TIMEOUT_MS = 5000

# How long closing waits for readers of other processes before it leaves
# the WAL untruncated (it is truncated at the next sweep or close): a
# shell left open on the file must not hold up a relay's shutdown.
CLOSE_CHECKPOINT_WAIT_MS = 1000

# Bytes of WAL after which SQLite copies it into the database (its automatic
# checkpoint), and to which the WAL file is cut back when it starts over
# (journal_size_limit). Without them the WAL keeps its largest size forever
# (SQLite's default checkpoint point is about 4 MB) and, on a full disk,
# grows into whatever space is freed; with them, freeing more than this much
# lets a relay that hit a full disk fold its WAL into the database and go on.
WAL_SIZE_LIMIT = 1024 * 1024

# The database and its WAL hold everyone's queued ciphertext and routing
# metadata (spec 7.12): readable by the relay's own user only.
PRIVATE_FILE_MODE = 0o600

# Rows one statement reads or inserts at most when a send names many devices:
# SQLite binds at most 32,766 variables per statement (5 per delivery row).
ROWS_PER_STATEMENT = 1000


@dataclass(frozen=True, slots=True)
class SendFacts:
    """What a send is checked against, read under its locks (:meth:`SqliteDatabase._read_send`)."""

    counters: Mapping[str, bytes]  # the device list counter of each recipient user found
    listed: int  # how many of the send's devices are listed
    queued: Mapping[bytes, int]  # envelopes queued, by mailbox index, where a row exists
    seqs: Sequence[int] | None  # seqs taken ahead (one per delivery at least), or None


class SqliteDatabase:
    """The synchronous implementation; :class:`SqliteStorage` runs it in its writer thread.

    The queue's logic (sealing, epochs, mailbox counts, expiry notices) is
    written in the SQL both backends speak: :class:`~.postgres.PostgresDatabase`
    reuses it, replacing only the connection, the row locks several relay
    processes need, and how seqs are taken.

    Not thread-safe by itself: one call at a time. The public methods each
    run as one transaction (a batch of one call); :meth:`run_batch` runs
    many in one. ``maintain`` False opens it as an operator command does
    (``hushchat relay users`` ...): with the relay's key file as it is,
    nothing migrated, purged or forgotten.
    """

    # How a transaction that no other relay process overlaps begins.
    EXCLUSIVE_BEGIN = "BEGIN IMMEDIATE"
    # What the driver raises for a duplicate key.
    INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
    # How a delivery ``d`` finds its payload ``p``. On SQLite a payload may be
    # in an older epoch than a delivery (schema 1's mail, sealed epoch by
    # epoch); PostgreSQL names the epoch too, which picks the partition.
    PAYLOAD_OF_DELIVERY = "p.id = d.payload_id"

    def __init__(
        self,
        path: str,
        *,
        key_file: str | None = None,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], int] = wall_clock_ms,
        reset_keys: bool = False,
        maintain: bool = True,
    ) -> None:
        if path != ":memory:":
            make_private(path)
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
            page_size = self._conn.execute("PRAGMA page_size").fetchone()[0]
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_SIZE_LIMIT // page_size}")
            self._conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self._setup(
                path,
                # An in-memory database keeps its keys in memory only, like its mail.
                key_file=key_file or (None if path == ":memory:" else default_key_file(path)),
                retention_seconds=retention_seconds,
                clock=clock,
                reset_keys=reset_keys,
                maintain=maintain,
                version=create_or_check_schema(self._conn),
            )
        except BaseException:
            self._conn.close()
            raise

    def _setup(
        self,
        name: str,
        *,
        key_file: str | None,
        retention_seconds: int,
        clock: Callable[[], int],
        reset_keys: bool,
        maintain: bool,
        version: int,
    ) -> None:
        """Everything but the connection: the key chain, migrated and purged if ``maintain``.

        ``name`` names the database in errors; ``version`` is its schema version as found.
        """
        self._retention_ms = retention_seconds * 1000
        self._key_file = key_file
        self._full = False  # the last transaction failed on a full disk
        self._full_log = LogThrottle(WARNING_LOG_INTERVAL)
        self._room_log = LogThrottle(WARNING_LOG_INTERVAL)
        if maintain:
            self._chain = self._open_keys(name, version, clock(), reset_keys)
        else:
            self._chain = self._load_keys(name, version)

    def _load_keys(self, path: str, version: int) -> KeyChain:
        """The key file's chain, as an operator command uses it: nothing migrated or purged.

        RelayKeysMissing unless the key file is there and belongs to the
        database, and the database has the current schema (a relay migrates
        an older one, and creates the key file, when it starts).
        """
        state = None if self._key_file is None else read_key_file(self._key_file)
        stored = None if version != SCHEMA_VERSION else meta_value(self._conn, "chain_id")
        if state is None or stored != state.chain_id:
            raise RelayKeysMissing(
                f"the key file {self._key_file} is not the key file of {path}, or the "
                "database awaits its migration: give the relay's --key-file, or start the "
                "relay on it once"
            )
        return KeyChain(state)

    @property
    def key_chain(self) -> KeyChain:
        """The relay's key state in memory."""
        return self._chain

    @property
    def key_file(self) -> str | None:
        return self._key_file

    def _open_keys(self, path: str, version: int, now: int, reset: bool) -> KeyChain:
        """Load or create the key file, check it against the database, migrate schema 1.

        RelayKeysMissing if the database holds mail sealed under another key
        chain than the key file's (or there is no key file), unless ``reset``:
        then that mail is discarded and every device is told.
        """
        db = self._conn
        stored = None if version == UNSEALED_SCHEMA_VERSION else meta_value(db, "chain_id")
        has_mail = stored is not None and self._chain_in_use()
        if self._key_file is not None and (mode := make_key_file_private(self._key_file)):
            logger.warning(
                "the key file %s could be read by others (mode %04o): made owner-only (0600)",
                self._key_file,
                mode,
            )
        state = None if self._key_file is None else read_key_file(self._key_file)
        if state is not None and stored not in (None, state.chain_id) and has_mail and not reset:
            raise RelayKeysMissing(
                f"the key file {self._key_file} holds another key chain than the queued mail "
                f"of {path}: give this database's key file (--key-file), or start with "
                "--reset-keys to discard its queued mail"
            )
        if state is None:
            if has_mail and not reset:
                raise RelayKeysMissing(
                    f"the key file {self._key_file} is missing, and {path} holds queued mail "
                    "sealed under it: restore it, or start with --reset-keys to discard that "
                    "mail (its recipients are told)"
                )
            epoch_seconds = epoch_seconds_for(self._retention_ms // 1000)
            state = KeyState.new(
                epoch_seconds, (now - self._retention_ms) // (epoch_seconds * 1000)
            )
            if self._key_file is not None:
                state = create_key_file(self._key_file, state)
        chain = KeyChain(state)
        self._chain = chain
        db.execute(self.EXCLUSIVE_BEGIN)
        try:
            self._migrate_locked(chain, now)
            stored = meta_value(db, "chain_id")
            if stored is None:  # a new or just migrated database: its first key chain
                set_meta(db, "chain_id", chain.chain_id)
                set_meta(db, "epoch_seconds", chain.state.epoch_seconds)
                set_meta(db, "epoch", max(meta_int(db, "epoch") or 0, chain.epoch_of(now)))
            elif stored != chain.chain_id:
                self._discard_queue(now)
            # What expired while the relay was stopped: its recipients are told, and
            # then, before anything is served, its keys cease to exist.
            self._purge_expired(now)
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                with suppress(Exception):
                    db.execute("ROLLBACK")
            if not (is_storage_full(exc) and meta_value(db, "chain_id") == chain.chain_id):
                raise
            # A full disk, on a database already under this key chain: serve what
            # is stored. The first sweep with room purges what expired meanwhile.
            logger.warning("the relay's disk is full: expired mail is purged once there is room")
        try:
            self._forget_keys(now)
        except OSError as exc:  # the key file cannot be rewritten: at the next sweep
            if not is_storage_full(exc):
                raise
            logger.warning("the relay's disk is full: old keys are forgotten once there is room")
        with suppress(sqlite3.Error):  # a full disk: at the next sweep
            self._truncate_wal()  # deleted rows, and a migration's old tables (secure_delete)
        return chain

    def _migrate_locked(self, chain: KeyChain, now: int) -> None:
        """Bring the schema to the current version, inside the exclusive transaction.

        Read again under the write lock: another relay may have got here first.
        """
        db = self._conn
        if db.execute("PRAGMA user_version").fetchone()[0] == UNSEALED_SCHEMA_VERSION:
            migrate_unsealed(db, chain, now)
        migrate_directory(db)

    def _chain_in_use(self) -> bool:
        """Whether the database's key chain must be kept: mail is sealed under it."""
        return not self._queue_is_empty()

    def _queue_is_empty(self) -> bool:
        db = self._conn
        return (
            db.execute("SELECT 1 FROM deliveries LIMIT 1").fetchone() is None
            and db.execute("SELECT 1 FROM mailboxes LIMIT 1").fetchone() is None
        )

    def _discard_queue(self, now: int) -> None:
        """Adopt the key chain: mail sealed under another one can never be opened, so it goes.

        If there was any, every device gets an expiry notice without a
        count: mail for it from the last retention window is lost.
        """
        db, chain = self._conn, self._chain
        lost = not self._queue_is_empty()
        for table in ("deliveries", "payloads", "mailboxes"):
            db.execute(f"DELETE FROM {table}")
        set_meta(db, "chain_id", chain.chain_id)
        set_meta(db, "epoch_seconds", chain.state.epoch_seconds)
        set_meta(db, "epoch", max(meta_int(db, "epoch") or 0, chain.epoch_of(now)))
        if lost:
            notice = ExpiryNotice(None, now - self._retention_ms, now)
            devices = db.execute("SELECT user_id, device_id FROM devices").fetchall()
            for user_id, device_id in devices:
                self._note(user_id, device_id, 0, notice, now)

    # ---------------------------------------------------------------- keys

    def _forget_keys(self, now: int) -> None:
        """Let the keys of every epoch that left the retention window cease to exist."""
        chain = self._chain
        if chain.advance(chain.epoch_of(now - self._retention_ms)) and self._key_file:
            advance_key_file(self._key_file, chain.state)

    def next_purge(self, now: int) -> int:
        """When (ms) the oldest epoch inside the retention window leaves it."""
        chain = self._chain
        return chain.start_of(chain.epoch_of(now - self._retention_ms) + 1) + self._retention_ms

    def _current_epoch(self, at_least: int) -> int:
        """The newest epoch, moved on to ``at_least`` if it is later (moving the mailbox rows)."""
        db, chain = self._conn, self._chain
        epoch = meta_int(db, "epoch") or 0
        if at_least <= epoch:
            return epoch
        keys = chain.keys(at_least)
        assert keys is not None  # never before the held epoch: it is in the retention window
        moved = []
        for mailbox, row_epoch, queued, sealed in db.execute(
            "SELECT mailbox, epoch, queued, sealed FROM mailboxes"
        ).fetchall():
            old = chain.keys(row_epoch)
            content = None if old is None else open_mailbox(old, mailbox, sealed)
            if content is None:
                continue  # its keys are gone: whose it was is unknown, so it goes
            if content.notice and content.noted_at + self._retention_ms <= chain.start_of(at_least):
                content = MailboxContent(content.user_id, content.device_id)
            if queued <= 0 and content.notice is None:
                continue
            index = keys.index(content.user_id, content.device_id)
            moved.append(
                (
                    index,
                    at_least,
                    queued,
                    int(content.notice is not None),
                    seal_mailbox(keys, index, content),
                )
            )
        db.execute("DELETE FROM mailboxes")
        db.executemany(
            "INSERT INTO mailboxes (mailbox, epoch, queued, noticed, sealed) "
            "VALUES (?, ?, ?, ?, ?)",
            moved,
        )
        set_meta(db, "epoch", at_least)
        return at_least

    # ---------------------------------------------------------------- transactions

    def run_batch(self, calls: Sequence[DatabaseCall]) -> None:
        """Run ``calls`` as one transaction, each in a savepoint (:func:`.writer.run_batch`).

        After a full disk, each batch first tries to fold the WAL into the
        database and truncate it, which gives back its space as soon as the
        database has room to take it.
        """
        if self._full:
            with suppress(sqlite3.Error):
                self._truncate_wal()
        changes = self._conn.total_changes
        run_batch(self._conn, calls)
        if any(isinstance(call.error, StorageFull) for call in calls):
            self._full = True
            self._log_full("disk", "space is freed")
        elif self._full and self._conn.total_changes > changes:  # a write committed
            self._full = False
            if self._room_log.event(time.monotonic()) is not None:
                logger.warning("the relay's disk has room again: storing resumed")

    def _log_full(self, what: str, until: str) -> None:
        """A batch failed on a full ``what``: at most one line a minute, the rest counted."""
        also = self._full_log.line_end(time.monotonic(), "more failed")
        if also is not None:
            logger.warning(
                "the relay's %s is full: requests that store anything are refused "
                "(STORAGE_FULL) until %s%s",
                what,
                until,
                also,
            )

    def _single(
        self,
        run: Callable[[], T],
        *,
        savepoint: bool = True,
        after_commit: Callable[[], None] | None = None,
        exclusive: bool = False,
    ) -> T:
        call = DatabaseCall(
            run, savepoint=savepoint, after_commit=after_commit, exclusive=exclusive
        )
        self.run_batch([call])
        return cast(T, call.outcome())

    # ---------------------------------------------------------------- one transaction per call

    def device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        return self._single(partial(self._device_lists, user_ids), savepoint=False)

    def store_device_list(
        self,
        new: StoredDeviceList,
        *,
        previous_counter: int | None,
        invite_hash: bytes | None = None,
        now: int = 0,
    ) -> tuple[int, ...]:
        return self._single(
            partial(self._store_device_list, new, previous_counter, invite_hash, now)
        )

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

    def take_bundle(
        self, user_id: str, device_id: int, *, budget: RateLimit | None = None, now: int = 0
    ) -> TakenBundle | None:
        return self._single(partial(self._take_bundle, user_id, device_id, budget, now))

    def forget_full_budgets(self, budget: RateLimit, now: int) -> int:
        # Alone, as a purge: it deletes budget rows without their devices' locks,
        # which a batch taking bundles holds before their budget rows (PostgreSQL).
        return self._single(partial(self._forget_full_budgets, budget, now), exclusive=True)

    def enqueue(
        self, batch: EnvelopeBatch, *, max_mailbox_size: int
    ) -> list[MailboxPosition | None]:
        """Store a send; the deliveries' mailbox positions (epoch, seq; None: mailbox full)."""
        return self._single(partial(self._enqueue, batch, max_mailbox_size))

    def pending(
        self,
        user_id: str,
        device_id: int,
        *,
        after_seq: int,
        limit: int,
        now: int,
        after_epoch: int = 0,
    ) -> MailboxRead:
        return self._single(
            partial(self._pending, user_id, device_id, after_seq, limit, now, after_epoch)
        )

    def acknowledge(self, user_id: str, device_id: int, seqs: Sequence[int]) -> int:
        return self._single(partial(self._acknowledge, user_id, device_id, seqs))

    def purge_expired(self, now: int) -> int:
        """Delete the epochs that left the window (then truncate the WAL); forget their keys."""
        try:
            return self._single(
                partial(self._purge_expired, now), after_commit=self._truncate_wal, exclusive=True
            )
        finally:
            self._single(partial(self._forget_keys, now), savepoint=False)

    def expiry_notice(self, user_id: str, device_id: int) -> ExpiryNotice | None:
        return self._single(partial(self._expiry_notice, user_id, device_id), savepoint=False)

    def clear_expiry_notice(self, user_id: str, device_id: int, notice: ExpiryNotice) -> None:
        self._single(partial(self._clear_expiry_notice, user_id, device_id, notice))

    def close(self) -> None:
        """Truncate the WAL (if the disk lets it), then close: never fails on a full disk."""
        try:
            self._truncate_wal(wait_ms=CLOSE_CHECKPOINT_WAIT_MS)
        except sqlite3.Error as exc:
            # Nothing is lost: the WAL is valid, and folded in at the next start.
            logger.warning("closing the database without truncating its WAL: %s", exc)
        self._conn.close()

    # ---------------------------------------------------------------- operator commands
    # For hushchat relay's operator subcommands, which open the database
    # themselves (the relay may be running: SQLite's locks keep them apart).

    def users(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every registered user with its device ids, by user id."""
        return self._single(self._users, savepoint=False)

    def mailbox_sizes(self, user_id: str) -> list[tuple[int, int, int]] | None:
        """(device_id, envelopes queued, bytes of ciphertext queued) per device of the user.

        None if the user is not registered.
        """
        return self._single(partial(self._mailbox_sizes, user_id), savepoint=False)

    def delete_user(self, user_id: str) -> tuple[int, int] | None:
        """Delete a user: its device list, devices, mailboxes and prekeys.

        Returns (devices, envelopes) deleted, or None if the user is not
        registered. The user id is free again: its next device list registers
        it anew (spec 7.12: a user who lost every device).
        """
        return self._single(partial(self._delete_user, user_id))

    def delete_device_mail(self, user_id: str, device_id: int) -> int | None:
        """Delete a device's mailbox and prekeys; the envelopes deleted, None if no such device.

        The device stays in its user's signed device list, which only the user
        can change; it gets none of the deleted mail.
        """
        return self._single(partial(self._delete_device_mail, user_id, device_id))

    def _users(self) -> list[tuple[str, tuple[int, ...]]]:
        devices: dict[str, list[int]] = {}
        for user_id, device_id in self._conn.execute(
            "SELECT user_id, device_id FROM devices ORDER BY user_id, device_id"
        ):
            devices.setdefault(user_id, []).append(device_id)
        users = self._conn.execute("SELECT user_id FROM users ORDER BY user_id").fetchall()
        return [(user_id, tuple(devices.get(user_id, ()))) for (user_id,) in users]

    def _mailbox_sizes(self, user_id: str) -> list[tuple[int, int, int]] | None:
        registered = self._conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,))
        if registered.fetchone() is None:
            return None
        devices = self._conn.execute(
            "SELECT device_id FROM devices WHERE user_id = ? ORDER BY device_id", (user_id,)
        ).fetchall()
        return [(device_id, *self._mailbox_size(user_id, device_id)) for (device_id,) in devices]

    def _mailbox_size(self, user_id: str, device_id: int) -> tuple[int, int]:
        """Envelopes queued for the device, and the bytes of their sealed payloads."""
        envelopes = size = 0
        for epoch in range(self._chain.held_epoch, self._current_epoch(0) + 1):
            keys = self._chain.keys(epoch)
            assert keys is not None
            count, total = self._conn.execute(
                "SELECT COUNT(*), SUM(LENGTH(p.sealed)) FROM deliveries AS d "
                f"JOIN payloads AS p ON {self.PAYLOAD_OF_DELIVERY} "
                "WHERE d.mailbox = ? AND d.epoch = ?",
                (keys.index(user_id, device_id), epoch),
            ).fetchone()
            envelopes, size = envelopes + count, size + (total or 0)
        return envelopes, size

    def _delete_user(self, user_id: str) -> tuple[int, int] | None:
        sizes = self._mailbox_sizes(user_id)
        if sizes is None:
            return None
        for device_id, _, _ in sizes:
            self._wipe_device(user_id, device_id)
        self._conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
        return len(sizes), sum(envelopes for _, envelopes, _ in sizes)

    def _delete_device_mail(self, user_id: str, device_id: int) -> int | None:
        listed = self._conn.execute(
            "SELECT 1 FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
        ).fetchone()
        if listed is None:
            return None
        envelopes, _ = self._mailbox_size(user_id, device_id)
        self._delete_mail_and_prekeys(user_id, device_id)
        return envelopes

    # ---------------------------------------------------------------- users and devices
    # The methods below run inside a transaction (run_batch); they never commit.

    def _device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        db = self._conn
        found: dict[str, StoredDeviceList] = {}
        for user_id in dict.fromkeys(user_ids):
            row = db.execute(
                "SELECT user_identity, counter, signed, protocol_version FROM users "
                "WHERE user_id = ?",
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
                row[3],
            )
        return found

    def _store_device_list(
        self,
        new: StoredDeviceList,
        previous_counter: int | None,
        invite_hash: bytes | None,
        now: int,
    ) -> tuple[int, ...]:
        db = self._conn
        row = db.execute("SELECT counter FROM users WHERE user_id = ?", (new.user_id,)).fetchone()
        stored = None if row is None else int.from_bytes(row[0], "big")
        if stored != previous_counter:
            raise StorageConflict("the device list changed meanwhile")
        if invite_hash is not None:
            # Single use: spent in the transaction that registers, so a refused
            # or conflicting registration gives it back (the savepoint).
            spent = db.execute(
                "DELETE FROM invites WHERE token_hash = ? AND expires_at > ? RETURNING 1",
                (invite_hash, now),
            ).fetchone()
            if spent is None:
                raise InviteRefused("no such invitation, or it was used or has expired")
        identities = [identity for _, identity in new.devices]
        taken = db.execute(
            "SELECT 1 FROM devices AS d JOIN users AS u ON u.user_id = d.user_id "
            f"WHERE d.identity IN ({_marks(len(identities), 1)}) AND d.user_id != ? "
            "AND u.protocol_version >= ? LIMIT 1",
            [*identities, new.user_id, PROVEN_LISTS_VERSION],
        ).fetchone()
        if taken is not None:
            # Which user holds it is not said: the publisher learns nothing new.
            raise DeviceListRejected(
                "a device key is listed under another user", cause=DuplicateDeviceKey.code
            )
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
        values = (
            new.user_identity,
            counter_blob(new.counter),
            new.signed,
            new.protocol_version,
            new.user_id,
        )
        if row is None:  # a second registration of the id racing this one fails on the key
            db.execute(
                "INSERT INTO users (user_identity, counter, signed, protocol_version, user_id) "
                "VALUES (?, ?, ?, ?, ?)",
                values,
            )
        else:
            db.execute(
                "UPDATE users SET user_identity = ?, counter = ?, signed = ?, "
                "protocol_version = ? WHERE user_id = ?",
                values,
            )
        return removed

    def _wipe_device(self, user_id: str, device_id: int) -> None:
        self._delete_mail_and_prekeys(user_id, device_id)
        self._conn.execute(
            "DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
        )

    def _delete_mail_and_prekeys(self, user_id: str, device_id: int) -> None:
        db, key = self._conn, (user_id, device_id)
        newest = self._current_epoch(0)
        for epoch in range(self._chain.held_epoch, newest + 1):
            keys = self._chain.keys(epoch)
            assert keys is not None
            db.execute(
                "DELETE FROM deliveries WHERE mailbox = ? AND epoch = ?",
                (keys.index(user_id, device_id), epoch),
            )
            if epoch == newest:
                db.execute("DELETE FROM mailboxes WHERE mailbox = ?", (keys.index(*key),))
        for table in PREKEY_TABLES:
            db.execute(f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?", key)

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
        except self.INTEGRITY_ERRORS:
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

    def _take_bundle(
        self, user_id: str, device_id: int, budget: RateLimit | None, now: int
    ) -> TakenBundle | None:
        db, key = self._conn, (user_id, device_id)
        where = "WHERE user_id = ? AND device_id = ?"
        device = db.execute(f"SELECT identity FROM devices {where}", key).fetchone()
        spk = db.execute(
            f"SELECT key_id, public, signature FROM signed_prekeys {where}", key
        ).fetchone()
        if device is None or spk is None:
            return None
        bucket = None if budget is None else self._one_time_bucket(key, budget, now)
        one_time = bucket is None or bucket[0] >= 1
        kem: Any = None  # a row (key id, public, signature), or None
        if one_time:
            kem = self._take_one("one_time_kem_prekeys", "key_id, public, signature", key)
        last_resort = kem is None
        if last_resort:
            kem = db.execute(
                f"SELECT key_id, public, signature FROM last_resort_kem_prekeys {where}", key
            ).fetchone()
            if kem is None:
                return None
        opk: Any = None
        if one_time:
            opk = self._take_one("one_time_prekeys", "key_id, public", key)
        if bucket is not None and (opk is not None or not last_resort):
            # A token is spent only when a one-time key was taken: a fetch
            # from an empty stock, or beyond the budget, leaves the row as it was.
            tokens, updated_ms = bucket
            db.execute(
                f"UPDATE one_time_budgets SET tokens = ?, updated_ms = ? {where}",
                (tokens - 1, updated_ms, *key),
            )
        return TakenBundle(
            identity=device[0],
            signed_prekey=SignedPreKeyPublic(*spk),
            one_time=None if opk is None else OneTimePreKeyPublic(*opk),
            kem=KemPreKeyPublic(*kem),
            kem_is_last_resort=last_resort,
            remaining=self._counts(key),
        )

    def _one_time_bucket(
        self, key: tuple[str, int], budget: RateLimit, now: int
    ) -> tuple[float, int]:
        """The device's one-time budget at ``now`` (ms), its row locked: (tokens, as of).

        A token bucket like :class:`~..ratelimit.TokenBucket`, kept in the
        database so that all the relay processes on it spend one budget (spec
        07 section 7.7). One statement creates the row full when missing, or
        else locks it (an update that changes nothing: on PostgreSQL a row
        lock, on SQLite the write transaction's), and returns it, so
        concurrent takes of the device's keys on other relays wait for this
        transaction's outcome, and a row the sweep deletes meanwhile is made
        again. A clock that went back (or another relay's clock ahead)
        regains nothing until it passes the row's time.
        """
        tokens, updated_ms = self._conn.execute(
            "INSERT INTO one_time_budgets VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, device_id) DO UPDATE SET tokens = one_time_budgets.tokens "
            "RETURNING tokens, updated_ms",
            (*key, budget.capacity, now),
        ).fetchone()
        updated_ms = int(updated_ms)
        regained = max(0, now - updated_ms) / 1000 * budget.per_second
        return min(budget.capacity, float(tokens) + regained), max(now, updated_ms)

    def _forget_full_budgets(self, budget: RateLimit, now: int) -> int:
        """Delete the one-time budgets that have regained ``budget``'s capacity by ``now``
        (ms): a missing row is a full budget. How many."""
        return int(
            self._conn.execute(
                "DELETE FROM one_time_budgets WHERE tokens + (? - updated_ms) * ? >= ?",
                (now, budget.per_second / 1000, budget.capacity),
            ).rowcount
        )

    def _take_one(self, table: str, columns: str, key: tuple[str, int]) -> Any:
        """Take (delete and return ``columns`` of) the device's lowest key in ``table``, if any.

        Take-once: the row is deleted and returned by one statement, under the
        transaction's write lock.
        """
        where = "WHERE user_id = ? AND device_id = ?"
        return self._conn.execute(
            f"DELETE FROM {table} {where} AND key_id = (SELECT MIN(key_id) FROM {table} {where}) "
            f"RETURNING {columns}",
            key + key,
        ).fetchone()

    # ---------------------------------------------------------------- mailboxes

    def _enqueue(self, batch: EnvelopeBatch, max_mailbox_size: int) -> list[MailboxPosition | None]:
        # Never before the newest epoch: a mailbox's epochs grow with seq.
        epoch = self._current_epoch(self._chain.epoch_of(batch.server_ts))
        keys = self._chain.keys(epoch)
        assert keys is not None
        boxes = [keys.index(d.user_id, d.device_id) for d in batch.deliveries]
        return self._file_send(batch, max_mailbox_size, keys, boxes, self._read_send(batch, boxes))

    def _read_send(self, batch: EnvelopeBatch, boxes: Sequence[bytes]) -> SendFacts:
        """What the send is checked against (``boxes``: its deliveries' mailbox indexes).

        A few statements per send, each over all its rows: a group send's
        cost in the writer thread barely grows with its recipients.
        """
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
        listed = 0
        for named in _parts(batch.deliveries):
            listed += db.execute(
                "SELECT COUNT(*) FROM devices "
                f"WHERE (user_id, device_id) IN (VALUES {_marks(len(named), 2)})",
                [value for d in named for value in (d.user_id, d.device_id)],
            ).fetchone()[0]
        queued: dict[bytes, int] = {}
        for some in _parts(boxes):
            queued.update(
                db.execute(
                    "SELECT mailbox, queued FROM mailboxes "
                    f"WHERE mailbox IN ({_marks(len(some), 1)})",
                    some,
                )
            )
        return SendFacts(counters, listed, queued, None)

    def _file_send(
        self,
        batch: EnvelopeBatch,
        max_mailbox_size: int,
        keys: EpochKeys,
        boxes: Sequence[bytes],
        facts: SendFacts,
    ) -> list[MailboxPosition | None]:
        """Check the send against ``facts`` and store what has room (see :meth:`_enqueue`)."""
        for user_id, counter in batch.device_list_counters.items():
            stored = facts.counters.get(user_id)
            if stored is None or int.from_bytes(stored, "big") != counter:
                raise StorageConflict("a recipient's device list changed meanwhile")
        if facts.listed != len(batch.deliveries):
            raise StorageConflict("a recipient device is gone")
        queued = facts.queued
        room = [queued.get(box, 0) < max_mailbox_size for box in boxes]
        full = [
            (d.user_id, d.device_id)
            for d, has_room in zip(batch.deliveries, room, strict=True)
            if not has_room
        ]
        if full and (batch.all_or_nothing or len(full) == len(batch.deliveries)):
            raise MailboxFull(f"{len(full)} recipient mailboxes are full", devices=full)
        if not batch.deliveries:
            # A send to no device (a group whose only member is the sender's only device):
            # accepted, and nothing stored. A payload no delivery refers to would never be
            # deleted, neither by an acknowledgement nor by the retention sweep.
            return []
        # Only the deliveries to mailboxes with room are stored, and the payloads they name.
        with_room = [
            (d, box)
            for d, box, has_room in zip(batch.deliveries, boxes, room, strict=True)
            if has_room
        ]
        seqs = (
            self._new_seqs(len(with_room))
            if facts.seqs is None
            else list(facts.seqs[: len(with_room)])
        )
        # A payload's id is the seq of its first delivery: never reused either.
        payload_ids: dict[int, int] = {}
        for (d, _), seq in zip(with_room, seqs, strict=True):
            payload_ids.setdefault(d.payload_index, seq)
        nonces = _nonces(len(payload_ids) + len(with_room))
        epoch = keys.epoch
        payloads = [
            (
                payload_id,
                epoch,
                seal_payload(
                    keys,
                    payload_id,
                    PayloadContent(
                        batch.sender_user,
                        batch.sender_device,
                        batch.payloads[index][0],
                        batch.server_ts,
                        batch.payloads[index][1],
                    ),
                    next(nonces),
                ),
            )
            for index, payload_id in payload_ids.items()
        ]
        deliveries = []
        for (d, box), seq in zip(with_room, seqs, strict=True):
            payload_id = payload_ids[d.payload_index]
            content = DeliveryContent(
                d.user_id, d.device_id, d.guid, batch.server_ts, batch.expires_at
            )
            sealed = seal_delivery(keys, seq, box, payload_id, content, next(nonces))
            deliveries.append((seq, epoch, box, payload_id, sealed))
        self._write_send(
            payloads,
            deliveries,
            [box for _, box in with_room if box in queued],  # each device once per send
            [
                (box, epoch, seal_mailbox(keys, box, MailboxContent(d.user_id, d.device_id)))
                for d, box in with_room
                if box not in queued
            ],
        )
        positions = iter(MailboxPosition(epoch, seq) for seq in seqs)
        return [next(positions) if has_room else None for has_room in room]

    def _write_send(
        self,
        payloads: Sequence[tuple[int, int, bytes]],
        deliveries: Sequence[tuple[int, int, bytes, int, bytes]],
        counted: Sequence[bytes],
        new_mailboxes: Sequence[tuple[bytes, int, bytes]],
    ) -> None:
        """Store a send's rows: ``payloads`` (id, epoch, sealed), ``deliveries`` (seq,
        epoch, mailbox, payload id, sealed), one more queued in the ``counted``
        mailboxes, and the ``new_mailboxes`` rows (mailbox, epoch, sealed) with one."""
        db = self._conn
        db.executemany("INSERT INTO payloads (id, epoch, sealed) VALUES (?, ?, ?)", payloads)
        for part in _parts(deliveries):
            db.execute(
                "INSERT INTO deliveries (seq, epoch, mailbox, payload_id, sealed) "
                f"VALUES {_marks(len(part), 5)}",
                [value for row in part for value in row],
            )
        for some in _parts(counted):
            db.execute(
                "UPDATE mailboxes SET queued = queued + 1 "
                f"WHERE mailbox IN ({_marks(len(some), 1)})",
                some,
            )
        db.executemany(
            "INSERT INTO mailboxes (mailbox, epoch, queued, noticed, sealed) "
            "VALUES (?, ?, 1, 0, ?)",
            new_mailboxes,
        )

    def _new_seqs(self, count: int) -> list[int]:
        """``count`` new delivery seqs, ascending, above every seq ever used.

        The transaction holds the write lock: the next ``count`` after the
        largest ``deliveries`` ever used (AUTOINCREMENT) are free.
        """
        row = self._conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'"
        ).fetchone()
        first = 1 if row is None else int(row[0]) + 1
        return list(range(first, first + count))

    def _pending(
        self,
        user_id: str,
        device_id: int,
        after_seq: int,
        limit: int,
        now: int,
        after_epoch: int = 0,
    ) -> MailboxRead:
        db, chain = self._conn, self._chain
        newest = self._current_epoch(0)
        found = MailboxRead(newest_epoch=newest)
        unreadable: list[tuple[int, int]] = []  # (seq, epoch)
        payloads: dict[int, PayloadContent | None] = {}
        # A mailbox's epochs grow with seq: read them in order, from the cursor's
        # (or, for a cursor of an older epoch, the oldest that holds any mail).
        first = max(after_epoch, chain.held_epoch)
        if first < newest:
            (oldest,) = db.execute("SELECT MIN(epoch) FROM deliveries").fetchone()
            if oldest is None:
                return found
            first = max(first, oldest)
        for epoch in range(first, newest + 1):
            keys = chain.keys(epoch)
            assert keys is not None
            mailbox = keys.index(user_id, device_id)
            cursor = after_seq
            while len(found) < limit:
                wanted = limit - len(found)
                rows = self._mailbox_rows(epoch, newest, mailbox, cursor, wanted)
                for seq, payload_id, sealed, payload_epoch, payload_sealed in rows:
                    cursor = seq
                    content = open_delivery(keys, seq, mailbox, payload_id, sealed)
                    if payload_id not in payloads:
                        payload_keys = chain.keys(payload_epoch)
                        payloads[payload_id] = (
                            None
                            if payload_keys is None
                            else open_payload(payload_keys, payload_id, payload_sealed)
                        )
                    payload = payloads[payload_id]
                    if content is None or payload is None:
                        unreadable.append((seq, epoch))
                    elif (content.user_id, content.device_id) != (user_id, device_id):
                        continue  # another device's index collided with this one's
                    elif content.expires_at > now:
                        envelope = Envelope(
                            content.guid,
                            payload.server_ts,
                            payload.sender_user,
                            payload.sender_device,
                            payload.kind,
                            payload.data,
                        )
                        found.append(QueuedEnvelope(seq, envelope, epoch))
                if len(rows) < wanted:
                    break
            if len(found) >= limit:
                break
        if unreadable:
            self._drop_unreadable(user_id, device_id, unreadable, now)
        return found

    def _mailbox_rows(
        self, epoch: int, newest: int, mailbox: bytes, after_seq: int, limit: int
    ) -> Sequence[tuple[int, int, bytes, int, bytes]]:
        """The first ``limit`` deliveries of ``epoch`` in ``mailbox`` after ``after_seq``,
        with their payloads: (seq, payload id, sealed, payload epoch, payload sealed).
        ``newest``: the newest epoch (PostgreSQL reads its partitions directly)."""
        return cast(
            list[tuple[int, int, bytes, int, bytes]],
            self._conn.execute(
                "SELECT d.seq, d.payload_id, d.sealed, p.epoch, p.sealed "
                f"FROM deliveries AS d JOIN payloads AS p ON {self.PAYLOAD_OF_DELIVERY} "
                "WHERE d.mailbox = ? AND d.epoch = ? AND d.seq > ? ORDER BY d.seq LIMIT ?",
                (mailbox, epoch, after_seq, limit),
            ).fetchall(),
        )

    def _drop_unreadable(
        self, user_id: str, device_id: int, rows: Sequence[tuple[int, int]], now: int
    ) -> None:
        """Envelopes of the device whose rows do not open (altered): gone, and told as lost."""
        seqs = [seq for seq, _ in rows]
        for part in _parts(seqs):
            where, values = self._where_seqs(part)
            self._conn.execute(f"DELETE FROM deliveries WHERE {where}", values)
        chain = self._chain
        first = chain.start_of(min(epoch for _, epoch in rows))
        last = chain.start_of(max(epoch for _, epoch in rows) + 1) - 1
        self._note(user_id, device_id, -len(rows), ExpiryNotice(len(rows), first, last), now)

    def _acknowledge(self, user_id: str, device_id: int, seqs: Sequence[int]) -> int:
        db, chain = self._conn, self._chain
        mine: list[int] = []
        indexes: dict[int, bytes | None] = {}
        for part in _parts(seqs):
            where, values = self._where_seqs(part)
            for seq, epoch, mailbox in db.execute(
                f"SELECT seq, epoch, mailbox FROM deliveries WHERE {where}", values
            ):
                if epoch not in indexes:
                    keys = chain.keys(epoch)
                    indexes[epoch] = None if keys is None else keys.index(user_id, device_id)
                if indexes[epoch] == mailbox:
                    mine.append(seq)
        for part in _parts(mine):
            where, values = self._where_seqs(part)
            db.execute(f"DELETE FROM deliveries WHERE {where}", values)
        if mine:
            self._count_down(user_id, device_id, len(mine))
        return len(mine)

    def _where_seqs(self, seqs: Sequence[int]) -> tuple[str, list[int]]:
        """The condition and values that find the deliveries at ``seqs`` (and, where
        :meth:`_epochs_of` bounds their epochs, only in those epochs)."""
        condition = f"seq IN ({_marks(len(seqs), 1)})"
        span = self._epochs_of(seqs)
        if span is None:
            return condition, list(seqs)
        if span[0] == span[1]:  # the usual case: said so, the seqs' index is seen to be best
            return f"epoch = ? AND {condition}", [span[0], *seqs]
        return f"epoch BETWEEN ? AND ? AND {condition}", [*span, *seqs]

    def _epochs_of(self, seqs: Sequence[int]) -> tuple[int, int] | None:
        """The lowest and highest epoch the deliveries at ``seqs`` can be in; None: unknown
        (on SQLite one table holds every epoch, and ``seq`` is its key)."""
        return None

    def _count_down(self, user_id: str, device_id: int, count: int) -> None:
        """``count`` fewer envelopes queued for the device (the common case of :meth:`_note`)."""
        keys = self._chain.keys(self._current_epoch(0))
        assert keys is not None
        mailbox = keys.index(user_id, device_id)
        self._conn.execute(
            "UPDATE mailboxes SET queued = MAX(queued - ?, 0) WHERE mailbox = ?", (count, mailbox)
        )
        self._conn.execute(
            "DELETE FROM mailboxes WHERE mailbox = ? AND queued = 0 AND noticed = 0", (mailbox,)
        )

    def _note(
        self, user_id: str, device_id: int, change: int, notice: ExpiryNotice | None, now: int
    ) -> None:
        """Change the device's queued count by ``change`` and add ``notice`` to what it is told."""
        db = self._conn
        epoch = self._current_epoch(0)
        keys = self._chain.keys(epoch)
        assert keys is not None
        mailbox = keys.index(user_id, device_id)
        row = db.execute(
            "SELECT queued, sealed FROM mailboxes WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        queued, told = 0, None
        if row is not None:
            content = open_mailbox(keys, mailbox, row[1])
            queued = row[0]
            told = None if content is None else content.notice
        queued = max(queued + change, 0)
        if notice is not None:
            told = notice if told is None else told.merged(notice)
        if queued == 0 and told is None:
            db.execute("DELETE FROM mailboxes WHERE mailbox = ?", (mailbox,))
            return
        content = MailboxContent(user_id, device_id, told, now)
        db.execute(
            "INSERT OR REPLACE INTO mailboxes (mailbox, epoch, queued, noticed, sealed) "
            "VALUES (?, ?, ?, ?, ?)",
            (mailbox, epoch, queued, int(told is not None), seal_mailbox(keys, mailbox, content)),
        )

    def _expiry_notice(self, user_id: str, device_id: int) -> ExpiryNotice | None:
        epoch = self._current_epoch(0)
        keys = self._chain.keys(epoch)
        assert keys is not None
        mailbox = keys.index(user_id, device_id)
        row = self._conn.execute(
            "SELECT sealed FROM mailboxes WHERE mailbox = ? AND noticed = 1", (mailbox,)
        ).fetchone()
        content = None if row is None else open_mailbox(keys, mailbox, row[0])
        return None if content is None else content.notice

    def _clear_expiry_notice(self, user_id: str, device_id: int, notice: ExpiryNotice) -> None:
        if self._expiry_notice(user_id, device_id) != notice:
            return  # it grew meanwhile (or moved to a new epoch): told again, whole, next time
        epoch = self._current_epoch(0)
        keys = self._chain.keys(epoch)
        assert keys is not None
        mailbox = keys.index(user_id, device_id)
        self._conn.execute(
            "UPDATE mailboxes SET noticed = 0, sealed = ? WHERE mailbox = ?",
            (seal_mailbox(keys, mailbox, MailboxContent(user_id, device_id)), mailbox),
        )
        self._conn.execute(
            "DELETE FROM mailboxes WHERE mailbox = ? AND queued = 0 AND noticed = 0", (mailbox,)
        )

    def _purge_expired(self, now: int) -> int:
        """Delete every epoch that left the window; tell each recipient what expired unread.

        Expired invitations go too.
        """
        db, chain = self._conn, self._chain
        db.execute("DELETE FROM invites WHERE expires_at <= ?", (now,))
        cutoff = chain.epoch_of(now - self._retention_ms)
        self._current_epoch(chain.epoch_of(now))  # mailbox rows under keys that stay
        expired: dict[tuple[str, int], ExpiryNotice] = {}
        rows = db.execute(
            "SELECT seq, epoch, mailbox, payload_id, sealed FROM deliveries WHERE epoch < ?",
            (cutoff,),
        ).fetchall()
        for seq, epoch, mailbox, payload_id, sealed in rows:
            keys = chain.keys(epoch)
            content = (
                None if keys is None else open_delivery(keys, seq, mailbox, payload_id, sealed)
            )
            if content is None:
                continue  # its keys are gone already: whose it was is unknown
            device = (content.user_id, content.device_id)
            notice = ExpiryNotice(1, content.server_ts, content.server_ts)
            expired[device] = notice if device not in expired else expired[device].merged(notice)
        self._delete_epochs_before(cutoff)
        for (user_id, device_id), notice in expired.items():
            assert notice.count is not None
            self._note(user_id, device_id, -notice.count, notice, now)
        return len(rows)  # no one else writes meanwhile: the sweep holds the write lock

    def _delete_epochs_before(self, cutoff: int) -> None:
        """Delete the queue's rows of every epoch before ``cutoff`` (read already)."""
        db = self._conn
        db.execute("DELETE FROM deliveries WHERE epoch < ?", (cutoff,))
        # The trigger deleted their payloads; on PostgreSQL, two relays deleting a
        # payload's last deliveries at once may each have seen the other's row.
        db.execute("DELETE FROM payloads WHERE epoch < ?", (cutoff,))

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


def make_private(path: str) -> None:
    """Create the database file owner-only (0600) if missing; make it and its WAL and
    shared-memory files owner-only if they exist, as an older relay left them.

    SQLite creates the WAL and shared-memory files with the database file's
    permissions, so they are private too, whatever the umask.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with suppress(FileNotFoundError):
            os.chmod(name, PRIVATE_FILE_MODE)


def _parts(rows: Sequence[S]) -> Iterator[Sequence[S]]:
    """``rows`` in slices of at most ROWS_PER_STATEMENT."""
    return (rows[i : i + ROWS_PER_STATEMENT] for i in range(0, len(rows), ROWS_PER_STATEMENT))


def _nonces(count: int) -> Iterator[bytes]:
    """``count`` AES-GCM nonces from one CSPRNG read (one system call, not one per row)."""
    pool = os.urandom(NONCE_SIZE * count)
    return (pool[i : i + NONCE_SIZE] for i in range(0, len(pool), NONCE_SIZE))


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
        key_file: str | None = None,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], int] = wall_clock_ms,
        reset_keys: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> SqliteStorage:
        """Open (creating if needed) the database at ``path`` (``":memory:"``: a temporary one).

        ``key_file`` holds the keys of its queued mail (default: ``path`` +
        ``".keys"``; an in-memory database keeps them in memory); it is
        created with the database, and RelayKeysMissing says it is missing
        or another database's while this one holds mail sealed under its
        own. ``reset_keys`` discards such mail instead and tells every
        device. ``retention_seconds`` is how long mail is kept, ``clock``
        the time in milliseconds since the Unix epoch.
        ``max_batch``: calls committed in one transaction at most;
        ``max_queued``: calls waiting for the writer at most (further callers
        wait to queue).
        """
        database = await trio.to_thread.run_sync(
            partial(
                SqliteDatabase,
                path,
                key_file=key_file,
                retention_seconds=retention_seconds,
                clock=clock,
                reset_keys=reset_keys,
            )
        )
        return cls(database, max_batch=max_batch, max_queued=max_queued)

    # ---------------------------------------------------------------- RelayStorage

    async def device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        return await self._writer.call(partial(self._db._device_lists, user_ids), savepoint=False)

    async def store_device_list(
        self,
        new: StoredDeviceList,
        *,
        previous_counter: int | None,
        invite_hash: bytes | None = None,
        now: int = 0,
    ) -> tuple[int, ...]:
        return await self._writer.call(
            partial(self._db._store_device_list, new, previous_counter, invite_hash, now)
        )

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

    async def take_bundle(
        self, user_id: str, device_id: int, *, budget: RateLimit | None = None, now: int = 0
    ) -> TakenBundle | None:
        return await self._writer.call(
            partial(self._db._take_bundle, user_id, device_id, budget, now)
        )

    async def forget_full_budgets(self, budget: RateLimit, now: int) -> int:
        return await self._writer.call(
            partial(self._db._forget_full_budgets, budget, now), exclusive=True
        )

    async def enqueue(
        self,
        batch: EnvelopeBatch,
        *,
        max_mailbox_size: int,
        committed: Callable[[Sequence[MailboxPosition | None]], None] | None = None,
    ) -> tuple[tuple[str, int], ...]:
        positions = await self._writer.call(
            partial(self._db._enqueue, batch, max_mailbox_size), reported=committed
        )
        return tuple(
            (d.user_id, d.device_id)
            for d, position in zip(batch.deliveries, positions, strict=True)
            if position is None
        )

    async def pending(
        self,
        user_id: str,
        device_id: int,
        *,
        after_seq: int,
        limit: int,
        now: int,
        after_epoch: int = 0,
    ) -> MailboxRead:
        return await self._writer.call(
            partial(self._db._pending, user_id, device_id, after_seq, limit, now, after_epoch)
        )

    async def acknowledge(self, user_id: str, device_id: int, seqs: Sequence[int]) -> int:
        return await self._writer.call(partial(self._db._acknowledge, user_id, device_id, seqs))

    async def purge_expired(self, now: int) -> int:
        try:
            return await self._writer.call(
                partial(self._db._purge_expired, now),
                after_commit=self._db._truncate_wal,
                exclusive=True,
            )
        finally:
            # Keys cease to exist on time even if the deletion failed (a full
            # disk): the rows they sealed go at the next purge that succeeds.
            with trio.CancelScope(shield=True):
                await self._writer.call(partial(self._db._forget_keys, now), savepoint=False)

    def next_purge(self, now: int) -> int:
        return self._db.next_purge(now)

    async def expiry_notice(self, user_id: str, device_id: int) -> ExpiryNotice | None:
        return await self._writer.call(
            partial(self._db._expiry_notice, user_id, device_id), savepoint=False
        )

    async def clear_expiry_notice(self, user_id: str, device_id: int, notice: ExpiryNotice) -> None:
        await self._writer.call(partial(self._db._clear_expiry_notice, user_id, device_id, notice))

    async def aclose(self) -> None:
        """Let every queued call commit, truncate the WAL, close the file. Idempotent."""
        await self._writer.aclose(self._db.close)
