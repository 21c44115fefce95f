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
from collections.abc import Iterator
from contextlib import contextmanager
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
            self._ready.put(exc)

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
