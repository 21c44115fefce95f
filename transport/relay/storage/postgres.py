"""The relay's storage on PostgreSQL, shared by several relay processes: :class:`PostgresStorage`.

Selected by ``hushchat relay --db postgresql://...`` (a file path keeps
SQLite). Needs the optional extra ``hushchat[postgres]`` (psycopg 3).

* The same sealed queue as :mod:`.sqlite` (:class:`PostgresDatabase` reuses
  :class:`~.sqlite.SqliteDatabase`'s queries through a connection that speaks
  PostgreSQL's dialect, and has its own for the hot paths: a send in two
  statements, the first of them read ahead for all the sends of a batch
  with its row locks (:class:`_FactsAhead`), an acknowledgement in one),
  run the same way: one writer
  thread per relay process commits each batch of queued calls as ONE
  transaction, each call atomic (:mod:`.writer`; savepoints only when a
  call fails after it wrote, see :class:`PostgresConnection`); psycopg's
  sync API, as its async one needs asyncio. The hot statements are
  prepared once per connection and run through psycopg's libpq wrapper,
  and a batch without savepoints sends what it need not wait for in
  libpq's pipeline mode (:class:`PreparedStatements`).
* Several relay processes on one database (spec 07 section 7.13):

  - a send locks its recipients' ``users`` rows (shared) and ``devices``
    rows (exclusive), in key order, before it checks and stores; a device
    list change locks its ``users`` row exclusively. A send therefore sees
    the lists it commits against (compare-and-set), and the sends to one
    device commit one after another;
  - a batch takes all its calls' locks before its first call, in one global
    order (see "The lock order" at :meth:`PostgresDatabase._prelock_call`):
    its calls keep their queue order, yet two relays' batches never wait
    for each other in a cycle;
  - a delivery's ``seq`` is taken from one sequence *while its device's row
    is locked*: every seq taken later for that device is larger and commits
    later, so a device's mailbox only grows at its end, in commit order,
    whichever relay writes it. (A per-device counter would do the same, but
    its consecutive values would link a device's mailbox indexes across
    epochs in a copy of the database.) A reader's cursor never skips a row
    that commits later;
  - a one-time prekey is taken with ``FOR UPDATE SKIP LOCKED`` (never handed
    out twice), and "none left" is answered only after waiting for the keys
    other relays hold in transactions still open; the target device's
    one-time budget (``one_time_budgets``) is read and spent under its row
    lock in the same transaction, so the relays together hand out one budget;
  - a registration of a user id another relay registers at the same moment
    fails on the key (a conflict), and a device key is locked while it is
    checked against other users' lists;
  - every batch holds a shared advisory lock, which the purge of an epoch
    (and the move of the mailbox counts to a new epoch, and a migration)
    takes exclusively: they never overlap a send.
* Retention: the queue's tables are partitioned by epoch, one partition
  each per epoch (:data:`PARTITION_TABLES`), made by the exclusive
  transaction that starts the epoch; when an epoch leaves the window its
  partitions are dropped whole, and its keys cease to exist (the key
  file). PostgreSQL has no secure delete: a deleted row stays in its
  partition's pages until the partition goes, and in the WAL, replicas and
  backups until overwritten, which is why only sealed rows are ever stored.
  A lookup by seq is bounded to the epochs its seqs can be in
  (``epoch_starts``, :meth:`PostgresDatabase._epochs_of`).
* Push across relays: ``presence`` says which relay process holds each
  connected device. After a send commits, the relay wakes its own recipients
  and NOTIFYs each other relay holding some (one notification per batch and
  relay, naming devices, never ciphertext); a device that connects to
  another relay takes over its ``presence`` row and its older connection is
  told to close. Each relay LISTENs on its own channel in a thread of its
  own (:meth:`PostgresStorage.listen`), and after a lost database
  connection wakes every device it holds (notifications sent meanwhile are
  lost).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import select
import struct
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import trio
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.sql import SQL, Literal

from hushchat.protocol.errors import UnknownStateVersion

from ...wire.errors import StorageFull
from ...wire.limits import (
    DEFAULT_RETENTION_SECONDS,
    NOTIFY_PAYLOAD_LIMIT,
    NOTIFY_POLL_INTERVAL,
    POSTGRES_RECONNECT_INTERVAL,
    WARNING_LOG_INTERVAL,
)
from ..config import wall_clock_ms
from ..ratelimit import LogThrottle
from .atrest import KeyChain
from .interface import (
    ClusterEvents,
    EnvelopeBatch,
    ExpiryNotice,
    MailboxPosition,
    StorageConflict,
    StoredDeviceList,
    UnsuitableDatabase,
)
from .names import without_password
from .schema import SCHEMA_VERSION
from .sqlite import SendFacts, SqliteDatabase, SqliteStorage
from .writer import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUED,
    DatabaseCall,
    is_retryable,
    run_batch,
)

T = TypeVar("T")

# The largest value of a BIGINT: above every seq.
_MAX_BIGINT = 2**63 - 1

logger = logging.getLogger("hushchat.relay")

# The schema version of a PostgreSQL relay database, in ``schema_version``.
POSTGRES_SCHEMA_VERSION = 5
# The first PostgreSQL schema with one_time_budgets (POSTGRES_MIGRATIONS[2] makes it).
POSTGRES_BUDGETS_SCHEMA_VERSION = 3

# The advisory lock every batch holds shared and an epoch's purge, the move
# to a new epoch and a migration hold exclusively: a (class, key) pair of
# PostgreSQL's two-integer lock space ("hush", 1), apart from the
# one-integer space of the device-key locks.
LOCK_CLASS = 0x68757368
EPOCH_LOCK = 1

SHARED_BEGIN = f"BEGIN; SELECT pg_advisory_xact_lock_shared({LOCK_CLASS}, {EPOCH_LOCK})"
# A relay's shared batch begins so, reading the newest epoch (which only an
# exclusive transaction moves) in the same round trip.
BATCH_BEGIN = f"{SHARED_BEGIN}; SELECT value FROM meta WHERE name = 'epoch'"
EXCLUSIVE_BEGIN = f"BEGIN; SELECT pg_advisory_xact_lock({LOCK_CLASS}, {EPOCH_LOCK})"

# Times a batch that lost a deadlock (or a serialization failure) to another
# relay process is run again before its calls fail: the winner's locks are
# released at its commit, so a second loss needs a new cycle each time.
MAX_BATCH_RETRIES = 5

# The tables of schema version 1: the directory and the sealed queue, the
# same tables as SQLite's (schema.py), in PostgreSQL's types.
SCHEMA_1 = """
CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    user_identity BYTEA NOT NULL,
    counter BYTEA NOT NULL,
    signed BYTEA NOT NULL,
    protocol_version INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE devices (
    user_id TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    identity BYTEA NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE INDEX devices_identity ON devices (identity);
CREATE TABLE invites (token_hash BYTEA PRIMARY KEY, expires_at BIGINT NOT NULL);
CREATE TABLE signed_prekeys (
    user_id TEXT NOT NULL, device_id BIGINT NOT NULL, key_id BIGINT NOT NULL,
    public BYTEA NOT NULL, signature BYTEA NOT NULL, PRIMARY KEY (user_id, device_id)
);
CREATE TABLE last_resort_kem_prekeys (
    user_id TEXT NOT NULL, device_id BIGINT NOT NULL, key_id BIGINT NOT NULL,
    public BYTEA NOT NULL, signature BYTEA NOT NULL, PRIMARY KEY (user_id, device_id)
);
CREATE TABLE one_time_prekeys (
    user_id TEXT NOT NULL, device_id BIGINT NOT NULL, key_id BIGINT NOT NULL,
    public BYTEA NOT NULL, PRIMARY KEY (user_id, device_id, key_id)
);
CREATE TABLE one_time_kem_prekeys (
    user_id TEXT NOT NULL, device_id BIGINT NOT NULL, key_id BIGINT NOT NULL,
    public BYTEA NOT NULL, signature BYTEA NOT NULL, PRIMARY KEY (user_id, device_id, key_id)
);
CREATE TABLE meta (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE payloads (id BIGINT PRIMARY KEY, epoch BIGINT NOT NULL, sealed BYTEA NOT NULL);
CREATE SEQUENCE delivery_seq;
CREATE TABLE deliveries (
    seq BIGINT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    mailbox BYTEA NOT NULL,
    payload_id BIGINT NOT NULL,
    sealed BYTEA NOT NULL
);
CREATE INDEX deliveries_mailbox ON deliveries (mailbox, seq);
CREATE INDEX deliveries_epoch ON deliveries (epoch);
CREATE INDEX deliveries_payload ON deliveries (payload_id);
CREATE TABLE mailboxes (
    mailbox BYTEA PRIMARY KEY,
    epoch BIGINT NOT NULL,
    queued BIGINT NOT NULL,
    noticed INTEGER NOT NULL,
    sealed BYTEA NOT NULL
);
CREATE FUNCTION deliveries_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM payloads WHERE id = OLD.payload_id
        AND NOT EXISTS (SELECT 1 FROM deliveries WHERE payload_id = OLD.payload_id);
    RETURN NULL;
END $$;
CREATE TRIGGER deliveries_removed AFTER DELETE ON deliveries
    FOR EACH ROW EXECUTE FUNCTION deliveries_removed();
"""

# Statements taking a database from version N (the key) to N + 1.
POSTGRES_MIGRATIONS: dict[int, str] = {
    # Several relay processes: which one holds each connected device (its
    # connection's random id), so that a send wakes that relay and a newer
    # connection closes an older one on another relay.
    1: """
CREATE TABLE presence (
    user_id TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    relay TEXT NOT NULL,
    connection BYTEA NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE INDEX presence_relay ON presence (relay);
""",
    # The one-time prekey budget of each target device (spec 07 section 7.7),
    # shared by the relay processes: one row per device, taken under its row
    # lock in the transaction that takes the keys (see schema.py).
    2: """
CREATE TABLE one_time_budgets (
    user_id TEXT NOT NULL,
    device_id BIGINT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
""",
    # One index for every read of a mailbox (a device's rows of one epoch, in
    # seq order), the purge and the oldest epoch. With an index on the epoch
    # alone, the planner (before a table's first ANALYZE) read a mailbox by
    # ANDing it with the (mailbox, seq) index, visiting every row of the epoch.
    3: """
CREATE INDEX deliveries_epoch_mailbox ON deliveries (epoch, mailbox, seq);
DROP INDEX deliveries_mailbox;
DROP INDEX deliveries_epoch;
""",
    # The sealed queue partitioned by epoch, one partition of each table per
    # epoch (see PARTITION_TABLES), so that the sweep drops an expired epoch's
    # files instead of leaving its deleted rows in pages no one overwrites.
    # A key must hold the partition key: (seq, epoch) and (id, epoch), seq
    # and id first, as they are looked up by (an index led by the epoch
    # would scan the whole partition for them: it holds one epoch). The
    # (epoch, mailbox, seq) index of schema 4 stays; the payload index names
    # both columns the trigger looks up, so that a partition without
    # statistics yet (a new epoch's) is not read through the other. The trigger,
    # run for every deleted delivery, keeps one generic plan, pruned to the
    # row's epoch as it runs: a custom plan per row would be planned anew
    # against every partition.
    # ``epoch_starts`` bounds the epoch of a seq (PostgresDatabase._epochs_of):
    # the rows kept get their partitions, and the first seq of each epoch.
    4: """
DROP TRIGGER deliveries_removed ON deliveries;
ALTER TABLE deliveries RENAME TO deliveries_schema_4;
ALTER TABLE payloads RENAME TO payloads_schema_4;
ALTER TABLE deliveries_schema_4 RENAME CONSTRAINT deliveries_pkey TO deliveries_schema_4_pkey;
ALTER TABLE payloads_schema_4 RENAME CONSTRAINT payloads_pkey TO payloads_schema_4_pkey;
DROP INDEX deliveries_epoch_mailbox, deliveries_payload;
CREATE TABLE payloads (
    id BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (id, epoch)
) PARTITION BY RANGE (epoch);
CREATE TABLE deliveries (
    seq BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    mailbox BYTEA NOT NULL,
    payload_id BIGINT NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (seq, epoch)
) PARTITION BY RANGE (epoch);
CREATE INDEX deliveries_epoch_mailbox ON deliveries (epoch, mailbox, seq);
CREATE INDEX deliveries_payload ON deliveries (payload_id, epoch);
CREATE TABLE epoch_starts (epoch BIGINT PRIMARY KEY, first_seq BIGINT NOT NULL);
CREATE OR REPLACE FUNCTION deliveries_removed() RETURNS trigger LANGUAGE plpgsql
    SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    DELETE FROM payloads WHERE epoch = OLD.epoch AND id = OLD.payload_id
        AND NOT EXISTS (
            SELECT 1 FROM deliveries WHERE epoch = OLD.epoch AND payload_id = OLD.payload_id
        );
    RETURN NULL;
END $$;
CREATE TRIGGER deliveries_removed AFTER DELETE ON deliveries
    FOR EACH ROW EXECUTE FUNCTION deliveries_removed();
DO $$
DECLARE
    e BIGINT;
BEGIN
    FOR e IN SELECT epoch FROM deliveries_schema_4 UNION SELECT epoch FROM payloads_schema_4 LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF deliveries FOR VALUES FROM (%s) TO (%s)',
            'deliveries_' || e, e, e + 1
        );
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF payloads FOR VALUES FROM (%s) TO (%s)',
            'payloads_' || e, e, e + 1
        );
    END LOOP;
END $$;
INSERT INTO payloads (id, epoch, sealed) SELECT id, epoch, sealed FROM payloads_schema_4;
INSERT INTO deliveries (seq, epoch, mailbox, payload_id, sealed)
    SELECT seq, epoch, mailbox, payload_id, sealed FROM deliveries_schema_4;
INSERT INTO epoch_starts (epoch, first_seq) SELECT epoch, MIN(seq) FROM deliveries GROUP BY epoch;
DROP TABLE deliveries_schema_4, payloads_schema_4;
""",
}


# The hot statements below (a send's two, an acknowledgement's, a mailbox
# read's) run through psycopg's libpq wrapper (psycopg.pq), as statements
# prepared once per connection, their parameters and results in PostgreSQL's
# binary formats (PreparedStatements): psycopg's cursors cost the writer
# thread about twice the CPU time per statement, and its generic list dumper
# looks up a dumper for every element of every array.
@dataclass(frozen=True, slots=True)
class BinaryArray:
    """A one-dimensional array parameter: ``values`` of ``element`` (one of the keys of
    :data:`_ELEMENTS`), for a ``%(name)b`` placeholder."""

    element: str
    values: Sequence[bytes | str | int]


_INT8 = struct.Struct(">q")

# Element type name -> (element OID, array OID, the element's binary encoding).
_ELEMENTS: dict[str, tuple[int, int, Callable[[Any], bytes]]] = {
    "bytea": (17, 1001, bytes),
    "text": (25, 1009, lambda value: value.encode()),
    "bigint": (20, 1016, _INT8.pack),
}
_ARRAY_HEADER = struct.Struct(">iiiii")  # dimensions, has nulls, element OID, length, lower bound
_EMPTY_ARRAY_HEADER = struct.Struct(">iii")
_ELEMENT_LENGTH = struct.Struct(">i")


def _column_arrays(rows: Sequence[Sequence[Any]], **columns: str) -> dict[str, BinaryArray]:
    """An array parameter per column of ``rows``, named as ``columns`` says in column
    order (name=element type)."""
    return {
        name: BinaryArray(element, [row[index] for row in rows])
        for index, (name, element) in enumerate(columns.items())
    }


def _binary_parameter(value: BinaryArray | bytes | str | int) -> tuple[int, bytes]:
    """A parameter's type OID and binary encoding."""
    if isinstance(value, BinaryArray):
        element_oid, array_oid, encode = _ELEMENTS[value.element]
        if not value.values:
            return array_oid, _EMPTY_ARRAY_HEADER.pack(0, 0, element_oid)
        encoded: Sequence[Any] = (
            value.values if encode is bytes else [encode(v) for v in value.values]
        )
        length = _ELEMENT_LENGTH.pack
        return array_oid, _ARRAY_HEADER.pack(1, 0, element_oid, len(encoded), 1) + b"".join(
            length(len(element)) + element for element in encoded
        )
    if isinstance(value, bytes):
        return 17, value
    if isinstance(value, str):
        return 25, value.encode()
    return 20, _INT8.pack(value)


# Result column type OID -> its binary decoding (the types the hot statements
# return; a bytea is its value).
_SIGNED_INTEGER = partial(int.from_bytes, byteorder="big", signed=True)
_DECODERS: dict[int, Callable[[bytes], Any] | None] = {
    17: None,
    25: bytes.decode,
    20: _SIGNED_INTEGER,  # bigint
    23: _SIGNED_INTEGER,  # integer
}
_PLACEHOLDER = re.compile(r"%\((\w+)\)b")

# Statements kept prepared per connection at most. Each hot statement names
# the newest epoch's partitions, so each epoch brings new ones and the
# previous epochs' are no longer run.
MAX_PREPARED = 32


@dataclass(frozen=True, slots=True)
class Later:
    """A call's result known only once its batch committed: :meth:`PostgresDatabase._run`
    puts ``value()`` in its place (read from a statement the call did not wait for)."""

    value: Callable[[], object]


class Sent:
    """A statement sent in a pipeline (:meth:`PreparedStatements.send`): its result, once
    back (read with :meth:`PreparedStatements.rows`)."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: psycopg.pq.abc.PGresult | None = None


# In a pipeline's queue of results to read, where a sync's result is.
_SYNC = None


class PreparedStatements:
    """Run statements through psycopg's libpq wrapper, each prepared on first use.

    ``%(name)b`` placeholders; parameters and results in binary. The waits
    for the server release the interpreter lock (PQexecPrepared; poll()
    on the socket), as psycopg's own waits do. An error is psycopg's
    exception for it.

    With ``pipelining`` set, :meth:`send` does not wait for its statement's
    result: it goes out in libpq's pipeline mode, and the next :meth:`run`
    (a read) sends its own statement behind it and reads both results in
    one round trip. :meth:`settle` reads every result still out and leaves
    pipeline mode; it must come before any statement not sent through this
    object. An error of a statement sent earlier is raised by the next
    :meth:`run` or :meth:`settle` (the server skips what follows it, up to
    the next sync).
    """

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self._raw = raw
        self.pipelining = False
        # sql -> its text with numbered placeholders, and the names in their order
        self._parsed: dict[str, tuple[bytes, tuple[str, ...]]] = {}
        self._names: dict[tuple[str, tuple[int, ...]], bytes] = {}  # (sql, types) -> name
        self._made = 0
        self._out: deque[Sent | None] = deque()  # results to read, in order (_SYNC: a sync's)
        self._errored = False  # a statement of the open pipeline failed (reset when it ends)

    @property
    def in_pipeline(self) -> bool:
        """Whether statements were sent whose results were not all read (see settle)."""
        return not self._raw.closed and bool(self._raw.pgconn.pipeline_status)

    def run(
        self, sql: str, parameters: Mapping[str, BinaryArray | bytes | str | int]
    ) -> list[tuple[Any, ...]]:
        """Run ``sql`` with ``parameters``; its rows, decoded."""
        name, values = self._prepared(sql, parameters)
        if not self.in_pipeline:
            return _rows(self._execute(name, values))
        sent = self._send(name, values)
        self._sync()
        assert sent.result is not None
        return _rows(self._check(sent.result))

    def send(self, sql: str, parameters: Mapping[str, BinaryArray | bytes | str | int]) -> Sent:
        """Send ``sql`` with ``parameters`` without waiting for its result if pipelining;
        otherwise run it. Its rows, once back, in the returned :class:`Sent`."""
        name, values = self._prepared(sql, parameters)
        if not self.pipelining:
            sent = Sent()
            sent.result = self._execute(name, values)
            return sent
        self._enter_pipeline()
        return self._send(name, values)  # goes out with the next read's (libpq buffers it)

    def rows(self, sent: Sent) -> list[tuple[Any, ...]]:
        """``sent``'s rows, reading the results still out if its is among them (staying in
        pipeline mode); raise its error."""
        if sent.result is None:
            self._sync()
        assert sent.result is not None
        return _rows(self._check(sent.result))

    def send_plain(self, sql: str) -> Sent:
        """Send ``sql``, a statement without parameters, in the pipeline (entered if need be)
        without waiting for its result."""
        self._enter_pipeline()
        sent = Sent()
        self._raw.pgconn.send_query_params(sql.encode(), None, result_format=1)
        self._out.append(sent)
        return sent

    def commit(self, before: Sequence[str]) -> None:
        """COMMIT the pipeline's transaction, after ``before`` (statements without
        parameters), in one round trip with every result still out; leave pipeline mode.

        Raises if any statement of the transaction failed: PostgreSQL would answer
        the COMMIT of a failed transaction by rolling it back, without an error.
        """
        if self._errored:
            raise psycopg.errors.InFailedSqlTransaction("the batch's transaction failed")
        for statement in before:
            self.send_plain(statement)
        committed = self.send_plain("COMMIT")
        self.settle()
        assert committed.result is not None
        if committed.result.command_status != b"COMMIT":  # a failed transaction's: ROLLBACK
            raise psycopg.errors.InFailedSqlTransaction("the batch's transaction failed")

    def settle(self) -> None:
        """Read every result still out and leave pipeline mode; raise the first error."""
        if not self.in_pipeline:
            return
        try:
            self._sync()
        finally:
            if not self._raw.closed:
                self._raw.pgconn.exit_pipeline_mode()
            self._errored = False

    def _prepared(
        self, sql: str, parameters: Mapping[str, BinaryArray | bytes | str | int]
    ) -> tuple[bytes, list[bytes]]:
        """The name ``sql`` is prepared under for these parameters' types (prepared now if
        it is not yet), and the parameters encoded."""
        parsed = self._parsed.get(sql)
        if parsed is None:
            order = tuple(dict.fromkeys(_PLACEHOLDER.findall(sql)))
            numbered = _PLACEHOLDER.sub(lambda m: f"${order.index(m.group(1)) + 1}", sql)
            parsed = self._parsed[sql] = (numbered.encode(), order)
        text, order = parsed
        encoded = [_binary_parameter(parameters[key]) for key in order]
        types = tuple(oid for oid, _ in encoded)
        name = self._names.get((sql, types))
        if name is None:
            self.settle()  # a new statement, once per epoch: prepared outside the pipeline
            pgconn = self._raw.pgconn
            if len(self._names) >= MAX_PREPARED:
                oldest = next(iter(self._names))
                self._check(pgconn.exec_(b"DEALLOCATE " + self._names.pop(oldest)))
            self._made += 1
            name = f"hushchat_{self._made}".encode()
            self._check(pgconn.prepare(name, text, types))
            self._names[(sql, types)] = name
        return name, [value for _, value in encoded]

    def _execute(self, name: bytes, values: list[bytes]) -> psycopg.pq.abc.PGresult:
        """Run the prepared statement ``name`` outside a pipeline; its result."""
        return self._check(self._raw.pgconn.exec_prepared(name, values, [1] * len(values), 1))

    def _enter_pipeline(self) -> None:
        if not self.in_pipeline:
            self._raw.pgconn.enter_pipeline_mode()

    def _send(self, name: bytes, values: list[bytes]) -> Sent:
        sent = Sent()
        self._raw.pgconn.send_query_prepared(name, values, [1] * len(values), 1)
        self._out.append(sent)
        return sent

    def _sync(self) -> None:
        """Send everything held with a sync, and read every result out; raise the first
        error among them (a statement the server skipped after it has none of its own).

        If the reading itself fails (the connection was lost, say), which results
        belong to which statements is lost with it: the connection is closed, so that
        nothing more is sent on it (the writer connects anew for the next batch).
        """
        self._out.append(_SYNC)
        try:
            self._raw.pgconn.pipeline_sync()
            self._flush()
            error = self._read_out()
        except BaseException:
            self._out.clear()
            self._raw.close()
            raise
        if error is not None:
            raise error

    def _read_out(self) -> psycopg.Error | None:
        """Read the results out, up to the last sync's; the first error among them."""
        error: psycopg.Error | None = None
        while self._out:
            sent = self._out.popleft()
            result = self._next_result()
            if sent is _SYNC:
                continue  # PGRES_PIPELINE_SYNC: the server takes statements again
            if result is None:
                raise psycopg.OperationalError("the connection ended before a result came")
            sent.result = result
            while self._next_result() is not None:  # each statement's results end with None
                pass
            if error is None and result.status == ExecStatus.FATAL_ERROR:
                self._errored = True
                error = psycopg.errors.error_from_result(result, encoding=self._raw.info.encoding)
        return error

    def _next_result(self) -> Any:
        """The next result, waiting for it without holding the interpreter lock."""
        pgconn = self._raw.pgconn
        while pgconn.is_busy():
            self._wait(select.POLLIN)
            pgconn.consume_input()
        return pgconn.get_result()

    def _flush(self) -> None:
        """Write out all libpq holds (the connection is non-blocking: a sync may leave some
        unsent), reading meanwhile so that the server, writing results, never waits for
        this side."""
        pgconn = self._raw.pgconn
        while pgconn.flush():
            if self._wait(select.POLLIN | select.POLLOUT) & select.POLLIN:
                pgconn.consume_input()

    def _wait(self, events: int) -> int:
        """Wait until the socket is ready for ``events``; those it is ready for. poll(), not
        select(): a relay holding a thousand connections has descriptors beyond select's."""
        poller = select.poll()
        poller.register(self._raw.pgconn.socket, events)
        return sum(ready for _, ready in poller.poll())

    def _check(self, result: psycopg.pq.abc.PGresult) -> psycopg.pq.abc.PGresult:
        if result.status in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
            return result
        raise psycopg.errors.error_from_result(result, encoding=self._raw.info.encoding)


