"""A throwaway PostgreSQL cluster for tests and benchmarks: :func:`throwaway_cluster`.

Starts the distribution's PostgreSQL server binaries (Debian's
``/usr/lib/postgresql/<version>/bin``) on a new data folder in a temporary
folder, reachable only over a unix socket in that folder (no TCP), and
removes it all when done. The server refuses to run as root, so as root
the folder is given to the ``postgres`` user and the binaries run as it
(``runuser``). Durability is off (``fsync``, ``synchronous_commit``,
``full_page_writes``): the data is thrown away anyway. Benchmarks that
measure the cost of a commit pass ``durable=True``.

    with throwaway_cluster() as cluster:
        dsn = cluster.create_database("relay")   # postgresql:///relay?host=...
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

# Where Debian's postgresql packages put the server binaries (one folder per version).
SERVER_BINARIES = "/usr/lib/postgresql/*/bin"

# The user the server runs as when the caller is root (Debian's).
SERVER_USER = "postgres"

# Connections the server accepts: several relay processes of a test, each with
# a writer and a listener connection, and the test's own.
MAX_CONNECTIONS = 100

# Seconds pg_ctl waits for the server to start or stop.
START_TIMEOUT = 60


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server binaries' folder, or None."""
    found = [Path(p) for p in glob.glob(SERVER_BINARIES) if (Path(p) / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])


@dataclass
class ThrowawayCluster:
    """A running throwaway server: its folder, and databases created on it."""

    folder: Path
    binaries: Path
    as_user: str | None  # the user the binaries run as, None: the caller

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def dsn(self, database: str = "postgres") -> str:
        """The URL of ``database``, over the cluster's unix socket, as its superuser."""
        return f"postgresql:///{database}?host={self.folder}&user={SERVER_USER}"

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create ``name`` (a copy of ``template`` if given: fast); its URL."""
        # FILE_COPY: copies the template's files at once instead of logging every
        # page (PostgreSQL 15's default), several times faster for a small database.
        copy = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        self.sql(f'CREATE DATABASE "{name}"{copy}')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def sql(self, statement: str) -> None:
        """Run one statement on the ``postgres`` database (autocommit)."""
        import psycopg  # the optional extra: only who starts a cluster needs it

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(statement.encode())

    def _run(self, *args: str) -> None:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self.as_user is not None:
            command = ["runuser", "-u", self.as_user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT * 2)

    def start(self, *, durable: bool = False) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SERVER_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = [
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{self.folder}'",
            f"-c max_connections={MAX_CONNECTIONS}",
        ]
        if not durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-o",
            " ".join(options),
            "-t",
            str(START_TIMEOUT),
            "-w",
            "start",
        )

    def stop(self) -> None:
        with suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


@contextmanager
def throwaway_cluster(*, durable: bool = False) -> Iterator[ThrowawayCluster]:
    """Start a throwaway PostgreSQL server for the block; stop and delete it after.

    RuntimeError if the server binaries are missing (:func:`server_binaries`).
    """
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError(f"no PostgreSQL server binaries in {SERVER_BINARIES}")
    folder = Path(tempfile.mkdtemp(prefix="hushchat-pg-"))  # 0700
    as_user = None
    if os.geteuid() == 0:  # the server refuses root: the folder becomes its user's
        as_user = SERVER_USER
        entry = pwd.getpwnam(SERVER_USER)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    cluster = ThrowawayCluster(folder, binaries, as_user)
    try:
        cluster.start(durable=durable)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
