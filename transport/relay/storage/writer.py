"""Group commit: one writer thread runs every storage call, a batch of them per transaction.

One thread owns the database connection, so the event loop never blocks on
disk. Every storage call, reads included, is queued to it as a
:class:`DatabaseCall`; the thread takes everything queued (at most
``max_batch`` calls) and runs it as ONE transaction (SQLite's ``BEGIN
IMMEDIATE``, PostgreSQL's ``BEGIN``),
each call inside its own SAVEPOINT (a call that fails, e.g. MailboxFull or
a compare-and-set conflict, rolls back alone), then commits once: one fsync
for the whole batch. Callers are woken only after that COMMIT returned, so
a returned value still means "committed", and every call sees exactly the
calls queued before it (queue order is commit order). Calls that arrive
while a batch commits go into the next one. At most ``max_queued`` calls
wait; further callers wait to queue (backpressure).
"""

from __future__ import annotations

import errno
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, Protocol, TypeVar, cast

import trio

from hushchat.protocol.errors import InvalidArgument

from ...wire.errors import StorageFull

T = TypeVar("T")

logger = logging.getLogger("hushchat.relay")

# Calls committed in one transaction at most. The whole batch shares one
# fsync, but every call in it also waits for the others' CPU time; beyond
# this many, that wait outgrows the fsync saved, so larger batches would
# only add latency.
DEFAULT_MAX_BATCH = 512

# Calls queued to the writer at most; callers beyond wait to queue. A busy
# connection has a request, a mailbox read and the deletions of what it
# acknowledged (at most its window) outstanding, so this is hundreds of busy
# connections before anyone waits, and it bounds the memory held by queued
# sends.
DEFAULT_MAX_QUEUED = 4096


# PostgreSQL's disk_full.
DISK_FULL_SQLSTATE = "53100"


class DatabaseCall:
    """One storage call for :func:`run_batch`: what to run, then its outcome.

    ``run`` executes inside the batch's transaction, in a savepoint of its
    own so that its failure rolls back only its own changes; ``savepoint``
    False skips that for reads and single-statement writes (SQLite makes a
    statement atomic by itself). ``after_commit`` runs once the batch
    committed, outside any transaction (WAL truncation).
    ``reported``, given the result, runs in the trio thread when a
    successful call's batch is reported, in the order the calls committed.
    ``exclusive`` asks for a transaction of its own that no other relay
    process sharing the database overlaps (PostgreSQL: an epoch's purge);
    a SQLite transaction is always that.
    """

    __slots__ = (
        "after_commit",
        "error",
        "exclusive",
        "reported",
        "result",
        "run",
        "savepoint",
        "waiter",
    )

    def __init__(
        self,
        run: Callable[[], object],
        *,
        savepoint: bool = True,
        after_commit: Callable[[], None] | None = None,
        reported: Callable[[Any], None] | None = None,
        exclusive: bool = False,
    ) -> None:
        self.run = run
        self.savepoint = savepoint
        self.exclusive = exclusive
        self.after_commit = after_commit
        self.reported = reported
        self.result: object = None
        self.error: BaseException | None = None
        self.waiter: trio.lowlevel.Task | None = None  # woken by the writer when reported

    def outcome(self) -> Any:
        """The call's result, or raise its error."""
        if self.error is not None:
            raise self.error
        return self.result


class BatchConnection(Protocol):
    """The part of a database connection :func:`run_batch` uses (sqlite3's, or an adapter)."""

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


# Errors that fail the whole batch, to be run again: the database chose its
# transaction as the victim of a deadlock or a serialization failure
# (SQLSTATE 40P01, 40001), which only relay processes sharing one PostgreSQL
# cause. Rolling back one call would not do: the other side may wait for a
# lock an earlier call of the batch holds.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


def is_retryable(error: BaseException | None) -> bool:
    """Whether ``error`` failed a batch that may be run again as it was."""
    return getattr(error, "sqlstate", None) in RETRYABLE_SQLSTATES