def _rows(result: psycopg.pq.abc.PGresult) -> list[tuple[Any, ...]]:
    """A result's rows, decoded from the binary format (a column at a time)."""
    value, rows = result.get_value, range(result.ntuples)
    columns = []
    for column in range(result.nfields):
        cells = [value(row, column) for row in rows]
        decode = _DECODERS[result.ftype(column)]
        if decode is not None:
            cells = [None if cell is None else decode(cell) for cell in cells]
        columns.append(cells)
    return list(zip(*columns, strict=True))


# What a send is checked against (PostgresDatabase._read_cluster_send), in one
# statement: a row per fact, its kind first. Run while the recipients' rows
# are locked, so its seqs are taken under their devices' locks.
FACT_COUNTER, FACT_LISTED, FACT_QUEUED, FACT_LAST, FACT_PRESENCE, FACT_SEQ = range(6)
SEND_FACTS = f"""
SELECT {FACT_COUNTER}, user_id, NULL::text, NULL::bigint, counter
    FROM users WHERE user_id = ANY(%(users)b::text[])
UNION ALL
SELECT {FACT_LISTED}, user_id, NULL, device_id, NULL FROM devices WHERE (user_id, device_id) IN
    (SELECT * FROM unnest(%(user_ids)b::text[], %(device_ids)b::bigint[]))
UNION ALL
SELECT {FACT_QUEUED}, NULL, NULL, queued, mailbox
    FROM mailboxes WHERE mailbox = ANY(%(boxes)b::bytea[])
UNION ALL
SELECT {FACT_LAST}, NULL, NULL, last.seq, box FROM unnest(%(boxes)b::bytea[]) AS box
    CROSS JOIN LATERAL (SELECT seq FROM {{deliveries}} WHERE mailbox = box AND epoch = %(epoch)b
                        ORDER BY seq DESC LIMIT 1) AS last
UNION ALL
SELECT {FACT_PRESENCE}, user_id, relay, device_id, NULL FROM presence
    WHERE (user_id, device_id) IN
        (SELECT * FROM unnest(%(user_ids)b::text[], %(device_ids)b::bigint[]))
    AND relay <> %(relay)b
UNION ALL
SELECT {FACT_SEQ}, NULL, NULL, nextval('delivery_seq'), NULL FROM generate_series(1, %(count)b)
"""

