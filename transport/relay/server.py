"""The relay server: listeners, the registry of connected devices, the retention sweeper.

Run it with :func:`serve_relay` (``port = await nursery.start(serve_relay,
config)``), or drive :meth:`Relay.handle_connection` with any trio stream
(tests use in-memory streams). The relay stores and forwards ciphertext;
it authenticates devices, keeps the device and prekey directories, and
never reads a payload. spec/07-relay-protocol.md describes the protocol.
"""

from __future__ import annotations

import errno
import gc
import logging
import socket
import sqlite3
from collections.abc import Sequence
from functools import partial

import trio

from hushchat.protocol.errors import StateError

from ..wire.errors import RelayError, StorageFull, Superseded, TransportError, first_leaf
from ..wire.frames import RequestLimits
from ..wire.limits import WARNING_LOG_INTERVAL
from ..wire.records import PreKeyCounts
from .config import RelayConfig
from .ratelimit import KeyedRateLimiter, LogThrottle
from .session import RelaySession
from .storage.atrest import RelayKeysMissing
from .storage.interface import (
    ClusterEvents,
    ClusterStorage,
    RelayStorage,
    StoredDeviceList,
    UnsuitableDatabase,
)
from .storage.names import is_postgres_url, without_password
from .storage.sqlite import SqliteStorage

logger = logging.getLogger("hushchat.relay")

DeviceKey = tuple[str, int]

# How often the relay logs, at INFO, how many connections it holds (only when
# that changed): enough for an operator to see load, never who is connected.
ACTIVITY_LOG_INTERVAL = 60.0

# Device lists kept in memory to check sends against (each send then costs
# one storage transaction, not two). A list is at most ~1 KB (8 devices),
# so this bounds the copy to ~10 MB, whatever the number of users.
DIRECTORY_CACHE_SIZE = 10_000


class RelayStartError(TransportError):
    """The relay could not start: the sentence says what failed and what to do.

    Raised by :func:`serve_relay` before it serves anything, with whatever it
    had opened closed again (a database it created stays empty of mail).
    """

    code = "RELAY_START_FAILED"


def _listen_error(config: RelayConfig, exc: OSError) -> str:
    where = f"{config.host} port {config.port}"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: unknown host {config.host!r} ({exc.strerror})"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is in use (is another relay running?)"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {config.host} is not an address of this machine"
    return f"cannot listen on {where}: {exc.strerror or exc}"