def run_batch(
    db: BatchConnection,
    calls: Sequence[DatabaseCall],
    *,
    begin: str = "BEGIN IMMEDIATE",
    after_begin: Callable[[Any], None] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """Run ``calls`` in order in one transaction, each atomic on its own; commit once.

    Fills each call's result or error. A call that raises is rolled back
    to its savepoint and the others go on. If the transaction itself
    fails (BEGIN, COMMIT, or an error SQLite answers by rolling back
    everything), every call of the batch gets that error: nothing of
    the batch was stored. After-commit actions run only after a commit.
    A full disk is :class:`StorageFull`, with the database's error as its
    cause. ``after_begin`` is given what ``begin`` returned (PostgreSQL's
    batch reads the newest epoch with it); ``before_commit`` runs inside the
    transaction after the last call (PostgreSQL's notifications, sent on commit).
    """
    try:
        if db.in_transaction:
            # A rollback that failed left the last transaction open: end it
            # first, or every BEGIN from now on would fail.
            db.execute("ROLLBACK")
        begun = db.execute(begin)
        if after_begin is not None:
            after_begin(begun)
        for call in calls:
            _run_call(db, call)
        if before_commit is not None:
            before_commit()
        db.execute("COMMIT")
    except BaseException as exc:  # the transaction failed: nothing of the batch is stored
        if db.in_transaction:
            # SQLite may have rolled back already (after SQLITE_FULL, say): then
            # ROLLBACK fails with "no transaction is active", which is not the cause.
            with suppress(Exception):
                db.execute("ROLLBACK")
        _fail_all(calls, storage_error(exc))
        return
    for call in calls:
        if call.after_commit is not None and call.error is None:
            try:
                call.after_commit()
            except Exception as exc:
                call.error = storage_error(exc)


def _run_call(db: BatchConnection, call: DatabaseCall) -> None:
    if call.savepoint:
        db.execute("SAVEPOINT call")
    try:
        call.result = call.run()
    except Exception as exc:
        if not db.in_transaction or is_retryable(exc):
            raise  # the whole transaction is lost (disk full, I/O error, lost link, deadlock)
        call.error = storage_error(exc)
        if call.savepoint:
            try:
                db.execute("ROLLBACK TO call")
            except Exception:
                raise exc from None  # the transaction is lost; the call's error is the cause
    if call.savepoint:
        db.execute("RELEASE call")


def is_storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the database's size limit) is full."""
    if getattr(exc, "sqlstate", None) == DISK_FULL_SQLSTATE:  # PostgreSQL (psycopg)
        return True
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_error(exc: BaseException) -> BaseException:
    """What a caller gets for ``exc``: StorageFull (its cause ``exc``) for a full disk."""
    if not is_storage_full(exc):
        return exc
    error = StorageFull("the relay's storage is full; retry later")
    error.__cause__ = exc
    return error


def _fail_all(calls: Sequence[DatabaseCall], error: BaseException) -> None:
    for call in calls:
        call.result, call.error = None, error


class BatchRunner(Protocol):
    """What the writer thread runs each batch on (a database, see :func:`run_batch`)."""

    def run_batch(self, calls: Sequence[DatabaseCall]) -> None:
        """Run ``calls`` as one transaction; never raises (outcomes are in the calls)."""


class GroupCommitWriter:
    """The writer thread of a database and the queue of calls to it; see the module docstring.

    The thread is started by the first call. Calls are made from one trio run.
    """

    def __init__(
        self,
        database: BatchRunner,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if max_batch < 1 or max_queued < 1:
            raise InvalidArgument("max_batch and max_queued must be at least 1")
        self._db = database
        self._max_batch = max_batch
        self._room = trio.Semaphore(max_queued)
        self._queue: queue.SimpleQueue[DatabaseCall] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False
        self._last: DatabaseCall | None = None  # the close call: the writer's last

    async def call(
        self,
        run: Callable[[], T],
        *,
        savepoint: bool = True,
        after_commit: Callable[[], None] | None = None,
        reported: Callable[[T], None] | None = None,
        exclusive: bool = False,
    ) -> T:
        """Run ``run`` in the next batch (see :class:`DatabaseCall`); its result once committed."""
        call = DatabaseCall(
            run,
            savepoint=savepoint,
            after_commit=after_commit,
            reported=reported,
            exclusive=exclusive,
        )
        await self._submit(call)
        return cast(T, call.outcome())

    async def aclose(self, close: Callable[[], None]) -> None:
        """Let every queued call commit (or fail), then run ``close``; idempotent.

        ``close`` runs once the writer thread has ended, whatever became of
        the last batch (a full disk must not stop the relay from closing).
        Later calls raise trio.ClosedResourceError.
        """
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._last = DatabaseCall(lambda: None, savepoint=False)
            await self._submit(self._last, closing=True)
            await trio.to_thread.run_sync(self._thread.join)
        await trio.to_thread.run_sync(close)

    async def _submit(self, call: DatabaseCall, *, closing: bool = False) -> None:
        """Queue ``call`` and wait until its batch committed (or failed)."""
        try:
            self._room.acquire_nowait()  # the common case: no task switch to queue
        except trio.WouldBlock:
            await self._room.acquire()
        # Checked right before queueing: nothing can be queued behind the close call.
        if self._closed and not closing:
            self._room.release()
            raise trio.ClosedResourceError("the relay storage is closed")
        call.waiter = trio.lowlevel.current_task()
        if self._thread is None:
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.Thread(
                target=self._write, name="hushchat-relay-db", daemon=True
            )
            self._thread.start()
        self._queue.put(call)
        # Queued means it runs. As a call in a thread (trio.to_thread), it is
        # not abandoned if the caller is cancelled meanwhile: the caller gets
        # its outcome, and the cancellation at its next checkpoint, so a
        # commit is never half-observed.
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _write(self) -> None:
        """The writer thread: batch whatever is queued, commit, report; until closed."""
        assert self._token is not None
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._db.run_batch(batch)  # never raises: outcomes are in the calls
            try:
                self._token.run_sync_soon(self._report, batch)
            except trio.RunFinishedError:
                return
            if self._last is not None and self._last in batch:
                return

    def _report(self, batch: list[DatabaseCall]) -> None:
        """In the trio thread: wake the callers of a committed batch, make room."""
        for call in batch:
            if call.reported is not None and call.error is None:
                try:
                    call.reported(call.result)
                except Exception:  # the caller's business; never the other waiters'
                    logger.exception("storage commit listener failed")
            assert call.waiter is not None
            trio.lowlevel.reschedule(call.waiter)
            self._room.release()