# Row locks in key order (see "The lock order" at PostgresDatabase._prelock_call):
# ORDER BY sorts the rows before they are locked. A user id sorts by its bytes
# (COLLATE "C"), as Python sorts it: a batch locks its users in runs of one
# mode each, in Python's order, so a statement sorting by the database's
# collation (a language's, "a" before "B") would lock in another order than
# the runs, and two relays' batches could wait for each other in a cycle.
LOCK_USERS_SHARED = """
SELECT user_id FROM users WHERE user_id = ANY(%(user_ids)b::text[])
    ORDER BY user_id COLLATE "C" FOR SHARE
"""
LOCK_USERS_EXCLUSIVE = """
SELECT user_id FROM users WHERE user_id = ANY(%(user_ids)b::text[])
    ORDER BY user_id COLLATE "C" FOR UPDATE
"""
LOCK_DEVICES = """
SELECT user_id, device_id FROM devices WHERE (user_id, device_id) IN
    (SELECT * FROM unnest(%(user_ids)b::text[], %(device_ids)b::bigint[]))
    ORDER BY user_id COLLATE "C", device_id FOR UPDATE
"""

# A send's rows (SqliteDatabase._write_send), in one statement. A mailbox
# whose facts were read ahead and then acknowledged in the batch (_FactsAhead)
# may or may not still have its row (the acknowledgement deletes a row it
# empties): stored as new, it counts one more in the row it still finds
# (``maybe_new``). Any other new mailbox must be new: a row there fails the
# batch, which runs again reading each send's own facts.
STORE_SEND = """
WITH stored_payloads AS (
    INSERT INTO {payloads} (id, epoch, sealed) SELECT * FROM
        unnest(%(payload_ids)b::bigint[], %(payload_epochs)b::bigint[], %(payloads)b::bytea[])
), stored_deliveries AS (
    INSERT INTO {deliveries} (seq, epoch, mailbox, payload_id, sealed) SELECT * FROM
        unnest(%(seqs)b::bigint[], %(epochs)b::bigint[], %(boxes)b::bytea[],
               %(delivery_payloads)b::bigint[], %(sealed)b::bytea[])
), counted AS (
    UPDATE mailboxes SET queued = queued + 1 WHERE mailbox = ANY(%(counted)b::bytea[])
), maybe_new AS (
    INSERT INTO mailboxes (mailbox, epoch, queued, noticed, sealed)
        SELECT mailbox, epoch, 1, 0, sealed FROM
            unnest(%(maybe_boxes)b::bytea[], %(maybe_epochs)b::bigint[],
                   %(maybe_sealed)b::bytea[]) AS maybe (mailbox, epoch, sealed)
        ON CONFLICT (mailbox) DO UPDATE SET queued = mailboxes.queued + 1
)
INSERT INTO mailboxes (mailbox, epoch, queued, noticed, sealed)
    SELECT mailbox, epoch, 1, 0, sealed FROM
        unnest(%(new_boxes)b::bytea[], %(new_epochs)b::bigint[], %(new_sealed)b::bytea[])
        AS new (mailbox, epoch, sealed)
"""

# An acknowledgement of the device's envelopes filed in the newest epoch under
# its index ``mailbox`` (PostgresDatabase._acknowledge), in one statement: they
# go, and so does one queued each from its mailbox row, itself deleted when
# nothing is queued or to be told (SqliteDatabase._count_down). The row is
# deleted or lowered, never both: the UPDATE runs only if the DELETE did not.
ACKNOWLEDGE_NEWEST = """
WITH gone AS (
    DELETE FROM {deliveries}
        WHERE seq = ANY(%(seqs)b::bigint[]) AND epoch = %(epoch)b AND mailbox = %(mailbox)b
        RETURNING seq
), counted AS (
    SELECT COUNT(*) AS n FROM gone
), emptied AS (
    DELETE FROM mailboxes
        WHERE mailbox = %(mailbox)b AND noticed = 0
        AND queued <= (SELECT n FROM counted) AND (SELECT n FROM counted) > 0
        RETURNING 1
), lowered AS (
    UPDATE mailboxes SET queued = GREATEST(queued - (SELECT n FROM counted), 0)
        WHERE mailbox = %(mailbox)b AND (SELECT n FROM counted) > 0
        AND NOT EXISTS (SELECT 1 FROM emptied)
)
SELECT seq FROM gone
"""

# The first deliveries of a mailbox after a seq, with their payloads
# (SqliteDatabase._mailbox_rows), on the newest epoch's partitions.
READ_MAILBOX = """
SELECT d.seq, d.payload_id, d.sealed, p.epoch, p.sealed
    FROM {deliveries} AS d JOIN {payloads} AS p ON p.epoch = d.epoch AND p.id = d.payload_id
    WHERE d.mailbox = %(mailbox)b AND d.epoch = %(epoch)b AND d.seq > %(after)b
    ORDER BY d.seq LIMIT %(limit)b
"""

# The tables of the sealed queue, partitioned by epoch: the partition of
# epoch ``e`` is ``<table>_<e>``, FOR VALUES FROM (e) TO (e + 1). One epoch
# per partition: the moment an epoch leaves the window, its files go whole
# (a coarser partition would keep an expired epoch's deleted rows in its
# pages until its last epoch left too). About 73 partitions per table; the
# statements that name no epoch (an acknowledgement's, by seq) are given
# the epochs their seqs can be in, so they look into one or two.
PARTITION_TABLES = ("deliveries", "payloads")
_PARTITION_NAME = re.compile(r"(deliveries|payloads)_(\d+)")


@lru_cache(maxsize=64)
def in_partitions(statement: str, epoch: int) -> str:
    """``statement`` on the newest epoch ``epoch``'s partitions, named directly.

    A statement on a partitioned table is planned anew at every execution,
    against every partition (about 73); on the partition itself it keeps
    one plan. Only for the newest epoch, whose partitions exist as long as
    it is the newest (an older one's may be dropped by another relay's
    sweep meanwhile: those are read through the parent table).
    """
    return statement.format(deliveries=f"deliveries_{epoch}", payloads=f"payloads_{epoch}")


