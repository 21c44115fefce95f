"""The PostgreSQL the relay tests run against: one throwaway server per test session.

No tests here. tests/conftest.py starts the server (:func:`session_cluster`)
the first time a test asks for PostgreSQL, and gives each such test a
database of its own: a schema of one database (its URL sets the
``search_path``) holding the relay's tables, made ready by a thread while
other tests run (a schema is made and dropped several times faster than a
database is copied). Without the server binaries the PostgreSQL tests skip,
saying so.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import pytest

from hushchat.devtools.pgcluster import (
    SERVER_BINARIES,
    ThrowawayCluster,
    server_binaries,
    throwaway_cluster,
)
from hushchat.transport.relay.storage.postgres import (
    PostgresConnection,
    create_or_migrate_schema,
)

# The database whose schemas the tests use.
TEST_DATABASE = "hushchat_tests"

MISSING = (
    f"PostgreSQL server binaries not installed ({SERVER_BINARIES}/initdb): "
    "install Debian's postgresql (.ci/run does)"
)

# Databases made ready ahead by a thread while tests run: a test waits for
# one only when tests use them faster than they are copied.
READY_DATABASES = 3


class DatabasePool:
    """Fresh copies of the template, made (and used ones dropped) by a thread of its own."""

    def __init__(self, cluster: ThrowawayCluster) -> None:
        self._cluster = cluster
        self._numbers = itertools.count(1)
        self._ready: queue.Queue[str | BaseException] = queue.Queue(READY_DATABASES)
        self._dropped: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="test-databases", daemon=True)
        self._thread.start()

    def take(self) -> str:
        """A fresh database's URL (the relay's schema, no data)."""
        ready = self._ready.get()
        if isinstance(ready, BaseException):
            raise ready
        return ready

    def settle(self) -> None:
        """Wait until the thread has made every database it makes ahead: until one is
        taken, it opens no connection (a test that ends other sessions spares it)."""
        deadline = time.monotonic() + 60
        while not self._ready.full():
            assert time.monotonic() < deadline, "the test databases are not made"
            time.sleep(0.01)

    def drop(self, dsn: str) -> None:
        """Drop a database a test used (later, by the thread)."""
        self._dropped.put(dsn.rsplit("%3D", 1)[1])

    def _drop_used(self, conn: psycopg.Connection[Any]) -> None:
        while not self._dropped.empty():
            conn.execute(f"DROP SCHEMA {self._dropped.get()} CASCADE".encode())

    def _work(self) -> None:
        base = self._cluster.dsn(TEST_DATABASE)
        try:
            with psycopg.connect(base, autocommit=True) as conn:
                while not self._stop.is_set():
                    self._drop_used(conn)
                    schema = f"test_{next(self._numbers)}"
                    conn.execute(f"CREATE SCHEMA {schema}".encode())
                    dsn = f"{base}&options=-csearch_path%3D{schema}"
                    tables = PostgresConnection(dsn)
                    try:
                        create_or_migrate_schema(tables)
                    finally:
                        tables.close()
                    while not self._stop.is_set():
                        try:
                            self._ready.put(dsn, timeout=0.1)
                            break
                        except queue.Full:
                            self._drop_used(conn)
        except Exception as exc:
            # For the next take() to raise; a blocking put into a full queue would
            # hang close(), which stops the thread only between tries.
            while not self._stop.is_set():
                with suppress(queue.Full):
                    self._ready.put(exc, timeout=0.1)
                    break

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def database_pool(cluster: ThrowawayCluster) -> Iterator[DatabasePool]:
    pool = DatabasePool(cluster)
    try:
        yield pool
    finally:
        pool.close()


@contextmanager
def session_cluster() -> Iterator[ThrowawayCluster]:
    """A throwaway server with the tests' database; skips the test if it cannot run."""
    if server_binaries() is None:
        pytest.skip(MISSING)
    with throwaway_cluster() as cluster:
        cluster.create_database(TEST_DATABASE)
        yield cluster


# The sealed queue of schema 4 (one table each, no partitions), as relays before
# version 5 created it (main at 3aa838a: postgres.py's SCHEMA_1 and migration 3).
SCHEMA_4_QUEUE = """
CREATE TABLE payloads (id BIGINT PRIMARY KEY, epoch BIGINT NOT NULL, sealed BYTEA NOT NULL);
CREATE TABLE deliveries (
    seq BIGINT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    mailbox BYTEA NOT NULL,
    payload_id BIGINT NOT NULL,
    sealed BYTEA NOT NULL
);
CREATE INDEX deliveries_epoch_mailbox ON deliveries (epoch, mailbox, seq);
CREATE INDEX deliveries_payload ON deliveries (payload_id);
CREATE FUNCTION deliveries_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM payloads WHERE id = OLD.payload_id
        AND NOT EXISTS (SELECT 1 FROM deliveries WHERE payload_id = OLD.payload_id);
    RETURN NULL;
END $$;
CREATE TRIGGER deliveries_removed AFTER DELETE ON deliveries
    FOR EACH ROW EXECUTE FUNCTION deliveries_removed();
"""


def back_to_schema_4(dsn: str) -> None:
    """Turn the relay database at ``dsn`` back into schema 4, as the relay before version 5
    left it: its queue in one table each, the rows (queued mail) kept."""
    with psycopg.connect(dsn) as conn:  # one transaction
        for table in ("deliveries", "payloads"):
            conn.execute(f"ALTER TABLE {table} RENAME TO {table}_5".encode())
            conn.execute(f"ALTER INDEX {table}_pkey RENAME TO {table}_5_pkey".encode())
        conn.execute(b"ALTER INDEX deliveries_epoch_mailbox RENAME TO deliveries_5_epoch_mailbox")
        conn.execute(b"ALTER INDEX deliveries_payload RENAME TO deliveries_5_payload")
        conn.execute(b"DROP TRIGGER deliveries_removed ON deliveries_5")
        conn.execute(b"DROP FUNCTION deliveries_removed")
        conn.execute(SCHEMA_4_QUEUE.encode())
        conn.execute(b"INSERT INTO payloads SELECT id, epoch, sealed FROM payloads_5")
        conn.execute(
            b"INSERT INTO deliveries SELECT seq, epoch, mailbox, payload_id, sealed "
            b"FROM deliveries_5"
        )
        conn.execute(b"DROP TABLE deliveries_5, payloads_5, epoch_starts")
        conn.execute(b"UPDATE schema_version SET version = 4")


def waiting_for_a_lock(dsn: str, pids: set[int]) -> set[int]:
    """Those of the server processes ``pids`` that wait for a lock now."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid = ANY(%s)",
            (list(pids),),
        ).fetchall()
    return {pid for (pid,) in rows}