async def open_storage(config: RelayConfig) -> tuple[RelayStorage, ClusterStorage | None]:
    """The relay's storage: ``config.db_path``'s SQLite file, or its PostgreSQL database.

    The second value is the storage again if other relay processes may share
    it (PostgreSQL), else None.
    """
    if is_postgres_url(config.db_path):
        from .storage.postgres import PostgresStorage  # the optional extra hushchat[postgres]

        storage = await PostgresStorage.open(
            config.db_path,
            key_file=config.key_file,
            retention_seconds=config.retention_seconds,
            clock=config.clock,
            reset_keys=config.reset_keys,
        )
        return storage, storage
    sqlite_storage = await SqliteStorage.open(
        config.db_path,
        key_file=config.key_file,
        retention_seconds=config.retention_seconds,
        clock=config.clock,
        reset_keys=config.reset_keys,
    )
    return sqlite_storage, None


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL's driver's (without importing it if it is not loaded)."""
    return type(exc).__module__.split(".")[0] == "psycopg"


def database_error(path: str, exc: Exception) -> str:
    """What is wrong with the relay database at ``path``, which would not open (``exc``)."""
    if is_postgres_url(path):
        path = without_password(path)
        if is_database_error(exc):
            return f"cannot open the relay database {path}: {str(exc).strip()}"
    if isinstance(exc, RelayKeysMissing | UnsuitableDatabase):
        return exc.message
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return f"{path} is not a hushchat relay database ({exc}); give another --db"
    return f"cannot open the relay database {path}: {exc}"


class Relay:
    """State shared by a relay's connections. Connections never see each other directly."""

    def __init__(
        self, config: RelayConfig, storage: RelayStorage, cluster: ClusterStorage | None = None
    ) -> None:
        """``cluster``: the storage again, if relay processes share it (PostgreSQL)."""
        self.config = config
        self.storage = storage
        self.cluster = cluster
        self.request_limits: RequestLimits = config.limits.request_limits
        self.bundle_limiter: KeyedRateLimiter[tuple[DeviceKey, DeviceKey]] = KeyedRateLimiter(
            config.limits.bundle_fetch_rate, max_keys=config.limits.max_rate_limit_keys
        )
        self._sessions: dict[DeviceKey, RelaySession] = {}
        self.connections_open = 0
        self.connections_served = 0
        self._refused_logins = LogThrottle(WARNING_LOG_INTERVAL)
        # One per kind of fault (see _fault): each failing kind is seen.
        self._faults: dict[str, LogThrottle] = {}
        # Recently read or stored device lists, oldest first (see device_lists).
        self._directory: dict[str, StoredDeviceList] = {}

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection to its end; never raises (but Cancelled)."""
        self.connections_open += 1
        self.connections_served += 1
        try:
            await RelaySession(self, stream).run()
        except* Exception as failed:
            # A bug must cost this connection only, never the relay (Cancelled,
            # a BaseException, still propagates when the relay shuts down).
            self.connection_failed(failed)
        finally:
            self.connections_open -= 1
            await trio.aclose_forcefully(stream)

    async def log_activity(self, interval: float = ACTIVITY_LOG_INTERVAL) -> None:
        """Log the connection counts at INFO every ``interval`` seconds they changed."""
        last: tuple[int, int, int] | None = None
        while True:
            await trio.sleep(interval)
            now = (self.connections_open, len(self._sessions), self.connections_served)
            if now != last:
                logger.info(
                    "%d connections open, %d devices authenticated; %d connections since start",
                    *now,
                )
                last = now

    async def run_sweeper(self) -> None:
        """Purge the epochs that leave the retention window, as each one does, forever.

        The first sweep runs at once: a relay that was stopped for a while
        lets the keys of the epochs that left the window meanwhile cease to
        exist before it serves anything old.
        """
        while True:
            try:
                purged = await self.storage.purge_expired(self.config.clock())
            except StorageFull:
                logger.debug("retention sweep put off: the disk is full")
            except Exception:
                logger.exception("retention sweep failed")
            else:
                if purged:
                    logger.info("retention sweep deleted %d expired envelopes", purged)
            try:
                await self.storage.forget_full_budgets(
                    self.config.limits.one_time_prekey_budget, self.config.clock()
                )
            except StorageFull:
                pass  # put off like the purge: a full budget's row costs nothing meanwhile
            except Exception:
                logger.exception("sweep of full one-time budgets failed")
            self.bundle_limiter.prune(trio.current_time())
            await trio.sleep(self._sweep_delay())

    def _sweep_delay(self) -> float:
        """Seconds until the next sweep: the sweep interval, or the next epoch boundary."""
        interval = self.config.limits.sweep_interval
        if interval is not None:
            return interval
        now = self.config.clock()
        return max(self.storage.next_purge(now) - now, 0) / 1000

    # ---------------------------------------------------------------- the directory

    async def device_lists(
        self, user_ids: Sequence[str], *, cached: bool = False
    ) -> dict[str, StoredDeviceList]:
        """The current device lists of those of ``user_ids`` that are registered.

        ``cached``: lists this relay read or stored recently may come from
        memory. Another relay process sharing the database may have changed
        them since, so use a cached list only where a compare-and-set
        follows (a send's commit checks each list's counter), never to
        refuse or to authenticate.
        """
        found: dict[str, StoredDeviceList] = {}
        missing = list(user_ids)
        if cached:
            missing = []
            for user_id in user_ids:
                if (known := self._directory.get(user_id)) is not None:
                    found[user_id] = known
                else:
                    missing.append(user_id)
        if missing:
            stored = await self.storage.device_lists(missing)
            for device_list in stored.values():
                self.remember(device_list)
            found.update(stored)
        return found

    def remember(self, device_list: StoredDeviceList) -> None:
        """Keep a device list just read or stored (the oldest goes beyond the bound)."""
        self._directory.pop(device_list.user_id, None)
        self._directory[device_list.user_id] = device_list
        if len(self._directory) > DIRECTORY_CACHE_SIZE:
            del self._directory[next(iter(self._directory))]

    # ---------------------------------------------------------------- connected devices

    @property
    def connected_devices(self) -> frozenset[DeviceKey]:
        """(user_id, device_id) of every authenticated connection."""
        return frozenset(self._sessions)

    def attach(self, session: RelaySession) -> None:
        """Register an authenticated connection; an older one of the same device is closed."""
        previous = self._sessions.get(session.key)
        self._sessions[session.key] = session
        if previous is not None and previous is not session:
            previous.close(Superseded("another connection authenticated as this device"))

    async def announce(self, session: RelaySession) -> None:
        """Tell the relays sharing the database that ``session``'s device is held here."""
        if self.cluster is not None:
            await self.cluster.attach(session.user_id, session.device_id, session.connection_id)

    async def withdraw(self, session: RelaySession) -> None:
        """Tell the relays sharing the database that ``session`` ended (if it authenticated)."""
        if self.cluster is None or not session.user_id:
            return
        try:
            await self.cluster.detach(session.user_id, session.device_id, session.connection_id)
        except Exception as exc:  # its next connection replaces the row; a stale one costs a wake
            logger.debug("connection end not stored: %s", exc)

    @property
    def cluster_events(self) -> ClusterEvents:
        """What this relay does when another relay process sharing the database tells it."""
        return ClusterEvents(self._mail_elsewhere, self._superseded_elsewhere, self._resynced)

    def _mail_elsewhere(self, devices: Sequence[DeviceKey]) -> None:
        for device in devices:
            if (session := self._sessions.get(device)) is not None:
                session.mail_waiting()

    def _superseded_elsewhere(self, user_id: str, device_id: int, connection: bytes) -> None:
        session = self._sessions.get((user_id, device_id))
        if session is not None and session.connection_id == connection:
            session.close(Superseded("another connection authenticated as this device"))

    def _resynced(self) -> None:
        for session in self._sessions.values():
            session.mail_waiting()

    def detach(self, session: RelaySession) -> None:
        """Forget a connection that ended (a no-op unless it is the registered one)."""
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]

    def session_of(self, user_id: str, device_id: int) -> RelaySession | None:
        """The device's authenticated connection, if it has one."""
        return self._sessions.get((user_id, device_id))

    def close_device(self, user_id: str, device_id: int, error: RelayError) -> None:
        session = self._sessions.get((user_id, device_id))
        if session is not None:
            session.close(error)

    def login_refused(
        self, user_id: str, device_id: int, reason: str, *, now: float | None = None
    ) -> None:
        """Log a refused AUTH: a WARNING a minute at most, the user's identity at DEBUG only.

        A client that retries a refused login in a loop (a relay that lost its
        database, a removed device) must not flood the log, and the operator
        must still see that logins are refused, and why.
        """
        logger.debug("refused the login of %s/%d: %s", user_id, device_id, reason)
        also = self._refused_logins.line_end(
            trio.current_time() if now is None else now, "more refused"
        )
        if also is not None:
            logger.warning("refused a login: %s%s", reason, also)

    def internal_error(self, request: str, *, now: float | None = None) -> None:
        """Log, from inside its ``except`` block, that handling a ``request`` (its type's
        name) failed: the traceback at ERROR, once a minute at most per request type.

        Any client, authenticated or not, can repeat a request that meets a fault
        (as one could with a user id containing U+0000, which PostgreSQL cannot
        store, before the protocol refused it): the log must not grow with it,
        and the operator must still see each kind of fault.
        """
        self._fault(f"internal error handling {request}", now)

    def connection_failed(self, failed: BaseException, *, now: float | None = None) -> None:
        """Log, from inside its ``except`` block, that ``failed`` ended a connection: the
        traceback at ERROR, once a minute at most per kind (the first error's type).

        A fault that meets every connection (the database away) ends each
        connected device's, and each reconnects and meets it again: one line a
        minute says so; another kind of fault is still seen at once.
        """
        self._fault(f"connection failed ({type(first_leaf(failed)).__name__})", now)

    def acknowledgement_not_stored(self, *, now: float | None = None) -> None:
        """Log, from inside its ``except`` block, that the storage failed to delete what a
        device acknowledged: the traceback at ERROR, once a minute at most (every
        device's acknowledgements fail while the database is away)."""
        self._fault("acknowledgement not stored: the envelope will come again", now)

    def _fault(self, line: str, now: float | None) -> None:
        """``line`` and the traceback being handled at ERROR, at most once a minute for
        each ``line`` (a few dozen: the request types and the relay's error types)."""
        throttle = self._faults.setdefault(line, LogThrottle(WARNING_LOG_INTERVAL))
        also = throttle.line_end(trio.current_time() if now is None else now, "more")
        if also is not None:
            logger.exception("%s%s", line, also)

    def is_low(self, counts: PreKeyCounts) -> bool:
        threshold = self.config.limits.prekey_low_threshold
        return counts.one_time < threshold or counts.one_time_kem < threshold

    def prekeys_taken(self, user_id: str, device_id: int, remaining: PreKeyCounts) -> None:
        """A bundle fetch took prekeys of a device: tell it if its stock is low."""
        session = self._sessions.get((user_id, device_id))
        if session is not None and self.is_low(remaining):
            session.prekeys_low(remaining)