# The columns and keys of the tables SqliteDatabase writes with INSERT OR
# REPLACE, which PostgreSQL spells INSERT ... ON CONFLICT DO UPDATE.
_UPSERT_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "meta": (("name", "value"), ("name",)),
    "mailboxes": (("mailbox", "epoch", "queued", "noticed", "sealed"), ("mailbox",)),
    "signed_prekeys": (
        ("user_id", "device_id", "key_id", "public", "signature"),
        ("user_id", "device_id"),
    ),
    "last_resort_kem_prekeys": (
        ("user_id", "device_id", "key_id", "public", "signature"),
        ("user_id", "device_id"),
    ),
}
_UPSERT = re.compile(r"INSERT OR REPLACE INTO (\w+)(?: \(([^)]*)\))? VALUES")


@lru_cache(maxsize=256)
def postgres_sql(sql: str) -> str:
    """``sql`` as SqliteDatabase writes it, in PostgreSQL's dialect."""
    upsert = _UPSERT.search(sql)
    if upsert is not None:
        table = upsert.group(1)
        columns, keys = _UPSERT_TABLES[table]
        if upsert.group(2):
            columns = tuple(c.strip() for c in upsert.group(2).split(","))
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in keys)
        sql = (
            f"{sql[: upsert.start()]}INSERT INTO {table} ({', '.join(columns)}) VALUES"
            f"{sql[upsert.end() :]} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
        )
    sql = sql.replace("MAX(queued - ?, 0)", "GREATEST(queued - ?, 0)")
    return sql.replace("?", "%s")


class CallNotUndone(Exception):
    """A call failed after it wrote, in a batch run without savepoints: run it again with them."""


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection to ``dsn`` that speaks UTF8, whatever the database, the
    role or PGCLIENTENCODING would have it speak: a user id is UTF-8 text (spec 11.1),
    which another client encoding cannot always carry (the request would fail)."""
    return psycopg.connect(dsn, autocommit=True, client_encoding="UTF8")


class PostgresConnection:
    """A psycopg connection with the sqlite3 calls SqliteDatabase makes (autocommit: the
    transactions are the explicit BEGIN and COMMIT of :func:`.writer.run_batch`).

    With ``optimistic`` set, the writer's savepoints cost nothing: a
    savepoint is only noted, and rolling back to it is nothing to do if the
    call neither wrote nor met an error since; otherwise it raises
    :class:`CallNotUndone` (and sets ``not_undone``), failing the batch so
    that it is run again with real savepoints. Most calls never fail, or
    fail before they write (a full mailbox, a changed device list), so a
    batch almost always runs without them.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.raw = connect(dsn)
        # A prepared statement keeps one plan: PostgreSQL would otherwise plan
        # each of its first five runs, and again any run whose custom plan it
        # judges cheaper, which cost the hot statements (a UNION of six reads,
        # CTEs of unnest) more server time than running them. Their plans are
        # index lookups whatever the parameters; a plan on a partitioned table
        # still prunes its partitions when it runs.
        self.raw.execute("SET plan_cache_mode = force_generic_plan")
        # psycopg prepares no statement of its own: it answers a ROLLBACK or a
        # DROP (the sweep's) by deallocating every prepared statement of the
        # session, which would take PreparedStatements' with it.
        self.raw.prepare_threshold = None
        self.prepared = PreparedStatements(self.raw)
        self.optimistic = False
        self.not_undone = False
        self._at_commit: list[str] = []  # statements sent with the COMMIT (see at_commit)
        self._writes = 0  # statements run that may have changed something
        self._writes_at_savepoint = 0

    @property
    def in_transaction(self) -> bool:
        self._settle_quietly()
        status = self.raw.info.transaction_status
        return status in (TransactionStatus.INTRANS, TransactionStatus.INERROR)

    @property
    def failed(self) -> bool:
        """Whether the open transaction met an error (only a rollback can follow)."""
        self._settle_quietly()
        return self.raw.info.transaction_status == TransactionStatus.INERROR

    def _settle_quietly(self) -> None:
        """Every pipelined result back: the transaction's status then tells of an error."""
        if self.prepared.in_pipeline:
            with suppress(psycopg.Error):
                self.prepared.settle()

    @property
    def usable(self) -> bool:
        return not (self.raw.closed or self.raw.broken)

    @property
    def writes(self) -> int:
        """How many statements that may have changed something were run so far."""
        return self._writes

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        """Run ``sql`` (SQLite's dialect); an optimistic savepoint statement returns None
        (only noted: see the class docstring)."""
        if not parameters and self.optimistic and sql in _SAVEPOINT_STATEMENTS:
            return self._virtual_savepoint(sql)
        if sql == BATCH_BEGIN and self.prepared.pipelining:
            # Sent without waiting: its results come back with the batch's first read.
            self._note_write(sql)
            for statement in _BATCH_BEGIN_FIRST:
                self.prepared.send_plain(statement)
            return self.prepared.send_plain(_BATCH_BEGIN_EPOCH)
        if sql == "COMMIT" and self.prepared.in_pipeline:
            at_commit, self._at_commit = self._at_commit, []
            try:
                return self.prepared.commit(at_commit)
            except psycopg.Error:
                # Whose error it was is known only when run again with savepoints.
                self.not_undone = self.not_undone or self.optimistic
                raise
        if sql == "COMMIT" and self.failed:
            # PostgreSQL would answer a COMMIT of a failed transaction by rolling it
            # back without an error: the batch's calls must not be told it committed.
            # A pipelined statement that failed may have been any call's.
            self.not_undone = self.not_undone or self.optimistic
            raise psycopg.errors.InFailedSqlTransaction("the batch's transaction failed")
        if sql.startswith("ROLLBACK"):
            self._settle_quietly()  # the error, if any, is why the rollback comes
        else:
            self.prepared.settle()  # psycopg's statements go after every pipelined one
        self._note_write(sql)
        if sql in ("COMMIT", "ROLLBACK") and self._at_commit:
            at_commit, self._at_commit = self._at_commit, []
            if sql == "COMMIT":  # one round trip for them and the COMMIT
                return self.raw.execute(f"{'; '.join(at_commit)}; COMMIT".encode())
        if not parameters:  # several statements at once (BEGIN; SELECT ...) need no parameters
            return self.raw.execute(sql.encode() if "?" not in sql else postgres_sql(sql).encode())
        return self.raw.execute(postgres_sql(sql).encode(), parameters)

    def at_commit(self, statement: str) -> None:
        """Send ``statement`` (complete, without parameters) with the transaction's COMMIT,
        in the same round trip; a ROLLBACK drops it."""
        self._at_commit.append(statement)

    def run(
        self, sql: str, parameters: Mapping[str, BinaryArray | bytes | str | int]
    ) -> list[tuple[Any, ...]]:
        """Run ``sql``, a hot statement written in PostgreSQL's dialect with named
        parameters (``%(name)b``), prepared (:class:`PreparedStatements`); its rows."""
        self._note_write(sql)
        return self.prepared.run(sql, parameters)

    def send(self, sql: str, parameters: Mapping[str, BinaryArray | bytes | str | int]) -> Sent:
        """As :meth:`run`, without waiting for the result in an optimistic batch (pipelined:
        see :class:`PreparedStatements`)."""
        self._note_write(sql)
        return self.prepared.send(sql, parameters)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._note_write(sql)
            self.prepared.settle()
            with self.raw.cursor() as cursor:
                cursor.executemany(postgres_sql(sql).encode(), rows)

    def close(self) -> None:
        self.raw.close()

    def _note_write(self, sql: str) -> None:
        # Reads, row locks and nextval (never rolled back anyway) need no undoing.
        if not sql.lstrip().startswith("SELECT") or "pg_notify" in sql:
            self._writes += 1

    def _virtual_savepoint(self, sql: str) -> None:
        if sql == "SAVEPOINT call":
            self._writes_at_savepoint = self._writes
        elif sql == "ROLLBACK TO call" and (
            self.failed or self._writes > self._writes_at_savepoint
        ):
            self.not_undone = True
            raise CallNotUndone("a call failed after it wrote")


# BATCH_BEGIN's statements one by one (a pipeline takes one at a time); the epoch read last.
*_BATCH_BEGIN_FIRST, _BATCH_BEGIN_EPOCH = BATCH_BEGIN.split("; ")

# What the writer sends around each call (.writer.run_batch).
_SAVEPOINT_STATEMENTS = frozenset({"SAVEPOINT call", "RELEASE call", "ROLLBACK TO call"})


def _check_encoding(conn: PostgresConnection) -> None:
    """A relay's database must be in UTF8: a user id is UTF-8 text (spec 11.1), which
    another encoding cannot always hold (a request naming it would fail), and the relays lock
    users in the order of their UTF-8 bytes, which ``COLLATE "C"`` follows only in
    UTF8 (another order could deadlock two relays)."""
    row = conn.execute("SHOW server_encoding").fetchone()
    encoding = "unknown" if row is None else str(row[0])
    if encoding != "UTF8":
        raise UnsuitableDatabase(
            f"the relay database {without_password(conn.dsn)} is in {encoding}, and a relay "
            "needs UTF8: create it with CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0 "
            "(or createdb -E UTF8 -T template0)"
        )