def freeze_startup_objects() -> None:
    """For a process that runs a relay, once it serves: collect, then set every object
    alive now (modules, the storage's and the keys' state) aside from the garbage
    collector's later runs (:func:`gc.freeze`).

    A full collection scans every tracked object and stops the relay while it
    does: mid-run pauses of 44 to 64 ms were measured, with most objects made
    at start-up and alive until the end. Not done by :func:`serve_relay`: in a
    process that runs other things, objects set aside are never collected.
    """
    gc.collect()
    gc.freeze()


async def serve_relay(
    config: RelayConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a relay until cancelled; ``task_status.started`` reports the bound TCP port.

    Listens on ``config.host``/``config.port`` (TLS if ``config.ssl_context``),
    then opens (or creates) the SQLite database ``config.db_path`` with its
    key file (or, for a ``postgresql://`` URL, the PostgreSQL database that
    other relay processes may share, listening for their notifications
    before it serves), and runs the retention sweeper. Listening comes first
    so that a relay that cannot listen creates no database. A failure to start raises
    :class:`RelayStartError`; the database is closed on the way out.
    """
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as exc:  # socket.gaierror included
        raise RelayStartError(_listen_error(config, exc)) from exc
    try:
        storage, cluster = await open_storage(config)
    except Exception as exc:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
        expected = (sqlite3.Error, StateError, OSError, RelayKeysMissing, UnsuitableDatabase)
        if not isinstance(exc, expected) and not (
            is_postgres_url(config.db_path) and is_database_error(exc)
        ):
            raise
        raise RelayStartError(database_error(config.db_path, exc)) from exc
    relay: Relay | None = None
    try:
        relay = Relay(config, storage, cluster)
        port: int = listeners[0].socket.getsockname()[1]
        served: list[trio.abc.Listener[trio.abc.Stream]] = list(listeners)
        if config.ssl_context is not None:
            served = [trio.SSLListener(listener, config.ssl_context) for listener in listeners]
        async with trio.open_nursery() as nursery:
            if cluster is not None:  # woken by the others before the first connection
                await nursery.start(partial(cluster.listen, relay.cluster_events))
            nursery.start_soon(relay.run_sweeper)
            nursery.start_soon(relay.log_activity)
            await nursery.start(trio.serve_listeners, relay.handle_connection, served)
            logger.info("relay %r listening on %s port %d", config.name, config.host, port)
            task_status.started(port)
    finally:
        with trio.CancelScope(shield=True):
            await storage.aclose()
        if relay is not None:
            logger.info("relay stopped (%d connections since start)", relay.connections_served)