def create_or_migrate_schema(conn: PostgresConnection) -> int:
    """Give a new database the schema, or migrate an older one; the version found (0: new).

    Runs in a transaction of its own holding the epoch lock exclusively, so
    relays starting at once, and running relays, never see half a schema.
    UnknownStateVersion if the database is newer than this relay;
    UnsuitableDatabase, before anything is written, if it is not in UTF8.
    """
    _check_encoding(conn)
    conn.execute(EXCLUSIVE_BEGIN)
    try:
        exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        found = 0
        if exists is not None and exists[0]:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            found = 0 if row is None else int(row[0])
        if found > POSTGRES_SCHEMA_VERSION:
            raise UnknownStateVersion(f"relay database schema version {found}")
        if found == 0:
            conn.execute(SCHEMA_1)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (1)")
        for step in range(max(found, 1), POSTGRES_SCHEMA_VERSION):
            conn.execute(POSTGRES_MIGRATIONS[step])
        conn.execute("UPDATE schema_version SET version = %s", (POSTGRES_SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.usable and conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if 0 < found < POSTGRES_SCHEMA_VERSION:
        logger.info("relay database migrated from schema %d to %d", found, POSTGRES_SCHEMA_VERSION)
    return found


def migrate_postgres(dsn: str) -> int:
    """Create or migrate the relay schema of the database at ``dsn``; the version found."""
    conn = PostgresConnection(dsn)
    try:
        return create_or_migrate_schema(conn)
    finally:
        conn.close()


def schema_version(dsn: str) -> int:
    """The schema version of the database at ``dsn`` (0: no relay schema), migrating nothing."""
    with connect(dsn) as conn:
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if row is None or not row[0]:
            return 0
        version = conn.execute("SELECT version FROM schema_version").fetchone()
        return 0 if version is None else int(version[0])


@contextmanager
def read_only_snapshot(
    dsn: str,
) -> Iterator[tuple[int, Callable[[str], list[tuple[Any, ...]]]]]:
    """The schema version of the relay database at ``dsn`` and a query function, in one
    read-only transaction that sees one snapshot (for ``hushchat relay report``).

    It holds the epoch lock shared, as a relay's batch does, so no purge or
    migration runs under it. UnknownStateVersion if the database has no
    relay schema or a newer one than this relay's.
    """
    with connect(dsn) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute(f"SELECT pg_advisory_xact_lock_shared({LOCK_CLASS}, {EPOCH_LOCK})")
        try:
            row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
            version = (
                conn.execute("SELECT version FROM schema_version").fetchone()
                if (row is not None and row[0])
                else None
            )
            if version is None or not 1 <= int(version[0]) <= POSTGRES_SCHEMA_VERSION:
                found = "none" if version is None else version[0]
                raise UnknownStateVersion(f"relay database schema version {found}")
            yield int(version[0]), lambda sql: conn.execute(sql.encode()).fetchall()
        finally:
            conn.execute("ROLLBACK")


def insert_invites(dsn: str, rows: Sequence[tuple[bytes, int]]) -> None:
    """Store invitations (token hash, expiry in ms) in the relay database at ``dsn``.

    The database must have the current schema (UnknownStateVersion if not:
    ``hushchat relay migrate`` creates or upgrades it). One transaction,
    holding the epoch lock shared as a relay's batch does, so it never
    meets a migration half done.
    """
    with connect(dsn) as conn:
        conn.execute(SHARED_BEGIN)
        try:
            exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
            row = (
                conn.execute("SELECT version FROM schema_version").fetchone()
                if exists is not None and exists[0]
                else None
            )
            if row is None or int(row[0]) != POSTGRES_SCHEMA_VERSION:
                found = 0 if row is None else int(row[0])
                raise UnknownStateVersion(
                    f"relay database schema version {found}: run 'hushchat relay migrate' first"
                )
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO invites (token_hash, expires_at) VALUES (%s, %s)", rows
                )
            conn.execute("COMMIT")
        except BaseException:
            if not (conn.closed or conn.broken):
                conn.execute("ROLLBACK")
            raise


class PostgresDatabase(SqliteDatabase):
    """The synchronous implementation on PostgreSQL; see the module docstring.

    ``relay_id`` names this relay process on its notification channel.
    """

    EXCLUSIVE_BEGIN = EXCLUSIVE_BEGIN
    INTEGRITY_ERRORS = (psycopg.errors.UniqueViolation,)
    # A payload is in its deliveries' epoch (one send, one epoch): its partition.
    PAYLOAD_OF_DELIVERY = "p.epoch = d.epoch AND p.id = d.payload_id"

    def __init__(
        self,
        dsn: str,
        *,
        key_file: str | None = None,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], int] = wall_clock_ms,
        reset_keys: bool = False,
        maintain: bool = True,
        relay_id: str | None = None,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self.relay_id = relay_id or secrets.token_hex(8)
        self._exclusive = False  # the open transaction holds the epoch lock exclusively
        self._epoch_seen = 0  # the newest epoch read from meta
        self._batch_epoch: int | None = None  # the newest epoch, as the open batch read it
        self._epoch_read: Sent | None = None  # where a pipelined batch reads it (_begun)
        self._wakes: dict[str, set[tuple[str, int]]] = {}  # relay -> devices, this batch
        self.batch_retries = 0  # batches run again after losing a deadlock (or serialization)
        self.careful_batches = 0  # batches run again with savepoints (see PostgresConnection)
        self.sends_read_ahead = 0  # sends checked against facts read ahead (see _FactsAhead)
        # The rows the open batch's first call locked (see _prelock): its calls skip them.
        self._held_users: dict[str, bool] = {}  # user id -> locked exclusively
        self._held_devices: set[tuple[str, int]] = set()
        self._ahead: _FactsAhead | None = None  # the open batch's sends' facts, read ahead
        self._partitioned: int | None = None  # the epoch whose partitions this transaction saw
        # (first seq, epoch) of each epoch_starts row, by seq; read when _epoch_seen was this.
        self._epoch_starts: list[tuple[int, int]] = []
        self._starts_read_at: int | None = None
        # Set by the listener's thread (reconnected): run_batch starts on a new connection.
        self._connection_suspect = False
        self._conn: Any = PostgresConnection(dsn)
        try:
            create_or_migrate_schema(self._conn)
            super()._setup(
                without_password(dsn),
                key_file=key_file,
                retention_seconds=retention_seconds,
                clock=clock,
                reset_keys=reset_keys,
                maintain=maintain,
                # Migrated already (create_or_migrate_schema): the queue's format is current.
                version=SCHEMA_VERSION,
            )
        except BaseException:
            self._conn.close()
            raise
        self._epoch_seen = self._read_epoch()

    @property
    def channel(self) -> str:
        """This relay's notification channel."""
        return channel_of(self.relay_id)

    def suspect_connection(self) -> None:
        """The server ended another connection of this relay (the listener's): say it
        restarted, which ended ours too; the next batch starts on a new connection. Else
        that batch, the mailbox reads the listener's return starts, would be the one to
        find ours dead, and fail each read's connection. Any thread may call it."""
        self._connection_suspect = True

    # ---------------------------------------------------------------- SqliteDatabase's hooks

    def _migrate_locked(self, chain: KeyChain, now: int) -> None:
        """The schema was migrated when the database was opened (create_or_migrate_schema)."""

    def _chain_in_use(self) -> bool:
        """Always: other relay processes may be sealing under the database's chain now,
        so a relay with another key file (or none) must not adopt a new one."""
        return True

    def _truncate_wal(self, *, wait_ms: int = 0) -> None:
        """Nothing to do: PostgreSQL has no secure delete (sealing and forgotten keys stand in)."""

    def _new_seqs(self, count: int) -> list[int]:
        """``count`` seqs from the shared sequence, taken while the recipients' rows are locked."""
        rows = self._conn.execute(
            "SELECT nextval('delivery_seq') FROM generate_series(1, ?)", (count,)
        ).fetchall()
        return sorted(int(row[0]) for row in rows)

    def _read_epoch(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
        return 0 if row is None else int.from_bytes(row[0], "big")

    def _current_epoch(self, at_least: int) -> int:
        """The newest epoch; moved on only in an exclusive transaction (see run_batch).

        A send whose time falls in an epoch not started yet in the database
        (the clock crossed the boundary since its batch began) is filed
        under the newest one, as the move waits for that batch. Read once per
        shared batch: only an exclusive transaction moves it.
        """
        if self._epoch_read is not None:  # BATCH_BEGIN's, pipelined
            read, self._epoch_read = self._epoch_read, None
            rows = self._conn.prepared.rows(read)
            self._note_batch_epoch(rows[0][0] if rows else None)
        if self._exclusive or self._batch_epoch is None:
            epoch = self._read_epoch()
            if self._exclusive:
                if at_least > epoch:
                    epoch = super()._current_epoch(at_least)
                self._prepare_partitions(epoch)
            self._batch_epoch = epoch
            self._epoch_seen = max(self._epoch_seen, epoch)
        return self._batch_epoch

    def _open_keys(self, path: str, version: int, now: int, reset: bool) -> KeyChain:
        """As on SQLite; the transaction it runs in holds the epoch lock exclusively."""
        self._exclusive = True
        self._partitioned = None
        try:
            return super()._open_keys(path, version, now, reset)
        finally:
            self._exclusive = False
            self._batch_epoch = None

    # ---------------------------------------------------------------- partitions

    def _prepare_partitions(self, epoch: int) -> None:
        """Give ``epoch``, the newest, its partitions and its first seq, if it has none yet.

        Runs in every exclusive transaction that reads the newest epoch, so
        in the one that moves it: a send, filed only under the newest epoch,
        always finds its partition (a relay whose clock runs ahead moves the
        epoch, and creates it, for every relay). The sequence's next value
        is the epoch's first seq: no send runs meanwhile (the epoch lock), so
        every seq below it is of an earlier epoch, every one from it of this
        epoch or a later one.
        """
        if self._partitioned == epoch:
            return
        conn = self._conn
        for table in PARTITION_TABLES:
            name = f"{table}_{epoch}"
            found = conn.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
            if not found[0]:
                conn.execute(
                    f"CREATE TABLE {name} PARTITION OF {table} "
                    f"FOR VALUES FROM ({epoch}) TO ({epoch + 1})"
                )
        conn.execute(
            "INSERT INTO epoch_starts (epoch, first_seq) SELECT ?, "
            "CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM delivery_seq "
            "ON CONFLICT (epoch) DO NOTHING",
            (epoch,),
        )
        self._partitioned = epoch

    def _mailbox_rows(
        self, epoch: int, newest: int, mailbox: bytes, after_seq: int, limit: int
    ) -> Sequence[tuple[int, int, bytes, int, bytes]]:
        """As on SQLite (on the parent tables) for an older epoch; the newest epoch's as a
        prepared statement on its partitions."""
        if epoch != newest:
            return super()._mailbox_rows(epoch, newest, mailbox, after_seq, limit)
        return self._conn.run(  # type: ignore[no-any-return]
            in_partitions(READ_MAILBOX, epoch),
            {"mailbox": mailbox, "epoch": epoch, "after": after_seq, "limit": limit},
        )

    def _delete_epochs_before(self, cutoff: int) -> None:
        """Drop the partitions of the epochs before ``cutoff``: their files go whole, where
        a DELETE would leave the rows in pages (PostgreSQL has no secure delete)."""
        conn = self._conn
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
            "WHERE i.inhparent IN ('deliveries'::regclass, 'payloads'::regclass) "
            "ORDER BY c.relname"
        ).fetchall():
            match = _PARTITION_NAME.fullmatch(name)
            if match is not None and int(match.group(2)) < cutoff:
                conn.execute(f"DROP TABLE {name}")
        # Rows before the cutoff in a partition not named by its epoch (none that
        # this relay made) are deleted as on SQLite.
        super()._delete_epochs_before(cutoff)
        conn.execute("DELETE FROM epoch_starts WHERE epoch < ?", (cutoff,))

    def _epochs_of(self, seqs: Sequence[int]) -> tuple[int, int] | None:
        """The epochs the deliveries at ``seqs`` can be in, from ``epoch_starts``.

        A row (e, f) says: every seq from f is of epoch e or later, every
        seq below f of an earlier one; and no row is of an epoch after the
        newest. Rows never change, so a copy read earlier is right, only
        less precise (a later epoch's row missing leaves the newest epoch as
        the bound above); it is read again once this relay has seen a newer
        epoch. Read only in shared transactions: an exclusive one's rows may
        yet roll back.
        """
        if self._exclusive:
            return None
        newest = self._current_epoch(0)  # first: it may show an epoch newer than seen so far
        if self._starts_read_at != self._epoch_seen:
            rows = self._conn.execute("SELECT first_seq, epoch FROM epoch_starts").fetchall()
            self._epoch_starts = sorted((int(f), int(e)) for f, e in rows)
            self._starts_read_at = self._epoch_seen
        starts = self._epoch_starts
        first = bisect_right(starts, (min(seqs), _MAX_BIGINT)) - 1
        last = bisect_right(starts, (max(seqs), _MAX_BIGINT))
        low = starts[first][1] if first >= 0 else 0
        high = starts[last][1] - 1 if last < len(starts) else newest
        return low, min(high, newest)

    # ---------------------------------------------------------------- transactions

    def run_batch(self, calls: Sequence[DatabaseCall]) -> None:
        """Run ``calls`` in queue order: exclusive ones alone, each run of others as one batch.

        Reconnects first if the connection was lost; starts a new epoch
        first if the clock entered one.
        """
        if self._connection_suspect or not self._conn.usable:
            self._connection_suspect = False
            try:
                self._conn.close()
                self._conn = PostgresConnection(self._dsn)
            except psycopg.Error as exc:
                for call in calls:
                    call.result, call.error = None, exc
                return
        if self._chain.epoch_of(self._clock()) > self._epoch_seen:
            self._advance_epoch()
        shared: list[DatabaseCall] = []
        for call in calls:
            if not call.exclusive:
                shared.append(call)
                continue
            self._run(shared, exclusive=False)
            shared = []
            self._run([call], exclusive=True)
        self._run(shared, exclusive=False)

    def _run(self, calls: Sequence[DatabaseCall], *, exclusive: bool) -> None:
        if not calls:
            return
        self._exclusive = exclusive
        conn = self._conn
        for call in calls:
            # Every call may fail in its own savepoint (a failed statement fails
            # PostgreSQL's whole transaction; SQLite's only the statement).
            call.savepoint = True
        optimistic = True
        attempt = 0
        epoch_seen = self._epoch_seen
        try:
            while True:
                self._wakes, self._batch_epoch, self._partitioned = {}, None, None
                self._epoch_read = None
                self._held_users, self._held_devices = {}, set()
                self._ahead = None
                conn.optimistic, conn.not_undone = optimistic, False
                # An optimistic shared batch pipelines its writes (PreparedStatements).
                conn.prepared.pipelining = optimistic and not exclusive
                # An exclusive batch runs alone; a shared one first takes every
                # lock its calls will take, in the global order (see _prelock).
                run_batch(
                    conn,
                    calls if exclusive else [self._prelock_call(calls), *calls],
                    begin=EXCLUSIVE_BEGIN if exclusive else BATCH_BEGIN,
                    after_begin=None if exclusive else self._begun,
                    before_commit=self._notify,
                )
                for call in calls:  # results known only once the batch committed
                    if isinstance(call.result, Later) and call.error is None:
                        call.result = call.result.value()
                if conn.not_undone:
                    # Nothing of the batch is stored: again, a real savepoint per call.
                    self.careful_batches += 1
                    optimistic = False
                    for call in calls:
                        call.result, call.error = None, None
                    continue
                if attempt == MAX_BATCH_RETRIES or not is_retryable(calls[0].error):
                    break
                attempt += 1
                # A deadlock's victim: its locks are gone, so the other side goes
                # on, and this batch is run again as it was (nothing of it is stored).
                self.batch_retries += 1
                logger.info(
                    "batch run again after SQLSTATE %s", getattr(calls[0].error, "sqlstate", None)
                )
                for call in calls:
                    call.result, call.error = None, None
        finally:
            self._exclusive, self._batch_epoch, self._epoch_read = False, None, None
            self._held_users, self._held_devices = {}, set()
            self._ahead = None
            conn.optimistic = conn.prepared.pipelining = False
        if exclusive and calls[0].error is not None:
            # Nothing of it committed: a new epoch it moved to is not the database's,
            # and the next batch must try the move again.
            self._epoch_seen = epoch_seen
        if any(isinstance(call.error, StorageFull) for call in calls):
            self._log_full("database", "it has room")

    def _advance_epoch(self) -> None:
        now = self._clock()
        call = DatabaseCall(partial(self._current_epoch, self._chain.epoch_of(now)))
        self._run([call], exclusive=True)
        if call.error is not None:
            logger.warning("new epoch not started: %s", call.error)

    def _begun(self, begun: psycopg.Cursor[Any] | Sent) -> None:
        """Note the epoch BATCH_BEGIN read (its last result); in a pipeline, once its result
        is back (:meth:`_current_epoch`)."""
        if isinstance(begun, Sent):
            self._epoch_read = begun
            return
        while begun.nextset():
            pass
        row = begun.fetchone()
        self._note_batch_epoch(None if row is None else bytes(row[0]))

    def _note_batch_epoch(self, value: bytes | None) -> None:
        self._batch_epoch = 0 if value is None else int.from_bytes(value, "big")
        self._epoch_seen = max(self._epoch_seen, self._batch_epoch)

    def _notify(self) -> None:
        """Wake the other relays holding this batch's recipients (sent with the COMMIT)."""
        for relay, devices in self._wakes.items():
            for payload in _wake_payloads(sorted(devices)):
                self._conn.at_commit(
                    SQL("SELECT pg_notify({}, {})")
                    .format(Literal(channel_of(relay)), Literal(payload))
                    .as_string(self._conn.raw)
                )

    def close(self) -> None:
        self._conn.close()

    # ---------------------------------------------------------------- locks
    #
    # The lock order (spec 07 section 7.13). Each call of a shared batch locks
    # its own rows in key order, but a batch runs its calls in queue order (a
    # sender's requests commit in order), so two relays' batches would take
    # the same rows in opposite orders ([send to bob, send to alice] against
    # [send to alice, send to bob]) and deadlock. So before its first call a
    # shared batch takes the union of the locks its calls will take, in ONE
    # order every batch obeys: ``users`` rows (shared, or exclusive where any
    # call changes the list) by user id; then ``devices`` rows (exclusive) by
    # (user id, device id), a user id by its UTF-8 bytes whatever the
    # database's collation; then ``invites`` rows by token hash; then the
    # device-key advisory locks by key. The calls then take them again, which
    # is free. The rows a call touches under those locks (mailboxes,
    # deliveries, one-time prekeys, presence, payloads) are only ever locked
    # by a transaction holding the device's (or its user's) lock, so no
    # other batch holds one of them while waiting for this one. A one-time
    # prekey's row, in particular, is taken under its device's lock, so
    # ``FOR UPDATE`` waits there only for a transaction outside this order
    # (none of the relay's). Exclusive batches (an epoch's purge or move)
    # run alone: the partitions they create and drop take ACCESS EXCLUSIVE
    # locks on the queue's tables, which no relay's transaction holds while
    # it waits for the epoch lock (its first statement). The one lock not
    # known in advance: a mailbox read that finds rows that do not open (an
    # altered database) locks the device to note their loss; a deadlock
    # then is still resolved by running the batch again (batch_retries
    # counts those).

    def _prelock_call(self, calls: Sequence[DatabaseCall]) -> DatabaseCall:
        """A call taking every lock ``calls`` will take, in the global order above."""
        locks = _BatchLocks()
        sends: list[EnvelopeBatch] = []
        for call in calls:
            run = call.run
            if isinstance(run, partial) and getattr(run.func, "__self__", None) is self:
                plan = _LOCK_PLANS.get(run.func.__name__)
                if plan is not None:
                    plan(locks, *run.args, **run.keywords)
                if run.func.__name__ == "_enqueue":
                    sends.append(run.args[0])
        return DatabaseCall(partial(self._prelock, locks, sends))

    def _prelock(self, locks: _BatchLocks, sends: Sequence[EnvelopeBatch]) -> None:
        """Take ``locks``; in a pipelined batch, read ahead the facts of ``sends``, the
        batch's sends (see _FactsAhead), with the devices' locks."""
        conn = self._conn
        users = sorted(locks.users.items())
        held_users: dict[str, bool] = {}
        user_locks: list[tuple[Sent, bool]] = []
        start = 0
        while start < len(users):  # each run of one lock mode, in user id order
            exclusive = users[start][1]
            end = start
            while end < len(users) and users[end][1] == exclusive:
                end += 1
            # Sent without waiting: back with the devices' (one round trip, with BEGIN's).
            run = [user for user, _ in users[start:end]]
            user_locks.append((self._send_user_locks(run, exclusive), exclusive))
            start = end
        devices = set(locks.devices)
        if locks.presence:
            # Only this relay's writer adds rows naming it, so none appears meanwhile.
            devices.update(
                (user_id, int(device_id))
                for user_id, device_id in conn.execute(
                    "SELECT user_id, device_id FROM presence WHERE relay = ?", (self.relay_id,)
                )
            )
        for names in _chunks(sorted(locks.user_devices)):
            # Their users' rows are locked exclusively: no device is added meanwhile.
            devices.update(
                (user_id, int(device_id))
                for user_id, device_id in conn.execute(
                    "SELECT user_id, device_id FROM devices WHERE user_id IN "
                    f"({', '.join(['?'] * len(names))})",
                    names,
                )
            )
        devices_locked = self._send_device_locks(sorted(devices))
        # The facts go right behind the locks, so they are read under them, in the same round
        # trip; in the partitions of the newest epoch seen, which the batch's is nearly always.
        epoch = self._epoch_seen
        keys = self._chain.keys(epoch)
        facts: Sent | None = None
        if sends and conn.prepared.pipelining and keys is not None:
            boxes = [
                [keys.index(d.user_id, d.device_id) for d in send.deliveries] for send in sends
            ]
            facts = conn.send(
                in_partitions(SEND_FACTS, epoch), self._facts_parameters(sends, boxes, epoch)
            )
        for hashes in _chunks(sorted(locks.invites)):
            conn.execute(
                f"SELECT 1 FROM invites WHERE token_hash IN ({', '.join(['?'] * len(hashes))}) "
                "ORDER BY token_hash FOR UPDATE",
                hashes,
            )
        for identity in sorted(locks.identities):
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (identity.hex(),))
        held_devices = self._devices_locked(devices_locked)
        for sent, exclusive in user_locks:
            for (user_id,) in conn.prepared.rows(sent):
                held_users[user_id] = exclusive
        if facts is not None:
            rows = conn.prepared.rows(facts)
            if self._current_epoch(0) == epoch:
                self._ahead = _FactsAhead(rows, sends, conn.writes)
        # Known only now that all are taken: a failed prelock's savepoint released them.
        self._held_users, self._held_devices = held_users, held_devices

    def _lock_devices(self, devices: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Lock the devices' rows, in key order; those that exist."""
        return self._devices_locked(self._send_device_locks(devices))

    def _devices_locked(self, sent: Sent | None) -> set[tuple[str, int]]:
        """The devices whose rows ``sent`` (from :meth:`_send_device_locks`) locked: those
        that exist."""
        if sent is None:
            return set()
        return {(user_id, device_id) for user_id, device_id in self._conn.prepared.rows(sent)}

    def _send_device_locks(self, devices: Sequence[tuple[str, int]]) -> Sent | None:
        """:meth:`_lock_devices`, its rows not waited for in a pipeline; None if none."""
        wanted = sorted(set(devices))
        if not wanted:
            return None
        sent: Sent = self._conn.send(
            LOCK_DEVICES, _column_arrays(wanted, user_ids="text", device_ids="bigint")
        )
        return sent

    def _hold_devices(self, devices: Sequence[tuple[str, int]]) -> None:
        """Lock the devices' rows unless the batch's first call locked them (see _prelock)."""
        missing = [device for device in devices if device not in self._held_devices]
        if missing:
            self._lock_devices(missing)

    def _lock_users(self, user_ids: Sequence[str], exclusive: bool) -> None:
        """Lock the users' rows (``exclusive``: FOR UPDATE, else FOR SHARE), in key order."""
        self._conn.prepared.rows(self._send_user_locks(user_ids, exclusive))

    def _send_user_locks(self, user_ids: Sequence[str], exclusive: bool) -> Sent:
        """:meth:`_lock_users`, its rows not waited for in a pipeline."""
        sent: Sent = self._conn.send(
            LOCK_USERS_EXCLUSIVE if exclusive else LOCK_USERS_SHARED,
            {"user_ids": BinaryArray("text", sorted(set(user_ids)))},
        )
        return sent

    def _hold_users(self, user_ids: Sequence[str]) -> None:
        """Lock the users' rows shared unless the batch's first call locked them."""
        missing = [user for user in user_ids if user not in self._held_users]
        if missing:
            self._lock_users(missing, exclusive=False)

    def _store_device_list(
        self,
        new: StoredDeviceList,
        previous_counter: int | None,
        invite_hash: bytes | None,
        now: int,
    ) -> tuple[int, ...]:
        conn = self._conn
        self._lock_users([new.user_id], exclusive=True)
        # A device key is one user's: checked and stored under its lock, so two
        # users listing one key on two relays at once do not both succeed.
        for identity in sorted({identity for _, identity in new.devices}):
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (identity.hex(),))
        old = [
            (new.user_id, int(row[0]))
            for row in conn.execute(
                "SELECT device_id FROM devices WHERE user_id = ?", (new.user_id,)
            ).fetchall()
        ]
        self._lock_devices(old)
        try:
            return super()._store_device_list(new, previous_counter, invite_hash, now)
        except psycopg.errors.UniqueViolation:
            raise StorageConflict("the user was registered meanwhile") from None

    def _enqueue(self, batch: EnvelopeBatch, max_mailbox_size: int) -> list[MailboxPosition | None]:
        """As on SQLite, in two statements: one reads what the send is checked against
        (and takes its seqs), one stores it."""
        self._hold_users(list(batch.device_list_counters))
        self._hold_devices([(d.user_id, d.device_id) for d in batch.deliveries])
        epoch = self._current_epoch(0)  # this batch's newest, read once
        keys = self._chain.keys(epoch)
        assert keys is not None
        boxes = [keys.index(d.user_id, d.device_id) for d in batch.deliveries]
        ahead = self._ahead
        facts = None
        if ahead is not None:
            facts = ahead.facts_for(batch, boxes, self._conn.writes, max_mailbox_size)
        if facts is None:  # none read ahead, or no longer sure: read them now
            self._ahead = ahead = None
            facts = self._read_cluster_send(batch, boxes, epoch, max_mailbox_size)
        else:
            self.sends_read_ahead += 1
        positions = [
            None if p is None else MailboxPosition(p.epoch, p.seq, facts.last.get(box, 0))
            for p, box in zip(
                self._file_send(batch, max_mailbox_size, keys, boxes, facts), boxes, strict=True
            )
        ]
        if ahead is not None:
            ahead.filed(boxes, positions, self._conn.writes)
        stored = {
            (d.user_id, d.device_id)
            for d, position in zip(batch.deliveries, positions, strict=True)
            if position is not None
        }
        for relay, device in facts.presence:
            if device in stored:
                self._wakes.setdefault(relay, set()).add(device)
        return positions

    def _read_cluster_send(
        self, batch: EnvelopeBatch, boxes: Sequence[bytes], epoch: int, max_mailbox_size: int
    ) -> ClusterSendFacts:
        """What :meth:`_file_send` checks, where each mailbox ends now and which other
        relays hold recipients, with a seq per delivery: one statement."""
        rows = self._conn.run(
            in_partitions(SEND_FACTS, epoch), self._facts_parameters([batch], [boxes], epoch)
        )
        writes = self._conn.writes
        facts = _FactsAhead(rows, [batch], writes).facts_for(batch, boxes, writes, max_mailbox_size)
        assert facts is not None  # read for this send just now
        return facts

    def _facts_parameters(
        self, sends: Sequence[EnvelopeBatch], boxes: Sequence[Sequence[bytes]], epoch: int
    ) -> dict[str, BinaryArray | bytes | str | int]:
        """SEND_FACTS's parameters for ``sends`` (``boxes``: each one's mailbox indexes)."""
        users = list(dict.fromkeys(u for send in sends for u in send.device_list_counters))
        devices = list(dict.fromkeys((d.user_id, d.device_id) for s in sends for d in s.deliveries))
        return {
            "users": BinaryArray("text", users),
            **_column_arrays(devices, user_ids="text", device_ids="bigint"),
            "boxes": BinaryArray("bytea", list(dict.fromkeys(b for some in boxes for b in some))),
            "epoch": epoch,
            "relay": self.relay_id,
            "count": sum(len(send.deliveries) for send in sends),
        }

    def _write_send(
        self,
        payloads: Sequence[tuple[int, int, bytes]],
        deliveries: Sequence[tuple[int, int, bytes, int, bytes]],
        counted: Sequence[bytes],
        new_mailboxes: Sequence[tuple[bytes, int, bytes]],
    ) -> None:
        """As on SQLite, in one statement (every row is of the newest epoch), not waited for
        in an optimistic batch."""
        acknowledged = set() if self._ahead is None else self._ahead.acknowledged_boxes
        maybe = [row for row in new_mailboxes if row[0] in acknowledged]
        new = [row for row in new_mailboxes if row[0] not in acknowledged]
        self._conn.send(
            in_partitions(STORE_SEND, deliveries[0][1]),
            {
                **_column_arrays(
                    payloads, payload_ids="bigint", payload_epochs="bigint", payloads="bytea"
                ),
                **_column_arrays(
                    deliveries,
                    seqs="bigint",
                    epochs="bigint",
                    boxes="bytea",
                    delivery_payloads="bigint",
                    sealed="bytea",
                ),
                "counted": BinaryArray("bytea", counted),
                **_column_arrays(
                    maybe, maybe_boxes="bytea", maybe_epochs="bigint", maybe_sealed="bytea"
                ),
                **_column_arrays(new, new_boxes="bytea", new_epochs="bigint", new_sealed="bytea"),
            },
        )

    def _acknowledge(self, user_id: str, device_id: int, seqs: Sequence[int]) -> int:
        """As on SQLite; the device's envelopes of the newest epoch (nearly always all
        of them) in one statement, any others as on SQLite."""
        self._hold_devices([(user_id, device_id)])
        epoch = self._current_epoch(0)
        keys = self._chain.keys(epoch)
        assert keys is not None
        box = keys.index(user_id, device_id)
        writes = self._conn.writes
        sent = self._conn.send(
            in_partitions(ACKNOWLEDGE_NEWEST, epoch),
            {"seqs": BinaryArray("bigint", seqs), "epoch": epoch, "mailbox": box},
        )
        if self._ahead is not None:
            self._ahead.acknowledged(box, writes, self._conn.writes)
        if seqs and self._epochs_of(seqs) == (epoch, epoch):
            # No seq can be of an older epoch: the count is not needed before the
            # batch commits (a pipelined batch does not wait for it).
            prepared = self._conn.prepared
            return Later(lambda: len(prepared.rows(sent)))  # type: ignore[return-value]
        gone = {seq for (seq,) in self._conn.prepared.rows(sent)}
        rest = [seq for seq in seqs if seq not in gone]
        return len(gone) + (super()._acknowledge(user_id, device_id, rest) if rest else 0)

    def _note(
        self, user_id: str, device_id: int, change: int, notice: ExpiryNotice | None, now: int
    ) -> None:
        self._hold_devices([(user_id, device_id)])
        super()._note(user_id, device_id, change, notice, now)

    def _clear_expiry_notice(self, user_id: str, device_id: int, notice: ExpiryNotice) -> None:
        self._hold_devices([(user_id, device_id)])
        super()._clear_expiry_notice(user_id, device_id, notice)

    # ---------------------------------------------------------------- prekeys

    def _take_one(self, table: str, columns: str, key: tuple[str, int]) -> Any:
        """Take (delete and return) the device's lowest one-time key in ``table``, if any.

        Keys other relays are taking in open transactions are skipped; if
        all are, wait for the lowest of them (its taker may roll back), and
        answer "none" only when no key is left.
        """
        where = "WHERE user_id = ? AND device_id = ?"
        while True:
            for wait in ("SKIP LOCKED", ""):
                row = self._conn.execute(
                    f"DELETE FROM {table} {where} AND key_id = (SELECT key_id FROM {table} "
                    f"{where} ORDER BY key_id LIMIT 1 FOR UPDATE {wait}) RETURNING {columns}",
                    key + key,
                ).fetchone()
                if row is not None:
                    return row
            if self._conn.execute(f"SELECT 1 FROM {table} {where} LIMIT 1", key).fetchone() is None:
                return None

    # ---------------------------------------------------------------- presence

    def _attach(self, user_id: str, device_id: int, connection: bytes) -> None:
        """The device connected here: this relay holds it now, and its older connection closes."""
        if not self._lock_devices([(user_id, device_id)]):
            return  # removed meanwhile: nothing to hold
        previous = self._conn.execute(
            "SELECT relay, connection FROM presence WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        ).fetchone()
        self._conn.execute(
            "INSERT INTO presence (user_id, device_id, relay, connection) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, device_id) DO UPDATE SET relay = EXCLUDED.relay, "
            "connection = EXCLUDED.connection",
            (user_id, device_id, self.relay_id, connection),
        )
        if previous is not None and previous[0] != self.relay_id:
            payload = json.dumps(["superseded", user_id, device_id, bytes(previous[1]).hex()])
            self._conn.execute("SELECT pg_notify(?, ?)", (channel_of(previous[0]), payload))

    def _detach(self, user_id: str, device_id: int, connection: bytes) -> None:
        self._conn.execute(
            "DELETE FROM presence WHERE user_id = ? AND device_id = ? AND relay = ? "
            "AND connection = ?",
            (user_id, device_id, self.relay_id, connection),
        )

    def _forget_presence(self) -> None:
        """This relay holds no device (it starts, or stops)."""
        self._conn.execute("DELETE FROM presence WHERE relay = ?", (self.relay_id,))

    # ---------------------------------------------------------------- operator commands

    def _wipe_device(self, user_id: str, device_id: int) -> None:
        super()._wipe_device(user_id, device_id)
        self._conn.execute(
            "DELETE FROM presence WHERE user_id = ? AND device_id = ?", (user_id, device_id)
        )


@dataclass(frozen=True, slots=True)
class ClusterSendFacts(SendFacts):
    """A send's facts (:class:`~.sqlite.SendFacts`) and what the cluster needs of them."""

    last: Mapping[bytes, int]  # the seq each mailbox ends with now, where it holds any
    presence: Sequence[tuple[str, tuple[str, int]]]  # (relay, device) held by other relays


class _FactsAhead:
    """What the sends of a batch are checked against, read for all of them at once
    (SEND_FACTS, sent with the batch's locks: :meth:`PostgresDatabase._prelock`), then
    kept up to date with what the batch's calls do.

    Each send is given the facts SEND_FACTS would read at its turn, from these
    and from what the sends before it in the batch filed (one more queued in
    each mailbox, and its newest seq), with its seqs taken in order from those
    read ahead (so a mailbox's seqs grow in batch order, as each read's would).
    An acknowledgement earlier in the batch (:meth:`acknowledged`) lowers its
    mailbox's count by as many as it deleted, unknown until the batch
    commits, and deletes the mailbox's row if that left it empty: such a
    mailbox (``acknowledged_boxes``) is given as having no row (a send stores
    it as new, and STORE_SEND counts one more in a row it still finds), and
    room in it is certain only if the count before the acknowledgement had
    room. Its newest seq noted here may be one the acknowledgement deleted:
    a seq its device already has, which serves as well
    (MailboxPosition.previous). Any other write since it was read
    (``writes``, :attr:`PostgresConnection.writes`, moved on without it: a
    device list stored, a device attached ...) may have changed any fact:
    :meth:`facts_for` then answers None, and the send reads its own.
    """

    def __init__(
        self, rows: Sequence[tuple[Any, ...]], sends: Sequence[EnvelopeBatch], writes: int
    ) -> None:
        self.counters: dict[str, bytes] = {}
        self.listed: set[tuple[str, int]] = set()
        self.queued: dict[bytes, int] = {}
        self.last: dict[bytes, int] = {}
        self.presence: dict[tuple[str, int], list[str]] = {}  # device -> other relays holding it
        seqs: list[int] = []
        for kind, text, relay, number, blob in rows:
            if kind == FACT_COUNTER:
                self.counters[text] = bytes(blob)
            elif kind == FACT_LISTED:
                self.listed.add((text, int(number)))
            elif kind == FACT_QUEUED:
                self.queued[bytes(blob)] = int(number)
            elif kind == FACT_LAST:
                self.last[bytes(blob)] = int(number)
            elif kind == FACT_PRESENCE:
                self.presence.setdefault((text, int(number)), []).append(relay)
            else:
                seqs.append(int(number))
        self.seqs = deque(sorted(seqs))
        self.sends = deque(sends)  # those not yet given their facts, in batch order
        self.acknowledged_boxes: set[bytes] = set()
        self.writes = writes

    def facts_for(
        self, batch: EnvelopeBatch, boxes: Sequence[bytes], writes: int, max_mailbox_size: int
    ) -> ClusterSendFacts | None:
        """``batch``'s facts (``boxes``: its mailbox indexes), if the batch's next send is
        it and nothing else was written since; else None."""
        if writes != self.writes or not self.sends or self.sends[0] is not batch:
            return None
        self.sends.popleft()
        queued: dict[bytes, int] = {}
        for box in boxes:
            if box not in self.acknowledged_boxes:
                if box in self.queued:
                    queued[box] = self.queued[box]
            elif self.queued.get(box, 0) >= max_mailbox_size:
                return None  # room only its own read can tell
        devices = list(dict.fromkeys((d.user_id, d.device_id) for d in batch.deliveries))
        return ClusterSendFacts(
            counters={
                u: self.counters[u] for u in batch.device_list_counters if u in self.counters
            },
            listed=sum(device in self.listed for device in devices),
            queued=queued,
            seqs=[self.seqs.popleft() for _ in batch.deliveries],
            last={box: self.last[box] for box in boxes if box in self.last},
            presence=[(relay, d) for d in devices for relay in self.presence.get(d, ())],
        )

    def filed(
        self, boxes: Sequence[bytes], positions: Sequence[MailboxPosition | None], writes: int
    ) -> None:
        """A send given its facts here stored ``positions`` (None: not stored) with the
        write that brought the count to ``writes``."""
        for box, position in zip(boxes, positions, strict=True):
            if position is not None:
                self.queued[box] = self.queued.get(box, 0) + 1
                self.last[box] = position.seq
        self.writes = writes

    def acknowledged(self, box: bytes, before: int, writes: int) -> None:
        """An acknowledgement of deliveries in mailbox ``box`` (the newest epoch's), sent
        when the count of writes was ``before`` and that brought it to ``writes``."""
        if before == self.writes:
            self.acknowledged_boxes.add(box)
            self.writes = writes


class _BatchLocks:
    """The locks a shared batch's calls will take (see PostgresDatabase._prelock)."""

    def __init__(self) -> None:
        self.users: dict[str, bool] = {}  # user id -> whether exclusively
        self.user_devices: set[str] = set()  # users all of whose devices are locked
        self.devices: set[tuple[str, int]] = set()
        self.presence = False  # the devices this relay holds
        self.invites: set[bytes] = set()
        self.identities: set[bytes] = set()

    def user(self, user_id: str, *, exclusive: bool) -> None:
        self.users[user_id] = self.users.get(user_id, False) or exclusive


def _locks_of_send(locks: _BatchLocks, batch: EnvelopeBatch, *_: Any) -> None:
    for user_id in batch.device_list_counters:
        locks.user(user_id, exclusive=False)
    locks.devices.update((d.user_id, d.device_id) for d in batch.deliveries)


def _locks_of_list_change(
    locks: _BatchLocks, new: StoredDeviceList, _counter: Any, invite_hash: bytes | None, *_: Any
) -> None:
    locks.user(new.user_id, exclusive=True)
    locks.user_devices.add(new.user_id)  # the removed ones are wiped
    locks.identities.update(identity for _, identity in new.devices)
    if invite_hash is not None:
        locks.invites.add(invite_hash)


def _locks_of_user_deletion(locks: _BatchLocks, user_id: str, *_: Any) -> None:
    locks.user(user_id, exclusive=True)
    locks.user_devices.add(user_id)


def _locks_of_device_call(locks: _BatchLocks, user_id: str, device_id: int, *_: Any) -> None:
    locks.devices.add((user_id, device_id))


def _locks_of_forgetting_presence(locks: _BatchLocks) -> None:
    locks.presence = True


# What each storage call locks, by its PostgresDatabase method's name. A call
# not named here takes no row lock (reads), except as the lock order says.
_LOCK_PLANS: dict[str, Callable[..., None]] = {
    "_enqueue": _locks_of_send,
    "_store_device_list": _locks_of_list_change,
    "_delete_user": _locks_of_user_deletion,
    "_acknowledge": _locks_of_device_call,
    "_clear_expiry_notice": _locks_of_device_call,
    "_take_bundle": _locks_of_device_call,
    "_store_prekeys": _locks_of_device_call,
    "_attach": _locks_of_device_call,
    "_detach": _locks_of_device_call,
    "_delete_device_mail": _locks_of_device_call,
    "_wipe_device": _locks_of_device_call,
    "_forget_presence": _locks_of_forgetting_presence,
}


def channel_of(relay_id: str) -> str:
    """The notification channel of the relay process ``relay_id``."""
    return f"hushchat_relay_{relay_id}"


def _wake_payloads(devices: Sequence[tuple[str, int]]) -> Iterator[str]:
    """Notification payloads naming ``devices``, each under PostgreSQL's size limit."""
    part: list[tuple[str, int]] = []
    size = 0
    for device in devices:
        entry = len(json.dumps(list(device))) + 1
        if part and size + entry > NOTIFY_PAYLOAD_LIMIT:
            yield json.dumps(["mail", part])
            part, size = [], 0
        part.append(device)
        size += entry
    if part:
        yield json.dumps(["mail", part])


def _chunks(rows: Sequence[T]) -> Iterator[Sequence[T]]:
    """Keys to lock in slices (one statement each), in the order given."""
    return (rows[i : i + 1000] for i in range(0, len(rows), 1000))


class PostgresStorage(SqliteStorage):
    """:class:`~.interface.RelayStorage` on PostgreSQL, with group commit, for a relay cluster.

    The storage calls are :class:`~.sqlite.SqliteStorage`'s, run on a
    :class:`PostgresDatabase`. The cluster calls (:meth:`attach`,
    :meth:`detach`, :meth:`listen`) let relay processes sharing the
    database push to each other's devices.
    """

    _db: PostgresDatabase

    def __init__(
        self,
        database: PostgresDatabase,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        super().__init__(database, max_batch=max_batch, max_queued=max_queued)
        self._stop = threading.Event()

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        key_file: str | None = None,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], int] = wall_clock_ms,
        reset_keys: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
        relay_id: str | None = None,
    ) -> PostgresStorage:
        """Open the relay database at ``dsn`` (a ``postgresql://`` URL), creating or
        migrating its schema; the arguments are :meth:`.SqliteStorage.open`'s.

        ``key_file`` holds the keys of the queued mail: every relay process
        of a cluster needs a copy of the same file (None: keys in memory,
        for tests; a second relay then cannot open the mail).
        """
        database = await trio.to_thread.run_sync(
            partial(
                PostgresDatabase,
                dsn,
                key_file=key_file,
                retention_seconds=retention_seconds,
                clock=clock,
                reset_keys=reset_keys,
                relay_id=relay_id,
            )
        )
        return cls(database, max_batch=max_batch, max_queued=max_queued)

    @property
    def relay_id(self) -> str:
        return self._db.relay_id

    @property
    def database(self) -> PostgresDatabase:
        return self._db

    async def attach(self, user_id: str, device_id: int, connection: bytes) -> None:
        """The device authenticated on this relay as ``connection`` (see PostgresDatabase)."""
        await self._writer.call(partial(self._db._attach, user_id, device_id, connection))

    async def detach(self, user_id: str, device_id: int, connection: bytes) -> None:
        await self._writer.call(
            partial(self._db._detach, user_id, device_id, connection), savepoint=False
        )

    async def listen(
        self,
        events: ClusterEvents,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand this relay's notifications to ``events`` until cancelled.

        A thread of its own holds a connection that LISTENs on the relay's
        channel; ``task_status.started`` once it listens. After a lost
        connection it reconnects, listens again and calls ``events.resynced``.
        """
        token = trio.lowlevel.current_trio_token()
        listening = trio.Event()
        done = trio.Event()
        self._stop.clear()

        def deliver(payload: str) -> None:
            try:
                message = json.loads(payload)
                if message[0] == "mail":
                    events.mail([(str(u), int(d)) for u, d in message[1]])
                elif message[0] == "superseded":
                    events.superseded(str(message[1]), int(message[2]), bytes.fromhex(message[3]))
            except (ValueError, IndexError, TypeError, KeyError):
                logger.warning("unreadable notification on the relay's channel")

        # The listener retries every POSTGRES_RECONNECT_INTERVAL while the server is away.
        away_log = LogThrottle(WARNING_LOG_INTERVAL)

        def run() -> None:
            first = True
            try:
                while not self._stop.is_set():
                    try:
                        with connect(self._db._dsn) as conn:
                            conn.execute(f"LISTEN {self._db.channel}")
                            if not first:
                                self._db.suspect_connection()
                            token.run_sync_soon(listening.set if first else events.resynced)
                            first = False
                            while not self._stop.is_set():
                                for note in conn.notifies(timeout=NOTIFY_POLL_INTERVAL):
                                    token.run_sync_soon(deliver, note.payload)
                    except psycopg.OperationalError as exc:
                        if self._stop.is_set():
                            return
                        also = away_log.line_end(time.monotonic(), "more failed tries")
                        if also is not None:
                            logger.warning(
                                "lost the database's notifications (%s): reconnecting%s",
                                " ".join(str(exc).split()),  # psycopg's reasons span lines
                                also,
                            )
                        self._stop.wait(POSTGRES_RECONNECT_INTERVAL)
            except trio.RunFinishedError:
                return
            finally:
                with suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        thread = threading.Thread(target=run, name="hushchat-relay-listen", daemon=True)
        thread.start()
        try:
            await listening.wait()
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._stop.set()
            with trio.CancelScope(shield=True):
                await done.wait()

    async def aclose(self) -> None:
        """Forget this relay's presence, let every queued call commit, close. Idempotent."""
        self._stop.set()
        try:
            await self._writer.call(self._db._forget_presence, savepoint=False)
        except (trio.ClosedResourceError, psycopg.Error, OSError) as exc:
            logger.debug("presence not forgotten: %s", exc)
        await self._writer.aclose(self._db.close)
